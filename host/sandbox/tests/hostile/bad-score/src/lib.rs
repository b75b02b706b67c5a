//! Scores every pair with the number its configuration names (`{"value": 1.5}`), or NaN
//! (`{"value": "nan"}`): a score the host must refuse to average.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct BadScore(f64);

impl Scorer for BadScore {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-bad-score", "0.1.0", "Returns the score its configuration names, NaN included.")
    }
    fn new(config: &Value) -> Result<Self, String> {
        match &config["value"] {
            Value::String(s) if s == "nan" => Ok(BadScore(f64::NAN)),
            v => v.as_f64().map(BadScore).ok_or_else(|| "config.value: a number or \"nan\"".to_string()),
        }
    }
    fn score(&self, _prediction: &str, _reference: &str) -> Score {
        Score::of(self.0)
    }
}

lathe_plugin_sdk::export_scorer!(BadScore);
