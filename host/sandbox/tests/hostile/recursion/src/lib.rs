//! Recurses without end.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct Hostile;

impl Scorer for Hostile {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-recursion", "0.1.0", "Recurses without end.")
    }
    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Hostile)
    }
    #[allow(unreachable_code, unused_variables)]
    fn score(&self, prediction: &str, reference: &str) -> Score {
        fn deeper(n: u64) -> u64 {
            let frame = std::hint::black_box([n; 16]);
            deeper(frame[3] + 1) + frame[7]
        }
        Score::of(deeper(0) as f64)
    }
}

lathe_plugin_sdk::export_scorer!(Hostile);
