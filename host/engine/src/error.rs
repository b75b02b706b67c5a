//! The engine's one error type. Every variant names the file (or source) and the field
//! that was wrong, so a user can act on the message without reading code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file exists but its bytes are not what the format says (truncated, corrupt).
    #[error("{path}: malformed {format} file: {detail}")]
    Malformed {
        path: PathBuf,
        format: &'static str,
        detail: String,
    },

    /// A field the engine needs is absent.
    #[error("{path}: missing `{field}`")]
    Missing { path: PathBuf, field: String },

    /// A field is present but holds something the engine cannot use.
    #[error("{path}: unsupported `{field}`: {detail}")]
    Unsupported {
        path: PathBuf,
        field: String,
        detail: String,
    },

    #[error("tokenizer ({source_name}): {detail}")]
    Tokenizer { source_name: String, detail: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("generation: {0}")]
    Generation(String),

    #[error("device `{0}`: {1}")]
    Device(String, String),

    /// A training step could not be computed (the device failed mid-step: out of memory).
    #[error("training step: {0}")]
    Step(String),

    /// Training was asked to stop; the checkpoint of this step is on disk.
    /// A checkpoint was written but could not be kept where the caller keeps them (an
    /// object store); the run stops, its local checkpoint intact.
    #[error("checkpoint {}: {detail}", path.display())]
    CheckpointKept { path: PathBuf, detail: String },
    #[error("training stopped at step {step}; its checkpoint is kept")]
    Interrupted { step: usize },
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// [`lathe_util::write_atomic`], its error naming the file.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    lathe_util::write_atomic(path, bytes).map_err(|e| EngineError::io(path, e))
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
