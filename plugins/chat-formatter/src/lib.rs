//! chat-formatter: turns a raw record into a chat (or prompt/completion) example by a
//! field mapping, e.g. `{"user": "question", "assistant": "answer", "system_prompt": "..."}`.
//! Fields are top-level names or dotted paths (`ticket.body`).

use lathe_plugin_sdk::{Example, FieldError, Formatter, Message, PluginInfo, Value, json};

struct ChatFormatter {
    user: String,
    assistant: String,
    system_field: Option<String>,
    system_prompt: Option<String>,
    completion: bool,
}

fn lookup<'a>(record: &'a Value, path: &str) -> Result<&'a str, FieldError> {
    let mut v = record;
    for part in path.split('.') {
        v = v.get(part).ok_or_else(|| FieldError::new(path, "missing"))?;
    }
    match v {
        Value::String(s) if s.trim().is_empty() => Err(FieldError::new(path, "is empty")),
        Value::String(s) => Ok(s),
        Value::Null => Err(FieldError::new(path, "is null")),
        other => Err(FieldError::new(path, format!("must be a string, got {}", kind(other)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Formatter for ChatFormatter {
    fn info() -> PluginInfo {
        PluginInfo::new("chat-formatter", env!("CARGO_PKG_VERSION"), "Maps a record's fields to a chat or prompt/completion example")
            .with_config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["user", "assistant"],
                "properties": {
                    "user": {"type": "string", "description": "field holding the user turn (the prompt)"},
                    "assistant": {"type": "string", "description": "field holding the assistant turn (the target)"},
                    "system_field": {"type": "string", "description": "field holding a system message"},
                    "system_prompt": {"type": "string", "description": "a fixed system message"},
                    "format": {"enum": ["chat", "completion"], "default": "chat"}
                }
            }))
    }

    fn new(config: &Value) -> Result<Self, String> {
        let obj = config.as_object().ok_or("configuration must be an object")?;
        let known = ["user", "assistant", "system_field", "system_prompt", "format"];
        if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("unknown option `{k}`"));
        }
        let string = |k: &str| -> Result<Option<String>, String> {
            match obj.get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("`{k}` must be a string")),
            }
        };
        let completion = match string("format")?.as_deref() {
            None | Some("chat") => false,
            Some("completion") => true,
            Some(other) => return Err(format!("`format` must be chat or completion, got `{other}`")),
        };
        let system_field = string("system_field")?;
        let system_prompt = string("system_prompt")?;
        if system_field.is_some() && system_prompt.is_some() {
            return Err("give `system_field` or `system_prompt`, not both".into());
        }
        Ok(ChatFormatter {
            user: string("user")?.ok_or("`user` (the field of the user turn) is required")?,
            assistant: string("assistant")?.ok_or("`assistant` (the field of the target) is required")?,
            system_field,
            system_prompt,
            completion,
        })
    }

    fn format(&self, record: &Value) -> Result<Example, FieldError> {
        if !record.is_object() {
            return Err(FieldError::new("", format!("the record must be an object, got {}", kind(record))));
        }
        let user = lookup(record, &self.user)?;
        let assistant = lookup(record, &self.assistant)?;
        let system = match (&self.system_field, &self.system_prompt) {
            (Some(f), _) => Some(lookup(record, f)?.to_string()),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        if self.completion {
            let prompt = match system {
                Some(s) => format!("{s}\n\n{user}"),
                None => user.to_string(),
            };
            return Ok(Example::Completion { prompt, completion: assistant.to_string() });
        }
        let mut messages = Vec::with_capacity(3);
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", user));
        messages.push(Message::new("assistant", assistant));
        Ok(Example::Chat(messages))
    }
}

lathe_plugin_sdk::export_formatter!(ChatFormatter);
