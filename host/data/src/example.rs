//! The canonical training example and its canonical JSON line.
//!
//! An [`Example`] is a chat: messages whose last one is the assistant's answer (the training
//! target), an optional label (for stratified splits and label statistics) and optional extra
//! fields. Its canonical line is compact JSON with a fixed key order (`messages`, `label`,
//! `meta`; `role` before `content`; `meta` keys sorted at every depth), so that the sha256 of a
//! version's lines identifies its content whatever the source format was.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Problem, RecordError};

/// Who says a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub const ALLOWED: &'static str = "system, user, assistant";

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// The OpenAI chat role names.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message { role, content: content.into() }
    }
}

/// One training example. The last message is the assistant's target.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Example {
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Extra fields of the source record that are not part of the chat.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub meta: Map<String, Value>,
}

impl Example {
    pub fn new(messages: Vec<Message>) -> Self {
        Example { messages, label: None, meta: Map::new() }
    }

    /// A one-turn example: optional system prompt, user prompt, assistant completion.
    pub fn prompt_completion(system: Option<&str>, prompt: &str, completion: &str) -> Self {
        let mut messages = Vec::with_capacity(3);
        if let Some(s) = system {
            messages.push(Message::new(Role::System, s));
        }
        messages.push(Message::new(Role::User, prompt));
        messages.push(Message::new(Role::Assistant, completion));
        Example::new(messages)
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Checks the invariants: at least one message and the last one from the assistant.
    pub fn validate(&self) -> Result<(), RecordError> {
        match self.messages.last() {
            None => Err(RecordError::new("messages", Problem::NoMessages)),
            Some(m) if m.role != Role::Assistant => Err(RecordError::new(
                format!("messages[{}].role", self.messages.len() - 1),
                Problem::LastNotAssistant { role: m.role.as_str().to_string() },
            )),
            Some(_) => Ok(()),
        }
    }

    /// The assistant's target (the last message's content).
    pub fn target(&self) -> &str {
        self.messages.last().map(|m| m.content.as_str()).unwrap_or("")
    }

    /// Every message but the target.
    pub fn context(&self) -> &[Message] {
        &self.messages[..self.messages.len().saturating_sub(1)]
    }

    /// Appends the canonical JSON line (without the newline) to `out`.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"messages\":[");
        for (i, m) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"role\":\"");
            out.extend_from_slice(m.role.as_str().as_bytes());
            out.extend_from_slice(b"\",\"content\":");
            write_json_string(&m.content, out);
            out.push(b'}');
        }
        out.push(b']');
        if let Some(label) = &self.label {
            out.extend_from_slice(b",\"label\":");
            write_json_string(label, out);
        }
        if !self.meta.is_empty() {
            out.extend_from_slice(b",\"meta\":");
            write_canonical_object(&self.meta, out);
        }
        out.push(b'}');
    }

    /// The canonical JSON line, without the newline.
    pub fn to_canonical(&self) -> String {
        let mut out = Vec::with_capacity(128);
        self.write_canonical(&mut out);
        String::from_utf8(out).expect("canonical JSON is UTF-8")
    }

    /// Parses a canonical line (or any JSON of the same shape).
    pub fn from_json_line(line: &str) -> Result<Example, serde_json::Error> {
        serde_json::from_str(line)
    }
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

fn write_canonical_object(map: &Map<String, Value>, out: &mut Vec<u8>) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    out.push(b'{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(k, out);
        out.push(b':');
        write_canonical_value(&map[k], out);
    }
    out.push(b'}');
}

/// Compact JSON with object keys sorted at every depth.
pub fn write_canonical_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => write_canonical_object(m, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical_value(x, out);
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).expect("writing to a Vec cannot fail"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_line_has_fixed_key_order_and_no_whitespace() {
        let mut ex = Example::prompt_completion(Some("be brief"), "Hi \"there\"\n", "héllo").with_label("greet");
        ex.meta.insert("z".into(), json!({"b": 1, "a": [true, null]}));
        ex.meta.insert("a".into(), json!(2.5));
        assert_eq!(
            ex.to_canonical(),
            r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"Hi \"there\"\n"},{"role":"assistant","content":"héllo"}],"label":"greet","meta":{"a":2.5,"z":{"a":[true,null],"b":1}}}"#
        );
        let back = Example::from_json_line(&ex.to_canonical()).unwrap();
        assert_eq!(back, ex);
    }

    #[test]
    fn validate_requires_assistant_last() {
        let ex = Example::new(vec![Message::new(Role::User, "q")]);
        let err = ex.validate().unwrap_err();
        assert_eq!(err.field.as_deref(), Some("messages[0].role"));
        assert!(matches!(err.problem, Problem::LastNotAssistant { .. }));
        assert!(Example::new(vec![]).validate().is_err());
        assert!(Example::prompt_completion(None, "q", "a").validate().is_ok());
    }
}
