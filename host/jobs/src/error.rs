//! The job layer's one error type. Each variant says what was wrong and where, and
//! [`JobError::kind`] sorts them for callers that must answer differently (the server
//! maps kinds to status codes; the CLI prints the message).

use std::path::PathBuf;

use lathe_data::DataError;
use lathe_engine::EngineError;
use lathe_sandbox::{CallError, LoadError};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is wrong: a spec field, a suite, a setting. Nothing was computed.
    #[error("{0}")]
    Invalid(String),

    /// Something the request names does not exist.
    #[error("{what} `{id}` does not exist{hint}")]
    NotFound { what: &'static str, id: String, hint: String },

    #[error(transparent)]
    Data(#[from] DataError),

    #[error(transparent)]
    Engine(#[from] EngineError),

    /// A plugin could not be loaded (refused at upload, or the wrong kind).
    #[error("plugin `{plugin}`: {message}")]
    PluginLoad { plugin: String, message: String },

    /// A plugin call failed on one item.
    #[error("plugin `{plugin}` on item {item}: {source}")]
    PluginCall {
        plugin: String,
        item: usize,
        #[source]
        source: CallError,
    },

    /// A scorer returned a value that cannot be averaged: NaN, infinite, or outside [0, 1].
    #[error("plugin `{plugin}` scored item {item} as {value}: a score must be a finite number in [0, 1]")]
    BadScore { plugin: String, item: usize, value: f64 },

    #[error("judge: {0}")]
    Judge(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The job was asked to stop; what it had saved (a checkpoint) is kept.
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = JobError> = std::result::Result<T, E>;

/// How a caller should treat an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong (HTTP 400/422).
    Invalid,
    /// Something named does not exist (HTTP 404).
    NotFound,
    /// The job was cancelled (HTTP 409).
    Cancelled,
    /// Lathe or its machine failed (HTTP 500); retrying may help.
    Internal,
}

impl JobError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound { what, id: id.into(), hint: String::new() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub fn plugin_load(plugin: &str, e: LoadError) -> Self {
        Self::PluginLoad { plugin: plugin.to_string(), message: e.to_string() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            // A plugin that traps, loops or misbehaves is the uploader's to fix.
            Self::Invalid(_) | Self::PluginLoad { .. } | Self::PluginCall { .. } | Self::BadScore { .. } => ErrorKind::Invalid,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Cancelled => ErrorKind::Cancelled,
            Self::Data(e) => match e {
                DataError::Io { .. } | DataError::CorruptVersion { .. } => ErrorKind::Internal,
                DataError::VersionNotFound { .. } | DataError::UnknownRef { .. } => ErrorKind::NotFound,
                _ => ErrorKind::Invalid,
            },
            Self::Engine(e) => match e {
                EngineError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                EngineError::Io { .. } | EngineError::Device(..) | EngineError::Generation(_) | EngineError::CheckpointKept { .. } => ErrorKind::Internal,
                // A step the device could not compute (out of memory) needs other settings.
                EngineError::Step(_) => ErrorKind::Invalid,
                _ => ErrorKind::Invalid,
            },
            Self::Judge(_) | Self::Io { .. } => ErrorKind::Internal,
        }
    }
}

impl From<minijinja::Error> for JobError {
    fn from(e: minijinja::Error) -> Self {
        Self::Invalid(format!("prompt template: {e}"))
    }
}
