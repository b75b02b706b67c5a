//! Lathe's job layer: the workflow as a library. Pipelines ([`pipeline`]) compose the
//! engine (models, training), the sandbox (plugins) and the dataset store; each takes an
//! owned spec, reports through one [`Event`] type sent to a [`Sink`], and fails with a
//! typed [`JobError`]. Below them: the eval harness ([`eval`]), fine-tuning runs
//! ([`finetune`]), layered settings ([`settings`]) and the demo task ([`invoices`]).
//!
//! Knows nothing of HTTP; the CLI and the server call it and hold no workflow logic.

pub mod env;
pub mod error;
pub mod eval;
pub mod event;
pub mod finetune;
pub mod invoices;
pub mod pack;
pub mod pipeline;
pub mod plugins;
pub mod settings;

pub use env::Env;
pub use error::{ErrorKind, JobError, Result};
pub use event::{Event, Level, NullSink, Recorder, Sink};

/// The model the demo, the benchmarks and the CLI use when none is named; `scripts/setup.sh`
/// fetches it.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
