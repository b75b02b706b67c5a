//! Allocates until something stops it.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct Hostile;

impl Scorer for Hostile {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-memory-bomb", "0.1.0", "Allocates until something stops it.")
    }
    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Hostile)
    }
    #[allow(unreachable_code, unused_variables)]
    fn score(&self, prediction: &str, reference: &str) -> Score {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

lathe_plugin_sdk::export_scorer!(Hostile);
