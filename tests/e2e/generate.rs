use lathe_engine::config::Architecture;

use crate::*;

#[test]
fn chat_on_smollm2_streams_the_greedy_answer() {
    let model = smollm2();
    let out = lathe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--system",
        "You are a helpful assistant.",
        "--chat",
        "What is the capital of France? Answer in one sentence.",
        "--threads",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // transformers' greedy generate stops at <|im_end|> after this sentence.
    assert_eq!(stdout(&out), "The capital of France is Paris.\n");
    assert!(stderr(&out).contains("32 prompt tokens, 7 generated, Stop"), "{}", stderr(&out));
}

#[test]
fn sampling_flags_reach_the_sampler() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = lathe_engine::tiny::write_tiny(dir.path(), Architecture::Llama, 1).unwrap();
    let model = tiny.gguf.to_str().unwrap();
    let run = |seed: &str| {
        let out = lathe(&[
            "generate", "--model", model, "--prompt", "the thin", "--max-tokens", "16", "--temperature", "1.0",
            "--top-p", "0.9", "--seed", seed,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn bad_input_exits_non_zero_with_a_message_naming_it() {
    let out = lathe(&["generate", "--model", "/nonexistent/m.gguf", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/m.gguf"), "{}", stderr(&out));

    let out = lathe(&["generate", "--model", "m.gguf", "--prompt", "x", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown device kind `tpu`"), "{}", stderr(&out));

    let out = lathe(&["generate", "--model", "m.gguf"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--prompt"), "{}", stderr(&out));
}
