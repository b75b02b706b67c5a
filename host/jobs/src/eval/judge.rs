//! LLM-as-judge: the suite's judge plugin renders the judge prompt and parses the verdict;
//! the judge model is a local model (any GGUF or Hugging Face folder the engine loads) or
//! any OpenAI-compatible `chat/completions` endpoint, configured per suite.
//!
//! Verdicts are cached by (judge model, prompt hash, output hash, seed) in an append-only
//! JSON-lines file, so re-scoring a run replays them instead of asking again — the same
//! numbers, no cost.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use lathe_engine::generate::generate_with;
use lathe_engine::{LoadedModel, Message, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::{JobError, Result};

/// Which model judges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JudgeModel {
    /// A model file or folder the engine loads.
    Local { path: PathBuf },
    /// An OpenAI-compatible server: `base_url` up to `/v1`, the model name, and the
    /// environment variable holding the API key (none for local servers).
    #[serde(rename = "openai")]
    OpenAi {
        base_url: String,
        model: String,
        #[serde(default)]
        api_key_env: Option<String>,
    },
}

impl JudgeModel {
    /// The name verdicts are cached under.
    pub fn cache_name(&self) -> String {
        match self {
            Self::Local { path } => format!("local:{}", path.display()),
            Self::OpenAi { base_url, model, .. } => format!("openai:{base_url}#{model}"),
        }
    }
}

/// The suite's judge: plugin, its configuration, the model and the sampling seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    pub plugin: String,
    /// The judge plugin's pinned sha256, as [`PluginRef::sha256`](super::PluginRef::sha256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// As [`PluginRef::limits`](super::PluginRef::limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<super::CallLimits>,
    #[serde(default = "super::empty_object")]
    pub config: serde_json::Value,
    pub model: JudgeModel,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// OpenAI's `response_format`, sent as-is to an endpoint judge: with a JSON schema for
    /// the verdict (structured outputs), even a small judge model answers in a shape the
    /// plugin reads. A local judge decodes unconstrained and refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<serde_json::Value>,
}

impl JudgeSpec {
    /// The name verdicts are cached under: the judge model, and the response format when
    /// one constrains its answers (the same model answers differently under it).
    pub fn cache_name(&self) -> String {
        match &self.response_format {
            Some(f) => format!("{}+format:{}", self.model.cache_name(), lathe_util::sha256_hex(f.to_string().as_bytes())),
            None => self.model.cache_name(),
        }
    }
}

fn default_max_tokens() -> usize {
    128
}

/// Something that answers a chat.
pub trait JudgeBackend: Send {
    fn complete(&mut self, messages: &[Message], seed: u64, max_tokens: usize) -> Result<String>;
}

/// A local model through the engine (greedy decoding; the seed is recorded).
pub struct LocalJudge {
    pub model: LoadedModel,
}

impl JudgeBackend for LocalJudge {
    fn complete(&mut self, messages: &[Message], seed: u64, max_tokens: usize) -> Result<String> {
        let prompt = self.model.tokenizer.encode_chat(messages, true)?;
        let params = SamplingParams {
            max_tokens,
            seed,
            ..SamplingParams::default()
        };
        let mut g = generate_with(&self.model.model, None, &self.model.tokenizer, &[prompt], &params, &mut |_, _| {})?;
        Ok(g.pop().map(|g| g.text).unwrap_or_default())
    }
}

/// An OpenAI-compatible endpoint, called with temperature 0 and the seed.
pub struct OpenAiJudge {
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key: read when the judge is first asked,
    /// so a run whose verdicts are all cached needs no key.
    pub api_key_env: Option<String>,
    /// Sent as the request's `response_format` ([`JudgeSpec::response_format`]).
    pub response_format: Option<serde_json::Value>,
    agent: ureq::Agent,
}

impl OpenAiJudge {
    pub fn new(base_url: &str, model: &str, api_key_env: Option<String>, response_format: Option<serde_json::Value>) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key_env,
            response_format,
            agent: ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(120)).build(),
        }
    }
}

impl JudgeBackend for OpenAiJudge {
    fn complete(&mut self, messages: &[Message], seed: u64, max_tokens: usize) -> Result<String> {
        let url = format!("{}/chat/completions", self.base_url);
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "temperature": 0,
            "seed": seed,
            "max_tokens": max_tokens,
        });
        if let Some(f) = &self.response_format {
            body["response_format"] = f.clone();
        }
        let mut req = self.agent.post(&url).set("content-type", "application/json");
        if let Some(var) = &self.api_key_env {
            let key = std::env::var(var).map_err(|_| JobError::Invalid(format!("the judge's API key: ${var} is not set (a verdict is not in the cache, so the judge at {url} must be asked)")))?;
            req = req.set("authorization", &format!("Bearer {key}"));
        }
        let fail = |m: String| JobError::Judge(format!("endpoint {url}: {m}"));
        let resp = match req.send_string(&body.to_string()) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                return Err(fail(format!("answered {code}: {}", text.chars().take(300).collect::<String>())));
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let text = resp.into_string().map_err(|e| fail(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| fail("the answer is not JSON".into()))?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| fail("no choices[0].message.content in the answer".into()))
    }
}

/// One cached verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub key: String,
    pub score: f64,
    pub reason: String,
    /// The judge's raw answer.
    pub answer: String,
}

impl Verdict {
    /// Verdicts as the JSON lines a cache file (and a pack's `data/verdicts.jsonl`) holds.
    pub fn jsonl<'a>(verdicts: impl IntoIterator<Item = &'a Verdict>) -> String {
        verdicts.into_iter().map(|v| serde_json::to_string(v).expect("verdicts serialise") + "\n").collect()
    }
}

