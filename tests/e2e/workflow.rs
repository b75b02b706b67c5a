//! The workflow commands end to end: `lathe data`, `lathe train` (killed and resumed),
//! `lathe export`, `lathe eval`, and the demo on SmolLM2.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lathe_engine::config::Architecture;

use crate::*;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A small chat dataset the tiny model can learn from: "say X" → "X".
fn tiny_dataset(path: &Path, n: usize) {
    let words = ["the", "thin", "cat", "sat", "in", "hat", "he", "ran", "tin", "then"];
    let mut text = String::new();
    for i in 0..n {
        let w = format!("{} {}", words[i % words.len()], words[(i * 7 + 3) % words.len()]);
        text.push_str(&serde_json::json!({"messages": [
            {"role": "user", "content": format!("say {w} {i}")},
            {"role": "assistant", "content": format!("{w} {i}")},
        ]}).to_string());
        text.push('\n');
    }
    write(path, &text);
}

#[test]
fn data_import_names_the_format_and_a_bad_line_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let home_s = home.to_str().unwrap();
    let good = dir.path().join("good.jsonl");
    tiny_dataset(&good, 20);
    let out = lathe(&["data", "import", good.to_str().unwrap(), "--name", "words", "--data-dir", home_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("detected openai_chat"), "{}", stdout(&out));
    assert!(stdout(&out).contains("20 rows"), "{}", stdout(&out));

    let bad = dir.path().join("bad.jsonl");
    write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n{\"prompt\": \"e\", \"completion\": 7}\n",
    );
    let out = lathe(&["data", "import", bad.to_str().unwrap(), "--data-dir", home_s]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("line 3") && err.contains("completion"), "{err}");

    // Only the good import is in the store.
    let out = lathe(&["data", "show", "--data-dir", home_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));

    // Any other shape goes through a formatter plugin, whose errors name the record.
    let custom = dir.path().join("custom.jsonl");
    write(&custom, "{\"q\": \"2+2\", \"a\": \"4\"}\n{\"q\": \"3+3\", \"a\": \"6\"}\n");
    let config = r#"{"user": "q", "assistant": "a"}"#;
    let out = lathe(&["data", "import", custom.to_str().unwrap(), "--formatter", "chat-formatter", "--formatter-config", config, "--data-dir", home_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("detected chat-formatter") && stdout(&out).contains("2 rows"), "{}", stdout(&out));
    write(&custom, "{\"q\": \"2+2\", \"a\": \"4\"}\n{\"q\": \"3+3\"}\n");
    let out = lathe(&["data", "import", custom.to_str().unwrap(), "--formatter", "chat-formatter", "--formatter-config", config, "--data-dir", home_s]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));
    let out = lathe(&["data", "show", "--data-dir", home_s]);
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));

    let out = lathe(&["data", "split", "words", "--heldout", "0.2", "--name", "words", "--data-dir", home_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("leakage check: 0 exact, 0 near"), "{}", stdout(&out));
    let out = lathe(&["data", "show", "words.heldout", "--data-dir", home_s]);
    assert!(stdout(&out).contains("\"role\": \"heldout\""), "{}", stdout(&out));
}

struct TinyProject {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    model: String,
    suite: String,
    home: String,
}

fn tiny_project(n: usize) -> TinyProject {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    // Mistral: its RoPE has no GGUF-only scaling, so merged exports can go to config.json.
    let tiny = lathe_engine::tiny::write_tiny(&root.join("model"), Architecture::Mistral, 3).unwrap();
    let data = root.join("data.jsonl");
    tiny_dataset(&data, n);
    let home = root.join("home").to_str().unwrap().to_string();
    let out = lathe(&["data", "import", data.to_str().unwrap(), "--name", "words", "--data-dir", &home]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = lathe(&["data", "split", "words", "--name", "words", "--data-dir", &home]);
    assert!(out.status.success(), "{}", stderr(&out));
    let suite = root.join("suite.json");
    write(
        &suite,
        &serde_json::json!({
            "name": "words",
            "templates": [{"name": "plain", "user": "{{ input }}"}],
            "scorers": [{"plugin": "exact-match"}],
            "shots": [0],
            "max_tokens": 8
        })
        .to_string(),
    );
    TinyProject {
        _dir: dir,
        model: tiny.gguf.to_str().unwrap().to_string(),
        suite: suite.to_str().unwrap().to_string(),
        home,
        root,
    }
}

fn train_args<'a>(p: &'a TinyProject, out: &'a str) -> Vec<&'a str> {
    vec![
        "train", "--model", &p.model, "--data", "words.train", "--suite", &p.suite, "--out", out, "--data-dir", &p.home,
        "--epochs", "60", "--batch-size", "4", "--rank", "4", "--lr", "1e-3", "--save-every", "20", "--metric-items", "2",
        "--eval-every", "20", "--patience", "0", "--threads", "1",
    ]
}

/// Bytes a folder's files take on tmpfs (whole 4 KiB pages each).
fn pages_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096) * 4096).sum()
}

