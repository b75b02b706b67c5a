//! Bad model files give errors that name the file and the field, never a panic.

use lathe_engine::config::Architecture;
use lathe_engine::gguf::{GgmlType, GgufWriter, Value};
use lathe_engine::tiny::write_tiny;
use lathe_engine::EngineError;

use crate::common::device;

fn load_err(path: &std::path::Path) -> String {
    match lathe_engine::load(path, &device()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_and_corrupt_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Llama, 1).unwrap();
    let bytes = std::fs::read(&tiny.gguf).unwrap();
    for cut in [10, 1000, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = load_err(&p);
        assert!(e.contains(&p.display().to_string()) && e.contains("truncated"), "cut at {cut}: {e}");
    }
    let p = dir.path().join("not.gguf");
    std::fs::write(&p, b"PK\x03\x04 this is a zip").unwrap();
    assert!(load_err(&p).contains("not a GGUF file"));
}

#[test]
fn unsupported_architecture_and_tensor_type_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gpt2.gguf");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("gpt2".into()));
    w.tensor("token_embd.weight", &[4, 32], GgmlType::F32, &[0.0; 128]);
    w.write(&p).unwrap();
    let e = load_err(&p);
    assert!(e.contains("general.architecture") && e.contains("`gpt2`"), "{e}");

    // A tensor of type Q5_0 (ggml 6), which Lathe does not read: patch the type id of a
    // Q8_0 tensor in the directory.
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()));
    w.tensor("blk.0.attn_q.weight", &[32, 32], GgmlType::Q8_0, &[0.5; 1024]);
    let mut bytes = w.to_bytes();
    let name_end = bytes.windows(19).position(|s| s == b"blk.0.attn_q.weight").unwrap() + 19;
    let ty_at = name_end + 4 + 2 * 8;
    assert_eq!(bytes[ty_at..ty_at + 4], 8u32.to_le_bytes());
    bytes[ty_at..ty_at + 4].copy_from_slice(&6u32.to_le_bytes());
    let p = dir.path().join("q5_0.gguf");
    std::fs::write(&p, bytes).unwrap();
    let e = load_err(&p);
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("Q5_0"), "{e}");
}

#[test]
fn hugging_face_folder_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Mistral, 1).unwrap();
    let hf = &tiny.hf_folder;

    std::fs::rename(hf.join("tokenizer.json"), dir.path().join("aside.json")).unwrap();
    let e = load_err(hf);
    assert!(e.contains("missing `tokenizer.json`"), "{e}");
    std::fs::rename(dir.path().join("aside.json"), hf.join("tokenizer.json")).unwrap();

    let cfg_path = hf.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, cfg.replace("MistralForCausalLM", "GPTNeoXForCausalLM")).unwrap();
    let e = load_err(hf);
    assert!(e.contains("config.json") && e.contains("GPTNeoXForCausalLM"), "{e}");

    std::fs::write(&cfg_path, "{\"hidden_size\": 64").unwrap();
    assert!(load_err(hf).contains("malformed config.json"));

    // A shape that disagrees with the config names the tensor.
    std::fs::write(&cfg_path, cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96")).unwrap();
    let e = load_err(hf);
    assert!(e.contains("gate_proj.weight") && e.contains("shape"), "{e}");
}

#[test]
fn a_missing_file_is_an_io_error_with_its_path() {
    let e = lathe_engine::load(std::path::Path::new("/nonexistent/model.gguf"), &device()).unwrap_err();
    assert!(matches!(e, EngineError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/model.gguf"));
}
