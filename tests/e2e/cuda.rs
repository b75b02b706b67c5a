//! The GPU build (`cargo build --profile dist -p lathe --features cuda,wgpu`, which
//! `scripts/test.sh` runs before the tests): it starts anywhere and, on a machine without an
//! NVIDIA driver, refuses `--device cuda` with an error naming what is missing.

use std::path::PathBuf;
use std::process::Command;

use lathe_engine::config::Architecture;

use crate::*;

/// `LATHE_CUDA_BINARY`, else `dist/lathe` beside the target folder of this test's binary.
fn cuda_binary() -> PathBuf {
    let path = std::env::var_os("LATHE_CUDA_BINARY").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_BIN_EXE_lathe")).parent().unwrap().parent().unwrap().join("dist/lathe")
    });
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --profile dist -p lathe --features cuda,wgpu` (scripts/test.sh does)",
        path.display()
    );
    path
}

#[test]
fn cuda_build_names_what_is_missing_without_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = lathe_engine::tiny::write_tiny(dir.path(), Architecture::Llama, 1).unwrap();
    let out = Command::new(cuda_binary())
        .args(["generate", "--model", tiny.gguf.to_str().unwrap(), "--prompt", "the thin", "--max-tokens", "4"])
        .args(["--device", "cuda"])
        .output()
        .unwrap();
    let err = stderr(&out);
    if std::path::Path::new("/dev/nvidiactl").exists() {
        // A machine with an NVIDIA driver: the build must simply work.
        assert!(out.status.success(), "{err}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "a clear error, not a crash or a success: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("cuda") && err.contains("CUDA did not start"), "{err}");
    // What is missing, by name: the loader's own words (cudarc's, on a thread of cubecl's),
    // with the library names it tried, not a secondary error from the thread that waited.
    assert!(err.contains(r#"Unable to dynamically load the "cuda" shared library"#), "{err}");
    assert!(err.contains("libcuda.so"), "{err}");
    // The same binary still runs on the CPU.
    let out = Command::new(cuda_binary())
        .args(["generate", "--model", tiny.gguf.to_str().unwrap(), "--prompt", "the thin", "--max-tokens", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}
