//! regex-extract: pulls the answer out of a free-form prediction with a regular expression
//! (the first match, a chosen capture group) and compares it with the reference.

use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value, json};
use regex::Regex;

struct RegexExtract {
    pattern: Regex,
    group: usize,
    ignore_case: bool,
}

impl Scorer for RegexExtract {
    fn info() -> PluginInfo {
        PluginInfo::new("regex-extract", env!("CARGO_PKG_VERSION"), "Extract the answer with a regex, then exact-match it")
            .with_config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["pattern"],
                "properties": {
                    "pattern": {"type": "string", "description": "Rust regex syntax"},
                    "group": {"type": "integer", "minimum": 0, "description": "capture group (default 1 if the pattern has one, else 0)"},
                    "ignore_case": {"type": "boolean", "default": false, "description": "compare the extracted text case-insensitively"}
                }
            }))
    }

    fn new(config: &Value) -> Result<Self, String> {
        let obj = config.as_object().ok_or("configuration must be an object")?;
        if let Some(k) = obj.keys().find(|k| !["pattern", "group", "ignore_case"].contains(&k.as_str())) {
            return Err(format!("unknown option `{k}`"));
        }
        let pattern = obj.get("pattern").and_then(Value::as_str).ok_or("`pattern` (a string) is required")?;
        let pattern = Regex::new(pattern).map_err(|e| format!("`pattern` is not a valid regex: {e}"))?;
        let groups = pattern.captures_len() - 1;
        let group = match obj.get("group") {
            None => usize::from(groups > 0),
            Some(g) => g.as_u64().ok_or("`group` must be a non-negative integer")? as usize,
        };
        if group > groups {
            return Err(format!("`group` is {group} but the pattern has {groups} capture groups"));
        }
        let ignore_case = obj.get("ignore_case").and_then(Value::as_bool).unwrap_or(false);
        Ok(RegexExtract { pattern, group, ignore_case })
    }

    fn score(&self, prediction: &str, reference: &str) -> Score {
        let extracted = self
            .pattern
            .captures(prediction)
            .and_then(|c| c.get(self.group))
            .map(|m| m.as_str().trim());
        let value = match extracted {
            None => 0.0,
            Some(x) if self.ignore_case => f64::from(u8::from(x.to_lowercase() == reference.trim().to_lowercase())),
            Some(x) => f64::from(u8::from(x == reference.trim())),
        };
        let found = if extracted.is_some() { 1.0 } else { 0.0 };
        Score { value, details: vec![("matched".into(), found)] }
    }
}

lathe_plugin_sdk::export_scorer!(RegexExtract);
