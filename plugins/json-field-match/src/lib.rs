//! json-field-match: for extraction tasks, each field of the reference JSON scores 1 when
//! the prediction has an equal value at the same path; the score is their mean, with one
//! detail per field.

use lathe_metrics::json_fields::{field_match, field_match_value};
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value, json};

struct JsonFieldMatch {
    fields: Option<Vec<String>>,
    ignore_case: bool,
}

impl Scorer for JsonFieldMatch {
    fn info() -> PluginInfo {
        PluginInfo::new("json-field-match", env!("CARGO_PKG_VERSION"), "Field-by-field exact match of JSON objects, with per-field scores")
            .with_config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "fields": {"type": "array", "items": {"type": "string"},
                               "description": "only these fields (JSON pointers or top-level names); default: every leaf of the reference"},
                    "ignore_case": {"type": "boolean", "default": false}
                }
            }))
    }

    fn new(config: &Value) -> Result<Self, String> {
        let obj = config.as_object().ok_or("configuration must be an object")?;
        if let Some(k) = obj.keys().find(|k| !["fields", "ignore_case"].contains(&k.as_str())) {
            return Err(format!("unknown option `{k}`"));
        }
        let fields = match obj.get("fields") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_str().map(String::from).ok_or("`fields` must hold strings"))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(_) => return Err("`fields` must be an array of strings".into()),
        };
        let ignore_case = match obj.get("ignore_case") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("`ignore_case` must be a boolean".into()),
        };
        Ok(JsonFieldMatch { fields, ignore_case })
    }

    fn score(&self, prediction: &str, reference: &str) -> Score {
        match field_match(prediction, reference, self.fields.as_deref(), self.ignore_case) {
            Ok(s) => Score { value: s.value, details: s.details },
            // A reference that is not JSON is a dataset error: it scores 0 and says why.
            Err(e) => Score { value: 0.0, details: vec![(format!("error: {e}"), 0.0)] },
        }
    }

    fn score_value(&self, prediction: &str, reference: &str) -> f64 {
        match &self.fields {
            Some(_) => self.score(prediction, reference).value,
            None => field_match_value(prediction, reference, self.ignore_case).unwrap_or(0.0),
        }
    }
}

lathe_plugin_sdk::export_scorer!(JsonFieldMatch);
