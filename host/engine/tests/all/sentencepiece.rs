//! SentencePiece GGUF vocabularies (`tokenizer.ggml.model = llama`: Llama 2, Mistral)
//! tokenize as the `sentencepiece` package does. `scripts/make_spm_fixture.py` trains a small
//! BPE model configured as Llama 2's was and reports its pieces and its own ids for texts
//! with Unicode, code and runs of whitespace; the test writes the pieces as GGUF metadata,
//! the way llama.cpp's converter does, and compares.

use lathe_engine::Tokenizer;
use lathe_engine::gguf::{GgufFile, GgufWriter, Value};
use serde_json::Value as Json;

use crate::common::repo_root;

fn fixture(dir: &std::path::Path) -> Json {
    let out = std::process::Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("scripts/make_spm_fixture.py"))
        .arg(dir)
        .output()
        .expect(".venv/bin/python runs (scripts/setup.sh makes it, with sentencepiece)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn array(values: impl Iterator<Item = Value>) -> Value {
    Value::Array(values.collect())
}

#[test]
fn sentencepiece_gguf_vocabularies_tokenize_as_sentencepiece_does() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path());
    let list = |k: &str| f[k].as_array().unwrap().clone();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("tokenizer.ggml.model", Value::String("llama".into()))
        .meta("tokenizer.ggml.tokens", array(list("pieces").iter().map(|p| Value::String(p.as_str().unwrap().into()))))
        .meta("tokenizer.ggml.scores", array(list("scores").iter().map(|s| Value::F32(s.as_f64().unwrap() as f32))))
        .meta("tokenizer.ggml.token_type", array(list("types").iter().map(|t| Value::I32(t.as_i64().unwrap() as i32))))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(f["bos"].as_u64().unwrap() as u32))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(f["eos"].as_u64().unwrap() as u32))
        .meta("tokenizer.ggml.unknown_token_id", Value::U32(f["unk"].as_u64().unwrap() as u32))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(true));
    let path = dir.path().join("spm.gguf");
    w.write(&path).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();

    let cases = list("cases");
    assert!(cases.len() >= 8);
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        // Decoding gives the text back (byte fallback included), as sentencepiece's does.
        assert_eq!(tok.decode(&want, true).unwrap(), text, "{want:?}");
    }
    // The BOS token comes first when asked for, as `add_bos_token` says.
    let with_bos = tok.encode("total", true).unwrap();
    assert_eq!(with_bos[0], f["bos"].as_u64().unwrap() as u32);
}