/// Verdicts by key, persisted as JSON lines.
pub struct VerdictCache {
    path: Option<PathBuf>,
    entries: HashMap<String, Verdict>,
    pub hits: usize,
    pub misses: usize,
}

impl VerdictCache {
    /// In memory only.
    pub fn memory() -> Self {
        Self {
            path: None,
            entries: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// Opens (or starts) the cache file; unreadable lines are skipped, not fatal.
    pub fn open(path: &Path) -> Result<Self> {
        let mut entries = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                if let Ok(v) = serde_json::from_str::<Verdict>(line) {
                    entries.insert(v.key.clone(), v);
                }
            }
        }
        Ok(Self {
            path: Some(path.into()),
            entries,
            hits: 0,
            misses: 0,
        })
    }

    /// sha256 over (judge model, prompt, output, seed).
    pub fn key(judge_model: &str, prompt: &[Message], output: &str, seed: u64) -> String {
        let hex = lathe_util::sha256_hex;
        let prompt_json: Vec<(&str, &str)> = prompt.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        let prompt_hash = hex(serde_json::to_string(&prompt_json).expect("strings serialize").as_bytes());
        let output_hash = hex(output.as_bytes());
        hex(format!("{judge_model}\n{prompt_hash}\n{output_hash}\n{seed}").as_bytes())
    }

    fn get(&mut self, key: &str) -> Option<Verdict> {
        let v = self.entries.get(key).cloned();
        if v.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        v
    }

    /// Adds the verdicts whose keys it does not hold yet (a pack's, measured elsewhere) in
    /// one append; returns how many were new.
    pub fn add_all(&mut self, verdicts: &[Verdict]) -> Result<usize> {
        let new: Vec<&Verdict> = verdicts.iter().filter(|v| !self.entries.contains_key(&v.key)).collect();
        if let (Some(path), false) = (&self.path, new.is_empty()) {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| JobError::io(dir, e))?;
            }
            let lines = Verdict::jsonl(new.iter().copied());
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(lines.as_bytes()))
                .map_err(|e| JobError::io(path, e))?;
        }
        let added = new.len();
        for v in new {
            self.entries.insert(v.key.clone(), v.clone());
        }
        Ok(added)
    }
}

/// A judge ready to score: plugin instance, backend, cache.
pub struct Judge {
    pub spec: JudgeSpec,
    /// The judge plugin's sha256, as the run records it.
    pub plugin_sha256: String,
    plugin: lathe_sandbox::Instance,
    backend: Box<dyn JudgeBackend>,
    pub cache: VerdictCache,
}

impl Judge {
    pub fn new(env: &Env, spec: JudgeSpec, backend: Box<dyn JudgeBackend>, cache: VerdictCache) -> Result<Self> {
        let plugin = env.plugin_ref(&spec.plugin, spec.sha256.as_deref(), spec.limits, lathe_sandbox::Kind::Judge)?;
        let instance = plugin.instance(&spec.config.to_string()).map_err(|e| call_err(&spec.plugin, e))?;
        Ok(Self {
            spec,
            plugin_sha256: plugin.info().sha256.clone(),
            plugin: instance,
            backend,
            cache,
        })
    }

    /// Builds the backend the spec names: loads a local model, or reads the API key.
    pub fn backend_for(spec: &JudgeSpec, device: &lathe_engine::Device) -> Result<Box<dyn JudgeBackend>> {
        Ok(match &spec.model {
            JudgeModel::Local { .. } if spec.response_format.is_some() => {
                return Err(JobError::Invalid(
                    "the judge's response_format needs an endpoint judge (model kind `openai`): a local judge decodes unconstrained".into(),
                ));
            }
            JudgeModel::Local { path } => Box::new(LocalJudge {
                model: lathe_engine::load(path, device).map_err(|e| JobError::Judge(format!("loading the judge model: {e}")))?,
            }),
            JudgeModel::OpenAi {
                base_url,
                model,
                api_key_env,
            } => Box::new(OpenAiJudge::new(base_url, model, api_key_env.clone(), spec.response_format.clone())),
        })
    }

    /// The judge's score in [0, 1] and reason for one output, from the cache when it
    /// has been asked before.
    pub fn score(&mut self, input: &str, output: &str, reference: Option<&str>) -> Result<Verdict> {
        let prompt = self.plugin.build_prompt(input, output, reference).map_err(|e| call_err(&self.spec.plugin, e))?;
        let messages: Vec<Message> = prompt.into_iter().map(|m| Message::new(m.role, m.content)).collect();
        let key = VerdictCache::key(&self.spec.cache_name(), &messages, output, self.spec.seed);
        if let Some(v) = self.cache.get(&key) {
            return Ok(v);
        }
        let answer = self.backend.complete(&messages, self.spec.seed, self.spec.max_tokens)?;
        let verdict = match self.plugin.parse_verdict(&answer).map_err(|e| call_err(&self.spec.plugin, e))? {
            Ok(j) => Verdict {
                key,
                score: j.score,
                reason: j.reason,
                answer,
            },
            // An answer the plugin cannot read scores 0 and says why; it is cached too,
            // so a re-score gives the same number.
            Err(why) => Verdict {
                key,
                score: 0.0,
                reason: format!("unreadable verdict: {why}"),
                answer,
            },
        };
        self.cache.add_all(std::slice::from_ref(&verdict))?;
        Ok(verdict)
    }
}

fn call_err(plugin: &str, e: lathe_sandbox::CallError) -> JobError {
    JobError::Judge(format!("plugin `{plugin}`: {e}"))
}
