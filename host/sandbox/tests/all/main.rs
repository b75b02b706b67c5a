//! The sandbox's integration tests, on real components built from `plugins/` and
//! `tests/hostile/` by the build script.

mod builtins;
mod hostile;

use lathe_sandbox::{Plugin, Runtime, RuntimeConfig};

include!(concat!(env!("OUT_DIR"), "/hostile_plugins.rs"));

pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).unwrap()
}

pub fn builtin(rt: &Runtime, name: &str) -> Plugin {
    rt.load(lathe_sandbox::builtin(name).unwrap_or_else(|| panic!("no built-in `{name}`")))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn hostile_bytes(name: &str) -> Vec<u8> {
    let path = HOSTILE_PLUGINS
        .iter()
        .find(|(n, _)| *n == format!("hostile-{name}"))
        .unwrap_or_else(|| panic!("no hostile plugin `{name}`"))
        .1;
    std::fs::read(path).unwrap()
}
