//! Returns far more than anyone asked for.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct Hostile;

impl Scorer for Hostile {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-huge-output", "0.1.0", "Returns far more than anyone asked for.")
    }
    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Hostile)
    }
    #[allow(unreachable_code, unused_variables)]
    fn score(&self, prediction: &str, reference: &str) -> Score {
        // 16 MiB of field name: under the memory cap, over the output cap.
        Score { value: 1.0, details: vec![("x".repeat(16 << 20), 1.0)] }
    }
}

lathe_plugin_sdk::export_scorer!(Hostile);
