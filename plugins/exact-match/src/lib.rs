//! exact-match: 1 when the prediction equals the reference after the configured
//! normalisation, else 0.

use lathe_metrics::text::{Normalize, exact_match};
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value, json};

struct ExactMatch(Normalize);

impl Scorer for ExactMatch {
    fn info() -> PluginInfo {
        PluginInfo::new("exact-match", env!("CARGO_PKG_VERSION"), "1 when prediction and reference are equal after normalisation")
            .with_config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "trim": {"type": "boolean", "default": true, "description": "ignore leading and trailing whitespace"},
                    "ignore_case": {"type": "boolean", "default": false},
                    "collapse_whitespace": {"type": "boolean", "default": false},
                    "ignore_punctuation": {"type": "boolean", "default": false}
                }
            }))
    }

    fn new(config: &Value) -> Result<Self, String> {
        let flag = |k: &str, default: bool| match config.get(k) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!("`{k}` must be a boolean, got {other}")),
        };
        if let Some(obj) = config.as_object()
            && let Some(k) = obj.keys().find(|k| !["trim", "ignore_case", "collapse_whitespace", "ignore_punctuation"].contains(&k.as_str()))
        {
            return Err(format!("unknown option `{k}`"));
        }
        Ok(ExactMatch(Normalize {
            trim: flag("trim", true)?,
            ignore_case: flag("ignore_case", false)?,
            collapse_whitespace: flag("collapse_whitespace", false)?,
            ignore_punctuation: flag("ignore_punctuation", false)?,
        }))
    }

    fn score(&self, prediction: &str, reference: &str) -> Score {
        Score::of(self.score_value(prediction, reference))
    }

    fn score_value(&self, prediction: &str, reference: &str) -> f64 {
        exact_match(prediction, reference, &self.0)
    }
}

lathe_plugin_sdk::export_scorer!(ExactMatch);