/// A run whose output folder is a filesystem the test makes (tmpfs, in a mount namespace of
/// its own) with room for one checkpoint and a half: the second checkpoint fills it. The run
/// stops with an error naming the file and the cause, the first checkpoint is whole, no
/// partial one is listed, and the run resumed from it elsewhere ends on the unhindered
/// run's adapter, bit for bit.
#[test]
fn a_disk_filling_up_mid_checkpoint_stops_the_run_clearly_and_keeps_the_last_checkpoint() {
    let p = tiny_project(40);
    let mut args = train_args(&p, "OUT");
    for (flag, value) in [("--rank", "32"), ("--eval-every", "100000")] {
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
    }
    let a = p.root.join("a");
    let run = |out: &str, extra: &[&str]| {
        let mut full: Vec<&str> = args.iter().map(|a| if *a == "OUT" { out } else { a }).collect();
        full.extend_from_slice(extra);
        full.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let out = lathe(&run(a.to_str().unwrap(), &[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    // The run keeps only its newest checkpoints; they all have the same files and sizes.
    let first = "checkpoints/step-00000020";
    let newest = std::fs::read_dir(a.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).max().unwrap();
    let checkpoint = pages_of(&newest);
    assert!(checkpoint > 256 << 10, "a checkpoint of {checkpoint} bytes is too small to size the disk by");
    let size_kib = (checkpoint + checkpoint / 2 + (128 << 10)) / 1024;

    // In a mount namespace of its own: a tmpfs of that size, the run into it, and a copy of
    // what it left on the real disk.
    let small = p.root.join("small");
    let kept = p.root.join("kept");
    std::fs::create_dir_all(&small).unwrap();
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    let mut unshare = Command::new("unshare");
    if !root {
        unshare.args(["--user", "--map-root-user"]);
    }
    let script = r#"set -e; mount -t tmpfs -o "size=$1k" tmpfs "$2"; shift 2; kept=$1; out=$2; shift 2
        set +e; "$@"; echo $? > "$kept.status"; cp -a "$out" "$kept""#;
    let b_args = run(small.join("b").to_str().unwrap(), &[]);
    let out = unshare
        .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(size_kib.to_string())
        .arg(&small)
        .arg(&kept)
        .arg(small.join("b"))
        .arg(env!("CARGO_BIN_EXE_lathe"))
        .args(&b_args)
        .current_dir(repo_root())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "the namespace and its tmpfs (`unshare`, `mount`): {err}");
    let status = std::fs::read_to_string(kept.with_extension("status")).unwrap();
    assert_eq!(status.trim(), "1", "the run fails with the disk full: {err}");
    assert!(err.contains("No space left on device") && err.contains("checkpoints"), "the error names the cause and the place: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // The first checkpoint is whole (its weights and optimizer state at their full size,
    // the state readable; the resume below reads it all), the second absent.
    for name in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let copy = kept.join(first).join(name);
        assert_eq!(std::fs::metadata(&copy).map(|m| m.len()).ok(), Some(std::fs::metadata(newest.join(name)).unwrap().len()), "{}", copy.display());
    }
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kept.join(first).join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 20, "{state}");
    assert!(!kept.join("checkpoints/step-00000040").exists(), "no partial checkpoint is listed");
    assert!(!kept.join("last").exists());

    // With room again (the same files on the real disk), the run resumes to the end.
    let out = lathe(&run(kept.to_str().unwrap(), &["--resume"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    let f = "last/adapter_model.safetensors";
    assert_eq!(std::fs::read(kept.join(f)).unwrap(), std::fs::read(a.join(f)).unwrap(), "the resumed run ends elsewhere");
}

#[test]
fn a_training_run_killed_with_sigkill_resumes_onto_the_same_curve_and_bits() {
    let p = tiny_project(40);
    let a = p.root.join("a");
    let a_s = a.to_str().unwrap();
    let out = lathe(&train_args(&p, a_s));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("adapter:"), "{}", stdout(&out));
    let history = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let steps = history.lines().filter(|l| l.starts_with("{\"train\"")).count();
    assert!(steps > 100, "{steps} steps");

    // Run b is killed once its first checkpoint exists (and before it is done).
    let b = p.root.join("b");
    let b_s = b.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(train_args(&p, b_s))
        .current_dir(repo_root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = b.join("checkpoints/step-00000020");
    let t = Instant::now();
    while !first.exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was killed before it finished");
    assert!(!b.join("last").exists());

    let mut args = train_args(&p, b_s);
    args.push("--resume");
    let out = lathe(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(b.join("metrics.jsonl")).unwrap(), history, "the resumed curve differs");
    for f in ["last/adapter_model.safetensors", "best/adapter_model.safetensors"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f} differs");
    }
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("last/run.json")).unwrap()).unwrap();
    assert_eq!(run["config"]["lora"]["rank"], 4);
    assert_eq!(run["base_model_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(run["dataset"].as_str().unwrap().len(), 64);
    assert_eq!(run["chat_template_sha256"].as_str().unwrap().len(), 64);
    // The tokenizer's own template, which serving compares with the base it runs over.
    assert_eq!(run["tokenizer_template_sha256"].as_str().unwrap().len(), 64);
    assert_ne!(run["tokenizer_template_sha256"], run["chat_template_sha256"]);

    // Exports: merged folders and GGUFs load and answer as the base + adapter does.
    let adapter = format!("{a_s}/last");
    let generate = |model: &str, adapter: Option<&str>| {
        let mut args = vec!["generate", "--model", model, "--chat", "say the cat 3", "--max-tokens", "6"];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let out = lathe(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let adapted = generate(&p.model, Some(&adapter));
    assert_ne!(adapted, generate(&p.model, None), "the adapter changes the answer");
    // (This model's rows are not whole 256-value blocks: q4_k_m falls back to Q8_0, as llama.cpp does.)
    for (format, file) in [("hf", "merged-hf"), ("gguf-f16", "merged-f16.gguf"), ("gguf-q8_0", "merged-q8.gguf"), ("gguf-q4_k_m", "merged-q4km.gguf")] {
        let path = p.root.join(file);
        let out = lathe(&["export", "--model", &p.model, "--adapter", &adapter, "--format", format, "--out", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = generate(path.to_str().unwrap(), None);
        if !format.starts_with("gguf-q") {
            assert_eq!(text, adapted, "{format} export answers differently from base + adapter");
        }
    }
}

/// `--bf16` through the job layer, which loads the base with its projections in bf16
/// (`load_bf16_base`): the run says what they take, and it trains to the end; with
/// `--qlora` too, it says the blocks are expanded to bf16.
#[test]
fn a_bf16_run_loads_its_base_in_bf16_and_trains() {
    let p = tiny_project(40);
    let out_dir = p.root.join("bf16");
    let mut args = train_args(&p, out_dir.to_str().unwrap());
    let at = args.iter().position(|a| *a == "--epochs").unwrap();
    args[at + 1] = "5";
    args.push("--bf16");
    let out = lathe(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("bf16: the frozen base multiplies in bf16 ("), "{said}");
    assert!(!said.contains("(0.0 MiB of projections)"), "{said}");
    assert!(stdout(&out).contains("adapter:"), "{}", stdout(&out));

    // Under QLoRA the base loads in f32 to be quantized; the products expand its blocks.
    let out_dir = p.root.join("qlora-bf16");
    let at = args.iter().position(|a| *a == "--out").unwrap();
    args[at + 1] = out_dir.to_str().unwrap();
    args.push("--qlora");
    let out = lathe(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("QLoRA: the frozen projections are 4-bit blocks") && said.contains("(the 4-bit blocks expanded to bf16 for each product)"), "{said}");
}

#[test]
fn eval_runs_compare_and_report_on_the_same_items() {
    let p = tiny_project(30);
    let run = |extra: &[&str]| {
        let mut args = vec!["eval", "run", "--model", &p.model, "--suite", &p.suite, "--data", "words.heldout", "--data-dir", &p.home];
        args.extend_from_slice(extra);
        let out = lathe(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let s = stdout(&out);
        assert!(s.contains("exact-match:"), "{s}");
        s.lines().find_map(|l| l.strip_prefix("run ")).unwrap().to_string()
    };
    let zero = run(&[]);
    let one = run(&["--shots", "1", "--train", "words.train"]);
    let out = lathe(&["eval", "compare", &zero, &one]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("verdict: ") && stdout(&out).contains("— exact-match "), "{}", stdout(&out));
    let report = p.root.join("report");
    let out = lathe(&["eval", "report", "--baseline", &zero, "--candidate", &one, "--out", report.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let html = std::fs::read_to_string(report.with_extension("html")).unwrap();
    assert!(html.contains("Verdict:") && html.contains("<svg"), "{html}");
    assert!(!html.contains("<script"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report.with_extension("json")).unwrap()).unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 2);

    // Shots without a training version are refused: they may only come from the train part.
    let out = lathe(&["eval", "run", "--model", &p.model, "--suite", &p.suite, "--data", "words.heldout", "--shots", "2", "--data-dir", &p.home]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("training part"), "{}", stderr(&out));
    // A training version cannot be evaluated as held-out.
    let out = lathe(&["eval", "run", "--model", &p.model, "--suite", &p.suite, "--data", "words.train", "--data-dir", &p.home]);
    assert!(!out.status.success());
}

#[test]
fn the_demo_on_smollm2_beats_the_prompted_baseline_and_writes_a_report() {
    let model = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let out = lathe(&[
        "demo", "--model", model.to_str().unwrap(), "--data-dir", dir.path().to_str().unwrap(), "--examples", "100",
        "--eval-items", "12", "--zero-shot-only", "--max-steps", "10", "--threads", "2", "--no-serve",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    for stage in ["1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7"] {
        assert!(text.contains(&format!("== {stage}")), "{text}");
    }
    assert!(text.contains("verdict: BETTER"), "{text}");
    assert!(text.contains("forgetting: "), "the regression pack ran: {text}");
    // It ran as a job of a project in the store, under the data folder.
    let line = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no `{prefix}` line: {text}")).trim().to_string();
    let project = line("project: ").split(' ').next().unwrap().to_string();
    let project_dir = dir.path().join("projects").join(&project);
    assert!(dir.path().join("lathe.db").is_file());
    let report_json = std::path::PathBuf::from(line("report:  ").replace(".html", ".json"));
    assert!(report_json.starts_with(&project_dir), "{}", report_json.display());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    let metric = |i: usize| runs[i]["metrics"]["json-field-match"]["mean"].as_f64().unwrap();
    assert!(metric(1) > metric(0), "fine-tune {} vs baseline {}", metric(1), metric(0));
    assert_eq!(report["comparison"]["comparison"]["verdict"], "better");
    // The fine-tune merged and quantized: int8 and int4 each evaluated on the same items,
    // and what each step cost.
    let labels: Vec<&str> = runs.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["base + best prompt", "fine-tune", "fine-tune int8 (Q8_0)", "fine-tune int4 (Q4_1)"], "{report}");
    let steps: Vec<&str> = report["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["fine-tune", "quantize to int8 (Q8_0)", "quantize to int4 (Q4_1)"], "{report}");
    assert!(metric(2) > metric(0), "int8 keeps the fine-tune's lead over the prompt: {} vs {}", metric(2), metric(0));
    let bytes = |i: usize| runs[i]["weights"]["bytes"].as_u64().unwrap();
    assert!(bytes(3) < bytes(2) && runs[1]["weights"]["adapter_bytes"].as_u64().unwrap() > 0, "{report}");
    for run in &runs[2..4] {
        assert!(run["passed_gate"].is_boolean() && run["adapter"].is_null(), "{run}");
    }
    assert!(!report["training"].as_array().unwrap().is_empty());
    let html = std::fs::read_to_string(report_json.with_extension("html")).unwrap();
    assert!(html.contains("<svg") && !html.contains("<script") && html.contains("What each step costs"));
    assert!(std::fs::read_dir(project_dir.join("runs")).unwrap().next().is_some());
    assert!(std::fs::read_dir(project_dir.join("datasets")).unwrap().count() >= 3, "import, curate and split versions");
}

/// A minimal OpenAI-compatible `chat/completions` server on a local port: it answers every
/// request with a fixed verdict and counts the requests it got.
fn judge_server(verdict: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(request_line.starts_with("POST /v1/chat/completions"), "{request_line}");
            assert_eq!(req["model"], "grader");
            assert_eq!(req["temperature"], 0);
            seen.fetch_add(1, Ordering::SeqCst);
            let answer = serde_json::json!({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).to_string();
            let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}", answer.len());
        }
    });
    (url, count)
}

#[test]
fn an_llm_judge_on_an_openai_endpoint_scores_and_its_verdicts_replay_from_the_cache() {
    let p = tiny_project(30);
    let (url, requests) = judge_server(r#"{"score": 8, "reason": "mostly right"}"#);
    let suite = p.root.join("judged.json");
    write(
        &suite,
        &serde_json::json!({
            "name": "words-judged",
            "templates": [{"name": "plain", "user": "{{ input }}"}],
            "scorers": [{"plugin": "exact-match"}],
            "judge": {"plugin": "llm-judge", "config": {"min": 1, "max": 10},
                      "model": {"kind": "openai", "base_url": url, "model": "grader"}},
            "shots": [0],
            "max_tokens": 8
        })
        .to_string(),
    );
    let run = || {
        let out = lathe(&["eval", "run", "--model", &p.model, "--suite", suite.to_str().unwrap(), "--data", "words.heldout", "--data-dir", &p.home]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let first = run();
    let asked = requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(asked > 0, "{first}");
    // (8 - 1) / (10 - 1) for every item.
    assert!(first.contains("judge: 0.778"), "{first}");
    assert!(first.contains(&format!("judge: {asked} verdicts asked, 0 replayed")), "{first}");

    let second = run();
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), asked, "a re-score asks the judge nothing");
    assert!(second.contains(&format!("judge: 0 verdicts asked, {asked} replayed")), "{second}");
    assert!(second.contains("judge: 0.778"), "{second}");
}
