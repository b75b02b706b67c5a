use std::path::PathBuf;

use lathe_engine::{Device, LoadedModel};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture_dir() -> PathBuf {
    repo_root().join("tests/fixtures/smollm2")
}

/// The real SmolLM2 GGUF that `scripts/setup.sh` fetches (or `LATHE_SMOLLM2`).
pub fn smollm2_path() -> PathBuf {
    let p = std::env::var_os("LATHE_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

/// The device the tests run on: `LATHE_TEST_DEVICE` (`cpu` by default, `wgpu` in the GPU
/// pass of `scripts/test.sh`).
pub fn device() -> Device {
    let name = std::env::var("LATHE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    lathe_engine::device::parse_device(&name).unwrap_or_else(|e| panic!("LATHE_TEST_DEVICE: {e}"))
}

pub fn load_smollm2() -> LoadedModel {
    lathe_engine::load(&smollm2_path(), &device()).expect("SmolLM2 loads")
}

/// Reads a little-endian float32 `.npy` vector.
pub fn read_npy_f32(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'<f4'"), "{header}");
    bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}
