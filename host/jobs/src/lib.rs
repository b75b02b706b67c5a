//! Lathe's pipelines, composed from the engine (models, training), the sandbox (plugins)
//! and the dataset store: evaluation suites and reports, the prompted baseline,
//! fine-tuning runs with early stopping on the task metric, and the demo task.
//!
//! Knows nothing of HTTP; the CLI and (later) the server call it.

pub mod demo;
pub mod eval;
pub mod finetune;
