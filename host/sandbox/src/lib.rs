//! Lathe's plugin runtime (wasmtime). Task logic that teams upload — formatters,
//! validators, scorers, LLM-judge prompts — runs here as WebAssembly components that
//! implement a world of the `lathe:plugin` WIT package (`plugin-sdk/wit/`).
//!
//! - [`Runtime::load`] checks an upload (size, a component, a known world at an accepted
//!   version), compiles it once and caches the machine code by sha256, so a restart does
//!   not recompile.
//! - [`Plugin::instance`] makes an [`Instance`]: configured once, then called many times.
//!   Each call runs under a CPU deadline (epoch interruption), optional fuel, a memory cap
//!   and a cap on what it may return; a trap fails that call with a [`CallError`] that
//!   says which limit or fault, and the next call gets a fresh instance.
//! - Plugins get no filesystem, network, environment or sockets: WASI with nothing granted.
//! - Calls are synchronous and CPU-bound. Async code calls through
//!   [`Plugin::call_blocking`] (tokio's blocking pool), so a plugin running to its deadline
//!   never stalls an executor; [`Plugin::score_batch_parallel`] spreads a batch over cores.
//!
//! The rest of Lathe sees plain Rust types ([`Score`], [`Violation`], ...), never wasmtime's.

mod builtin;
mod runtime;
pub mod sdk;
mod types;
mod v0_1;

pub use builtin::{BUILTIN_PLUGINS, builtin, builtin_names};
pub use runtime::{Instance, Limits, LoadError, Plugin, Runtime, RuntimeConfig};
pub use types::*;
