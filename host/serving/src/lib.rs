//! Lathe's serving engine: requests join and leave a running batch between decode steps
//! (continuous batching), their keys and values live in the engine's paged cache (prompts
//! that start alike share blocks), each request may run through its own LoRA adapter over
//! the one base model, and what happens is counted under vLLM's metric names.
//!
//! It knows nothing of HTTP: the server turns OpenAI requests into [`Request`]s and
//! [`Event`]s into responses; evaluation can submit its prompts the same way.

mod adapters;
mod grammar;
pub mod metrics;
mod scheduler;

use std::path::PathBuf;

use lathe_engine::{FinishReason, SamplingParams};
use serde::Serialize;

pub use grammar::Grammars;
pub use metrics::Metrics;
pub use scheduler::{Scheduler, generate_all};

/// sha256 of a tokenizer's own chat template (of the empty text when it has none): what
/// training records beside an adapter (`run.json`'s `tokenizer_template_sha256`) and
/// serving compares, so an adapter never sees prompts laid out otherwise than in training.
pub fn template_sha256(tokenizer: &lathe_engine::Tokenizer) -> String {
    lathe_util::sha256_hex(tokenizer.chat_template.as_deref().unwrap_or("").as_bytes())
}

/// How much one scheduler takes on.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Sequences in the running batch at most.
    pub max_seqs: usize,
    /// Tokens one step computes at most (decode tokens plus prompt chunks): a long prompt
    /// is prefilled over several steps so running streams keep their pace.
    pub max_step_tokens: usize,
    /// Bytes of key/value cache.
    pub kv_cache_bytes: usize,
    /// Adapters held in memory at once; the least recently used idle one makes room.
    pub max_loras: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_seqs: 32,
            max_step_tokens: 256,
            kv_cache_bytes: 256 << 20,
            max_loras: 8,
        }
    }
}

/// A LoRA adapter a request runs through: a PEFT folder, known by a key that names one
/// immutable version (a content hash), so the cache never serves a stale one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AdapterRef {
    pub key: String,
    pub dir: PathBuf,
}

/// One completion to produce.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub adapter: Option<AdapterRef>,
    /// Return each token's log-probability with this many alternatives (OpenAI's
    /// `logprobs` / `top_logprobs`); None returns none.
    pub logprobs: Option<usize>,
    /// Constrain the output to JSON that matches this JSON Schema (OpenAI's
    /// `response_format`; `{"type": "object"}` for `json_object`).
    pub json_schema: Option<serde_json::Value>,
}

/// A token's log-probability under the model (before temperature), with the most likely
/// alternatives.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// What a request's stream carries, in order: tokens as they are sampled, then `Done` or
/// `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A sampled token and the text it makes certain (empty while a character or a
    /// possible stop string is incomplete).
    Token { id: u32, text: String, logprob: Option<TokenLogprob> },
    Done { finish: FinishReason, text: String, usage: Usage },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Invalid(String),
    /// The request's JSON Schema cannot be compiled into a grammar.
    #[error("the JSON schema cannot be used: {0}")]
    Schema(String),
    #[error("the scheduler has stopped")]
    Stopped,
    #[error("cancelled")]
    Cancelled,
}
