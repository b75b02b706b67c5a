//! Builds the WebAssembly plugins this crate ships or tests against, with a nested
//! `cargo build --target wasm32-wasip2 --release`:
//! - `plugins/` (the built-in plugins), embedded through `OUT_DIR/builtin_plugins.rs`;
//! - `tests/hostile/` (plugins that misbehave on purpose), whose paths the tests read
//!   from `OUT_DIR/hostile_plugins.rs`.
//!
//! Their own target folder sits beside this build's (`<target>/wasm-plugins`), so the
//! nested cargo never waits on the outer one's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<crate>-<hash>/out.
    let target = out.ancestors().nth(4).expect("OUT_DIR is inside a target folder").join("wasm-plugins");
    let root = manifest.join("../..");
    for watched in ["plugins", "plugin-sdk"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", manifest.join("tests/hostile").display());

    let builtins = build(&root.join("plugins"), &target);
    write_list(&out.join("builtin_plugins.rs"), "BUILTIN_PLUGINS", &builtins, true);
    let hostile = build(&manifest.join("tests/hostile"), &target);
    write_list(&out.join("hostile_plugins.rs"), "HOSTILE_PLUGINS", &hostile, false);
}

/// Builds every cdylib of the workspace at `dir`; returns (crate name, .wasm path).
fn build(dir: &Path, target: &Path) -> Vec<(String, PathBuf)> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--workspace", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(target)
        .current_dir(dir)
        // The outer build's settings are for the host, not for wasm.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("running cargo for the wasm plugins");
    assert!(
        status.success(),
        "building the plugins in {} failed (is the wasm32-wasip2 target installed? scripts/setup.sh adds it)",
        dir.display()
    );
    let mut crates = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let manifest = path.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else { continue };
        if !text.contains("cdylib") {
            continue;
        }
        let name = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = \"").and_then(|r| r.strip_suffix('"')))
            .expect("a package name")
            .to_string();
        let wasm = target.join("wasm32-wasip2/release").join(format!("{}.wasm", name.replace('-', "_")));
        assert!(wasm.exists(), "{} was not built", wasm.display());
        crates.push((name, wasm));
    }
    crates.sort();
    crates
}

fn write_list(path: &Path, name: &str, crates: &[(String, PathBuf)], embed: bool) {
    let mut s = String::new();
    if embed {
        s.push_str(&format!("/// (name, component bytes)\npub static {name}: &[(&str, &[u8])] = &[\n"));
        for (n, p) in crates {
            s.push_str(&format!("    ({n:?}, include_bytes!({:?})),\n", p.display().to_string()));
        }
    } else {
        s.push_str(&format!("/// (name, path of the .wasm)\npub static {name}: &[(&str, &str)] = &[\n"));
        for (n, p) in crates {
            s.push_str(&format!("    ({n:?}, {:?}),\n", p.display().to_string()));
        }
    }
    s.push_str("];\n");
    std::fs::write(path, s).unwrap();
}
