//! Panics unless the prediction is ok.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct Hostile;

impl Scorer for Hostile {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-panic", "0.1.0", "Panics unless the prediction is ok.")
    }
    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Hostile)
    }
    #[allow(unreachable_code, unused_variables)]
    fn score(&self, prediction: &str, reference: &str) -> Score {
        if prediction == "ok" {
            return Score::of(1.0);
        }
        panic!("boom: prediction was {prediction:?}")
    }
}

lathe_plugin_sdk::export_scorer!(Hostile);
