//! Keeps state between calls and aborts on request.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct Hostile;

impl Scorer for Hostile {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-flaky", "0.1.0", "Keeps state between calls and aborts on request.")
    }
    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Hostile)
    }
    #[allow(unreachable_code, unused_variables)]
    fn score(&self, prediction: &str, reference: &str) -> Score {
        // Traps on "trap", otherwise counts its calls: shows that a trap resets the instance.
        use std::sync::atomic::{AtomicU64, Ordering};
        static CALLS: AtomicU64 = AtomicU64::new(0);
        if prediction == "trap" {
            std::process::abort();
        }
        Score::of(CALLS.fetch_add(1, Ordering::Relaxed) as f64)
    }
}

lathe_plugin_sdk::export_scorer!(Hostile);
