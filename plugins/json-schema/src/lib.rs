//! json-schema: validates a model output against a JSON Schema (draft 2020-12) and lists
//! every violation with its JSON pointer.

use lathe_plugin_sdk::{PluginInfo, Validator, Value, Violation, json};

struct JsonSchema(jsonschema::Validator);

impl Validator for JsonSchema {
    fn info() -> PluginInfo {
        PluginInfo::new("json-schema", env!("CARGO_PKG_VERSION"), "The output must be JSON valid against a schema (draft 2020-12)")
            .with_config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["schema"],
                "properties": {"schema": {"type": ["object", "boolean"], "description": "the JSON Schema outputs must satisfy"}}
            }))
    }

    fn new(config: &Value) -> Result<Self, String> {
        let obj = config.as_object().ok_or("configuration must be an object")?;
        if let Some(k) = obj.keys().find(|k| *k != "schema") {
            return Err(format!("unknown option `{k}`"));
        }
        let schema = obj.get("schema").ok_or("`schema` is required")?;
        let v = jsonschema::draft202012::new(schema).map_err(|e| format!("`schema` is not a valid JSON Schema: {e}"))?;
        Ok(JsonSchema(v))
    }

    fn validate(&self, output: &str) -> Result<(), Vec<Violation>> {
        let instance: Value = serde_json_parse(output).map_err(|message| vec![Violation { path: String::new(), message }])?;
        let violations: Vec<Violation> = self
            .0
            .iter_errors(&instance)
            .map(|e| Violation { path: e.instance_path().to_string(), message: e.to_string() })
            .collect();
        if violations.is_empty() { Ok(()) } else { Err(violations) }
    }
}

fn serde_json_parse(output: &str) -> Result<Value, String> {
    lathe_plugin_sdk::serde_json::from_str(output).map_err(|e| format!("not valid JSON: {e}"))
}

lathe_plugin_sdk::export_validator!(JsonSchema);
