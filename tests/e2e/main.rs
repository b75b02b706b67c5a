//! End-to-end tests: run the real `lathe` binary and check what a user sees.

mod cuda;
mod generate;
// PostgreSQL for the tests: the store's throwaway cluster (or LATHE_TEST_POSTGRES_URL's).
#[allow(dead_code)]
#[path = "../../host/store/tests/all/harness.rs"]
mod harness;
mod hosts;
mod packs;
mod plugin;
#[path = "../../host/store/tests/all/s3_server.rs"]
mod s3_server;
mod service;
mod web;
mod workflow;

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn smollm2() -> PathBuf {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

/// Runs `lathe ARGS` from the repository root.
pub fn lathe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("lathe runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
