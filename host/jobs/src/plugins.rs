//! Plugins as users see them: what one declares about itself, and one run on a sample.

use lathe_sandbox::{CallError, Info, Kind, Plugin};
use serde_json::{Value, json};

use crate::error::{JobError, Result};

/// What a plugin says about itself, as `lathe plugin inspect` and the API show it.
pub fn describe(info: &Info) -> Value {
    json!({
        "name": info.name,
        "version": info.version,
        "world": format!("lathe:plugin/{}@{}", info.kind, info.wit_version),
        "description": info.description,
        "config_schema": info.config_schema,
        "size_bytes": info.size_bytes,
        "sha256": info.sha256,
    })
}

/// Runs a plugin on a sample, as `lathe plugin test` and the API's "try it" do: a
/// scorer on `{prediction, reference}` (or a list of them), a validator on `{output}`, a
/// formatter on a raw record, a judge on `{input, output, reference?}` (its prompt) or
/// `{answer}` (its verdict).
pub fn try_on(plugin: &Plugin, config: &str, input: &Value) -> Result<Value> {
    let name = plugin.info().name.clone();
    let call = |e: CallError| JobError::PluginCall { plugin: name.clone(), item: 0, source: e };
    let mut inst = plugin.instance(config).map_err(call)?;
    let str_field = |v: &Value, k: &str| -> Result<String> {
        v.get(k).and_then(Value::as_str).map(String::from).ok_or_else(|| JobError::Invalid(format!("the sample needs a string `{k}`")))
    };
    let out = match plugin.kind() {
        Kind::Scorer => {
            let pairs: Vec<&Value> = match input {
                Value::Array(items) => items.iter().collect(),
                one => vec![one],
            };
            let mut scores = Vec::new();
            let (mut preds, mut refs) = (Vec::new(), Vec::new());
            for p in pairs {
                let (pred, reference) = (str_field(p, "prediction")?, str_field(p, "reference")?);
                let s = inst.score(&pred, &reference).map_err(call)?;
                let details: serde_json::Map<String, Value> = s.details.into_iter().map(|(k, v)| (k, v.into())).collect();
                scores.push(json!({"score": s.value, "details": details}));
                preds.push(pred);
                refs.push(reference);
            }
            let aggregate: serde_json::Map<String, Value> =
                inst.aggregate(&preds, &refs).map_err(call)?.into_iter().map(|(k, v)| (k, v.into())).collect();
            json!({"scores": scores, "aggregate": aggregate})
        }
        Kind::Validator => {
            let output = match input {
                Value::String(s) => s.clone(),
                other => str_field(other, "output")?,
            };
            match inst.validate(&output).map_err(call)? {
                Ok(()) => json!({"valid": true}),
                Err(vs) => json!({"valid": false, "violations": vs.iter()
                    .map(|v| json!({"path": v.path, "message": v.message})).collect::<Vec<_>>()}),
            }
        }
        Kind::Formatter => match inst.format(&input.to_string()).map_err(call)? {
            Ok(lathe_sandbox::Example::Chat(msgs)) => json!({"messages": msgs.iter()
                .map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>()}),
            Ok(lathe_sandbox::Example::Completion { prompt, completion }) => json!({"prompt": prompt, "completion": completion}),
            Err(e) => json!({"error": {"field": e.field, "message": e.message}}),
        },
        Kind::Judge => {
            if let Some(answer) = input.get("answer").and_then(Value::as_str) {
                match inst.parse_verdict(answer).map_err(call)? {
                    Ok(j) => json!({"score": j.score, "reason": j.reason}),
                    Err(e) => json!({"error": e}),
                }
            } else {
                let reference = input.get("reference").and_then(Value::as_str);
                let msgs = inst.build_prompt(&str_field(input, "input")?, &str_field(input, "output")?, reference).map_err(call)?;
                json!({"messages": msgs.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>()})
            }
        }
    };
    Ok(out)
}

