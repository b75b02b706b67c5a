//! The metrics behind Lathe's built-in scorer plugins, as plain Rust with no WebAssembly
//! in sight: each plugin in `plugins/` is a thin wrapper over one of these functions, and
//! the host's benchmark runs them natively to measure what the sandbox costs.

pub mod classification;
pub mod json_fields;
pub mod text;

/// A score in [0, 1] and its per-field detail.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub value: f64,
    pub details: Vec<(String, f64)>,
}

impl Score {
    pub fn of(value: f64) -> Self {
        Self {
            value,
            details: Vec::new(),
        }
    }
}
