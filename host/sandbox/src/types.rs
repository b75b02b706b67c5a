//! The host's view of plugin data: plain Rust, independent of any WIT version.

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Formatter,
    Validator,
    Scorer,
    Judge,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Formatter, Kind::Validator, Kind::Scorer, Kind::Judge];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Formatter => "formatter",
            Kind::Validator => "validator",
            Kind::Scorer => "scorer",
            Kind::Judge => "judge",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a plugin says about itself, plus what the host measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub name: String,
    pub version: String,
    pub kind: Kind,
    pub description: String,
    /// The JSON Schema of its configuration.
    pub config_schema: serde_json::Value,
    /// The WIT package version it implements, e.g. `0.1.0`.
    pub wit_version: &'static str,
    /// sha256 of the component's bytes, hex.
    pub sha256: String,
    pub size_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub value: f64,
    pub details: Vec<(String, f64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    Chat(Vec<Message>),
    Completion { prompt: String, completion: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    pub score: f64,
    pub reason: String,
}

/// Who set a limit a call ran into, named in its error so the fix is plain: raise the
/// host's setting for that world, or the plugin's own request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSetBy {
    /// The host, for every plugin of this world.
    Host(Kind),
    /// The plugin's own request, below the host's (what a pack asked for).
    Request,
}

impl fmt::Display for LimitSetBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host(kind) => write!(f, "the host's limit for {kind} plugins"),
            Self::Request => f.write_str("the limit it asked for"),
        }
    }
}

/// Why one call into a plugin failed. The host and every other instance keep working.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("plugin `{plugin}` ran past its {limit:?} time limit ({set_by})")]
    Timeout { plugin: String, limit: Duration, set_by: LimitSetBy },
    #[error("plugin `{plugin}` ran out of fuel ({fuel} units)")]
    OutOfFuel { plugin: String, fuel: u64 },
    #[error("plugin `{plugin}` tried to grow its memory past the {limit_bytes}-byte cap ({set_by})")]
    MemoryExhausted { plugin: String, limit_bytes: usize, set_by: LimitSetBy },
    /// Its initial memory (data, zeroed statics, stack) alone is over the cap: no call
    /// can run.
    #[error("plugin `{plugin}` needs {needs_bytes} bytes of memory to start, over the {limit_bytes}-byte cap ({set_by})")]
    StartMemory { plugin: String, needs_bytes: usize, limit_bytes: usize, set_by: LimitSetBy },
    /// Instantiating it failed for another reason (a table over its limit, a trap in
    /// start-up code).
    #[error("plugin `{plugin}` could not start: {message}")]
    Start { plugin: String, message: String },
    #[error("plugin `{plugin}` overflowed its stack (unbounded recursion?)")]
    StackOverflow { plugin: String },
    #[error("plugin `{plugin}` panicked: {message}")]
    Panic { plugin: String, message: String },
    #[error("plugin `{plugin}` returned {bytes} bytes, more than the {limit_bytes}-byte cap ({set_by})")]
    OutputTooLarge { plugin: String, bytes: usize, limit_bytes: usize, set_by: LimitSetBy },
    #[error("plugin `{plugin}` rejected its configuration: {message}")]
    Config { plugin: String, message: String },
    #[error("plugin `{plugin}` trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin `{plugin}` is a {actual}, not a {expected}")]
    WrongKind { plugin: String, expected: Kind, actual: Kind },
}
