//! llm-judge: renders a rubric (a minijinja template over `input`, `output` and
//! `reference`) into the judge model's prompt, and reads the judge's answer — a JSON
//! object `{"score": n, "reason": "..."}` or a line `Score: n` — into a score in [0, 1].

use lathe_plugin_sdk::{Judge, Judgment, Message, PluginInfo, Value, json};

const DEFAULT_RUBRIC: &str = "You are grading an answer to a task.\n\n\
Task:\n{{ input }}\n\nAnswer to grade:\n{{ output }}\n\
{% if reference %}\nReference answer:\n{{ reference }}\n{% endif %}\n\
Rate the answer from {{ min }} to {{ max }} for correctness and completeness. \
Reply with JSON only: {\"score\": <number>, \"reason\": \"<one sentence>\"}";

struct LlmJudge {
    env: minijinja::Environment<'static>,
    system: Option<String>,
    min: f64,
    max: f64,
}

impl Judge for LlmJudge {
    fn info() -> PluginInfo {
        PluginInfo::new("llm-judge", env!("CARGO_PKG_VERSION"), "LLM-as-judge with a minijinja rubric; parses a numeric verdict")
            .with_config_schema(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "rubric": {"type": "string", "description": "minijinja template; variables input, output, reference, min, max"},
                    "system": {"type": "string", "description": "system message for the judge"},
                    "min": {"type": "number", "default": 1},
                    "max": {"type": "number", "default": 10}
                }
            }))
    }

    fn new(config: &Value) -> Result<Self, String> {
        let obj = config.as_object().ok_or("configuration must be an object")?;
        if let Some(k) = obj.keys().find(|k| !["rubric", "system", "min", "max"].contains(&k.as_str())) {
            return Err(format!("unknown option `{k}`"));
        }
        let num = |k: &str, d: f64| match obj.get(k) {
            None => Ok(d),
            Some(v) => v.as_f64().ok_or(format!("`{k}` must be a number")),
        };
        let (min, max) = (num("min", 1.0)?, num("max", 10.0)?);
        if max <= min {
            return Err(format!("`max` ({max}) must be greater than `min` ({min})"));
        }
        let rubric = match obj.get("rubric") {
            None => DEFAULT_RUBRIC.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err("`rubric` must be a string".into()),
        };
        let mut env = minijinja::Environment::new();
        env.add_template_owned("rubric", rubric).map_err(|e| format!("`rubric` is not a valid template: {e}"))?;
        let system = obj.get("system").and_then(Value::as_str).map(String::from);
        Ok(LlmJudge { env, system, min, max })
    }

    fn build_prompt(&self, input: &str, output: &str, reference: Option<&str>) -> Vec<Message> {
        let tmpl = self.env.get_template("rubric").expect("added in new");
        // 1 and 10 render as `1` and `10`, not `1.0`.
        let num = |v: f64| if v.fract() == 0.0 { minijinja::Value::from(v as i64) } else { minijinja::Value::from(v) };
        let text = tmpl
            .render(minijinja::context! { input, output, reference, min => num(self.min), max => num(self.max) })
            .unwrap_or_else(|e| format!("(the rubric failed to render: {e})"));
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(Message::new("system", s.clone()));
        }
        msgs.push(Message::new("user", text));
        msgs
    }

    fn parse_verdict(&self, answer: &str) -> Result<Judgment, String> {
        let (raw, reason) = from_json(answer).or_else(|| from_line(answer)).ok_or_else(|| {
            let shown: String = answer.chars().take(80).collect();
            format!("no score found in the judge's answer: {shown:?}")
        })?;
        if !raw.is_finite() || raw < self.min || raw > self.max {
            return Err(format!("score {raw} is outside [{}, {}]", self.min, self.max));
        }
        Ok(Judgment { score: (raw - self.min) / (self.max - self.min), reason })
    }
}

/// The first `{...}` object in the answer that has a numeric `score`.
fn from_json(answer: &str) -> Option<(f64, String)> {
    let mut start = 0;
    while let Some(i) = answer[start..].find('{') {
        let from = start + i;
        let mut de = lathe_plugin_sdk::serde_json::Deserializer::from_str(&answer[from..]).into_iter::<Value>();
        if let Some(Ok(Value::Object(o))) = de.next()
            && let Some(score) = o.get("score").and_then(|s| s.as_f64().or_else(|| s.as_str()?.trim().parse().ok()))
        {
            let reason = o.get("reason").and_then(Value::as_str).unwrap_or("").to_string();
            return Some((score, reason));
        }
        start = from + 1;
    }
    None
}

/// `Score: 7`, `score = 7/10`, `Rating: 7.5` on some line; the rest of the answer is the reason.
fn from_line(answer: &str) -> Option<(f64, String)> {
    for line in answer.lines() {
        let lower = line.to_lowercase();
        for key in ["score", "rating"] {
            if let Some(pos) = lower.find(key) {
                let rest = line[pos + key.len()..].trim_start_matches([' ', ':', '=', '*']);
                let num: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
                if let Ok(v) = num.parse::<f64>() {
                    let reason = answer.replace(line, "").trim().to_string();
                    return Some((v, reason));
                }
            }
        }
    }
    None
}

lathe_plugin_sdk::export_judge!(LlmJudge);
