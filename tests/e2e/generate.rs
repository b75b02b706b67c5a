use std::process::Command;

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

/// Every quantized kernel this CPU runs (AMX, AVX-512, AVX2, the portable loops) decodes the same
/// greedy answer as transformers; a kernel the CPU cannot run is refused by name.
#[test]
fn every_cpu_kernel_decodes_the_greedy_answer() {
    let model = smollm2();
    let chat = |kernel: &str| {
        Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args(["generate", "--model", model.to_str().unwrap(), "--system", "You are a helpful assistant."])
            .args(["--chat", "What is the capital of France? Answer in one sentence.", "--threads", "2"])
            .env("LATHE_CPU_KERNEL", kernel)
            .output()
            .unwrap()
    };
    let has = |flag: &str| std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.split_whitespace().any(|w| w == flag));
    let mut kernels = vec!["portable"];
    if has("avx2") && has("fma") {
        kernels.push("avx2");
        if has("avx512f") {
            kernels.push("avx512");
            if has("amx_bf16") && has("amx_tile") && has("avx512_bf16") {
                kernels.push("amx");
            }
        }
    }
    for kernel in kernels {
        let out = chat(kernel);
        assert!(out.status.success(), "{kernel}: {}", stderr(&out));
        assert_eq!(stdout(&out), "The capital of France is Paris.\n", "{kernel}");
    }
    let out = chat("sse9");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("LATHE_CPU_KERNEL=sse9: this CPU runs") && stderr(&out).contains("portable"), "{}", stderr(&out));
}

/// The decode loops run on the spinning team by default and on rayon with
/// `LATHE_SPIN_US=0`: the same greedy answer either way, and a value that is not a number of
/// microseconds is refused by name.
#[test]
fn decode_on_the_spinning_team_or_on_rayon_gives_the_greedy_answer() {
    let model = smollm2();
    let chat = |spin: &str| {
        Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args(["generate", "--model", model.to_str().unwrap(), "--system", "You are a helpful assistant."])
            .args(["--chat", "What is the capital of France? Answer in one sentence.", "--threads", "2"])
            .env("LATHE_SPIN_US", spin)
            .output()
            .unwrap()
    };
    for spin in ["0", "50", "2000"] {
        let out = chat(spin);
        assert!(out.status.success(), "LATHE_SPIN_US={spin}: {}", stderr(&out));
        assert_eq!(stdout(&out), "The capital of France is Paris.\n", "LATHE_SPIN_US={spin}");
    }
    let out = chat("soon");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("LATHE_SPIN_US=\"soon\": expected whole microseconds"), "{}", stderr(&out));
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

/// `bench generate --vs-llamacpp` measures Lathe, then runs the llama.cpp anchor with the
/// same settings; where the anchor's package is missing, the error names the script and
/// the command that installs it, after Lathe's own figures. A GPU cannot be anchored by a
/// CPU build of llama.cpp, and is refused before anything loads.
#[test]
fn bench_generate_against_llamacpp_names_the_missing_anchor() {
    let args = ["bench", "generate", "--batch", "1", "--prompt-tokens", "16", "--decode-tokens", "4", "--repeat", "1", "--threads", "2", "--vs-llamacpp"];
    let python = std::env::temp_dir().join("lathe-no-such-python");
    let out = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(args)
        .env("LATHE_ANCHOR_PYTHON", "python3")
        .current_dir(crate::repo_root())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).lines().any(|l| l.trim_start().starts_with("1 ")), "Lathe's batch 1 first: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("scripts/bench_llamacpp.py failed") && err.contains("scripts/anchor_llamacpp.sh") && err.contains("No module named"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_lathe")).args(args).env("LATHE_ANCHOR_PYTHON", &python).current_dir(crate::repo_root()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("running {} scripts/bench_llamacpp.py", python.display())), "{}", stderr(&out));

    let out = lathe(&[&args[..], &["--device", "wgpu"]].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--vs-llamacpp measures llama.cpp on the CPU; it cannot anchor --device wgpu"), "{}", stderr(&out));
}

#[test]
fn synthetic_models_take_the_asked_shape_and_pass_parity() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("synthetic");
    let out = lathe(&[
        "bench", "synthetic-model", "--like", smollm2().to_str().unwrap(), "--hidden", "128", "--heads", "4",
        "--kv-heads", "2", "--layers", "2", "--intermediate", "256", "--out", out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["hidden_size"], 128);
    assert_eq!(config["num_hidden_layers"], 2);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["head_dim"], 32);
    // SmolLM2's vocabulary and tokenizer came along: 49152 × 128 embeddings, tied.
    assert_eq!(config["vocab_size"], 49152);
    assert!(stdout(&out).contains("7 M parameters"), "{}", stdout(&out));

    let out = lathe(&[
        "bench", "parity", "--model", out_dir.to_str().unwrap(), "--prompt-tokens", "16", "--new-tokens", "6", "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let p: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(p["holds"], true, "{p}");
    assert_eq!(p["positions"], 16);
    assert_eq!(p["greedy_cpu"].as_array().unwrap().len(), 6);

    let out = lathe(&["bench", "synthetic-model", "--hidden", "100", "--heads", "3", "--out", out_dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--hidden 100 is not a multiple of --heads 3"), "{}", stderr(&out));
}

/// A synthetic Llama of a few hundred MB written as Q4_K_M (Q4_K, with Q6_K for the tied
/// head and some value and down projections) decodes from its K-quant blocks as the file
/// holds them: resident memory at the end of decoding, and at its peak while generating,
/// stays under 1.3× the file's size (expanded to f32 it would be 1.5 GB).
#[test]
fn a_q4_k_m_llama_decodes_within_1_3_times_its_file_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic.Q4_K_M.gguf");
    let p = path.to_str().unwrap();
    let out = lathe(&["bench", "synthetic-model", "--hidden", "1536", "--intermediate", "4096", "--layers", "12", "--heads", "12", "--kv-heads", "4", "--gguf", "q4_k_m", "--out", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("378 M parameters"), "{}", stdout(&out));
    let file = lathe_engine::gguf::GgufFile::open(&path).unwrap();
    assert_eq!(file.tensor_info("blk.0.ffn_up.weight").unwrap().dtype, lathe_engine::gguf::GgmlType::Q4_K);
    assert_eq!(file.tensor_info("token_embd.weight").unwrap().dtype, lathe_engine::gguf::GgmlType::Q6_K);
    drop(file);

    let out = lathe(&["bench", "generate", "--model", p, "--batch", "1", "--prompt-tokens", "16", "--decode-tokens", "8", "--repeat", "1", "--threads", "2", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run: serde_json::Value = serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    let (rss, size) = (run["rss_mib"].as_f64().unwrap(), run["model_file_mib"].as_f64().unwrap());
    assert!(size > 200.0, "the file is {size:.0} MiB");
    assert!(rss < 1.3 * size, "resident {rss:.0} MiB while decoding a {size:.0} MiB file");
    let peak = run["peak_rss_mib"].as_f64().unwrap();
    assert!(peak >= rss && peak < 1.3 * size, "a peak of {peak:.0} MiB while generating from a {size:.0} MiB file");
    assert!(run["tg_tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// `lathe generate ... | head -c 10`: when the reader of its output goes away, the command
/// ends with status 0 and no panic message (Rust ignores SIGPIPE, so printing to the closed
/// pipe panicked).
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let model = smollm2();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(["generate", "--model", model.to_str().unwrap(), "--chat", "Name three colours.", "--max-tokens", "8", "--threads", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The read end closes before the model has loaded, so every write meets a closed pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}
