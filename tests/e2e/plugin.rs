use crate::*;

#[test]
fn a_new_scorer_builds_loads_and_scores() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "lathe {args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let made = run(&["plugin", "new", "--kind", "scorer", "has-answer"]);
    assert!(made.contains("created has-answer (scorer plugin, lathe:plugin@0.1.0)"), "{made}");
    // The crate carries its own copy of the SDK (the binary's), not a path into a checkout...
    let manifest = std::fs::read_to_string(dir.path().join("has-answer/Cargo.toml")).unwrap();
    assert!(manifest.contains(r#"lathe-plugin-sdk = { path = "lathe-plugin-sdk" }"#), "{manifest}");
    let wit = std::fs::read_to_string(dir.path().join("has-answer/lathe-plugin-sdk/wit/v0.1/plugin.wit")).unwrap();
    assert_eq!(wit, std::fs::read_to_string(repo_root().join("plugin-sdk/wit/v0.1/plugin.wit")).unwrap());
    // ...so it builds after moving somewhere else.
    std::fs::create_dir(dir.path().join("elsewhere")).unwrap();
    std::fs::rename(dir.path().join("has-answer"), dir.path().join("elsewhere/has-answer")).unwrap();
    let built = run(&["plugin", "build", "elsewhere/has-answer"]);
    assert!(built.contains("\"world\": \"lathe:plugin/scorer@0.1.0\""), "{built}");
    let wasm = built.lines().next().unwrap().trim().to_string();
    let tested = run(&[
        "plugin",
        "test",
        &wasm,
        "--input",
        r#"[{"prediction": "It is Paris.", "reference": "Paris"}, {"prediction": "Lyon", "reference": "Paris"}]"#,
    ]);
    let v: serde_json::Value = serde_json::from_str(&tested).unwrap();
    assert_eq!(v["scores"][0]["score"], 1.0);
    assert_eq!(v["scores"][1]["score"], 0.0);
    assert_eq!(v["aggregate"]["mean"], 0.5);
}

#[test]
fn builtins_can_be_inspected_and_tried() {
    let out = lathe(&["plugin", "inspect", "builtin:json-schema"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(info["world"], "lathe:plugin/validator@0.1.0");
    assert!(info["config_schema"]["required"][0] == "schema");

    let out = lathe(&[
        "plugin",
        "test",
        "builtin:json-schema",
        "--config",
        r#"{"schema": {"type": "object", "required": ["total"]}}"#,
        "--input",
        r#""{\"vendor\": 1}""#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["valid"], false);
    assert!(v["violations"][0]["message"].as_str().unwrap().contains("total"), "{v}");
}

#[test]
fn bad_plugins_and_configs_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").unwrap();
    let out = lathe(&["plugin", "inspect", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not WebAssembly"), "{}", stderr(&out));

    let out = lathe(&["plugin", "test", "builtin:regex-extract", "--config", "{}", "--input", "{}"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("`pattern`"), "{}", stderr(&out));

    let out = lathe(&["plugin", "inspect", "builtin:nope"]);
    assert!(stderr(&out).contains("no built-in plugin `nope`"), "{}", stderr(&out));
}

/// Python plugins (`lathe plugin new --lang python`, built with componentize-py) behave as
/// their Rust twins: for every world, the same scaffold in both languages, built, described
/// and tried on the same inputs, answers the same.
#[test]
fn python_plugins_answer_as_their_rust_twins() {
    let dir = tempfile::tempdir().unwrap();
    let componentize = repo_root().join(".venv/bin/componentize-py");
    assert!(componentize.exists(), "{} is missing: run scripts/setup.sh", componentize.display());
    let run = |cwd: &std::path::Path, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args(args)
            .current_dir(cwd)
            .env("LATHE_COMPONENTIZE_PY", &componentize)
            .output()
            .unwrap()
    };
    let cases: [(&str, &[&str]); 4] = [
        ("scorer", &[r#"[{"prediction": "It is Paris.", "reference": "Paris"}, {"prediction": "Lyon", "reference": "Paris"}]"#]),
        ("validator", &[r#"{"output": "   "}"#, r#"{"output": "ok"}"#]),
        ("formatter", &[r#"{"question": "2+2?", "answer": "4"}"#, r#"{"question": "2+2?"}"#]),
        ("judge", &[r#"{"input": "2+2?", "output": "4"}"#, r#"{"answer": "Yes, it is."}"#, r#"{"answer": "maybe"}"#]),
    ];
    for (kind, inputs) in cases {
        let mut answers = Vec::new();
        for lang in ["rust", "python"] {
            let home = dir.path().join(kind).join(lang);
            std::fs::create_dir_all(&home).unwrap();
            let made = run(&home, &["plugin", "new", "--kind", kind, "--lang", lang, "twin"]);
            assert!(made.status.success(), "{kind}/{lang}: {}", stderr(&made));
            let built = run(&home, &["plugin", "build", "twin"]);
            assert!(built.status.success(), "{kind}/{lang}: {}", stderr(&built));
            let out = stdout(&built);
            let (wasm, info) = out.split_once('\n').unwrap();
            let mut info: serde_json::Value = serde_json::from_str(info).unwrap();
            // The components differ (the Python one carries an interpreter); what they say
            // about themselves may not.
            let size = info.as_object_mut().unwrap().remove("size_bytes").unwrap();
            info.as_object_mut().unwrap().remove("sha256").unwrap();
            assert!(size.as_u64().unwrap() < 32 << 20, "{kind}/{lang}: {size} bytes, over the upload limit");
            let mut seen = Vec::new();
            for input in inputs {
                let tried = run(&home, &["plugin", "test", wasm.trim(), "--input", input]);
                seen.push(format!("{:?} {} {}", tried.status.code(), stdout(&tried), stderr(&tried)));
            }
            answers.push((info, seen));
        }
        assert_eq!(answers[0], answers[1], "{kind}: the Rust and the Python plugin answer differently");
        assert_eq!(answers[0].0["world"], format!("lathe:plugin/{kind}@0.1.0"), "{kind}");
    }
}

/// A Python scorer runs under the host's limits for scorers, set per world by the operator
/// (`LATHE_PLUGIN_<WORLD>_*`): its size, memory and time are each refused past the
/// scorer's limit with that limit and world in the error, while another world's limits
/// leave it alone.
#[test]
fn a_python_scorer_is_held_to_the_scorer_worlds_limits() {
    let dir = tempfile::tempdir().unwrap();
    let componentize = repo_root().join(".venv/bin/componentize-py");
    assert!(componentize.exists(), "{} is missing: run scripts/setup.sh", componentize.display());
    let run = |env: &[(&str, &str)], args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args(args)
            .current_dir(dir.path())
            .env("LATHE_COMPONENTIZE_PY", &componentize)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    assert!(run(&[], &["plugin", "new", "--kind", "scorer", "--lang", "python", "slow"]).status.success());
    // A scorer that spins on one input, so the deadline can be hit on purpose.
    let app = dir.path().join("slow/app.py");
    let source = std::fs::read_to_string(&app).unwrap();
    let spinning = source.replacen(
        "    def score(self, prediction: str, reference: str) -> types.Score:\n",
        "    def score(self, prediction: str, reference: str) -> types.Score:\n        while prediction == \"spin\":\n            pass\n",
        1,
    );
    assert_ne!(spinning, source, "the scaffold's score method moved");
    std::fs::write(&app, spinning).unwrap();
    let built = run(&[], &["plugin", "build", "slow"]);
    assert!(built.status.success(), "{}", stderr(&built));
    let wasm = stdout(&built).lines().next().unwrap().trim().to_string();
    let size_mb = std::fs::metadata(dir.path().join(&wasm)).unwrap().len() >> 20;
    let pair = r#"[{"prediction": "Paris", "reference": "Paris"}]"#;
    let spin = r#"[{"prediction": "spin", "reference": "Paris"}]"#;

    let ok = run(&[], &["plugin", "test", &wasm, "--input", pair]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    // Size: the scorer world's cap refuses it; the validator world's does not touch it.
    let small = (size_mb / 2).to_string();
    let e = run(&[("LATHE_PLUGIN_SCORER_MAX_COMPONENT_MB", &small)], &["plugin", "test", &wasm, "--input", pair]);
    assert!(!e.status.success());
    let msg = stderr(&e);
    assert!(msg.contains(&format!("{}-byte cap for scorer plugins", (size_mb / 2) << 20)), "{msg}");
    let other = run(&[("LATHE_PLUGIN_VALIDATOR_MAX_COMPONENT_MB", &small)], &["plugin", "test", &wasm, "--input", pair]);
    assert!(other.status.success(), "{}", stderr(&other));

    // Memory: the interpreter's heap does not fit in 4 MiB.
    let e = run(&[("LATHE_PLUGIN_SCORER_MEMORY_MB", "4")], &["plugin", "test", &wasm, "--input", pair]);
    assert!(!e.status.success());
    let msg = stderr(&e);
    assert!(msg.contains(&format!("{}-byte cap (the host's limit for scorer plugins)", 4 << 20)), "{msg}");

    // Time: the spinning input runs into the scorer world's deadline.
    let e = run(&[("LATHE_PLUGIN_SCORER_TIMEOUT_MS", "300")], &["plugin", "test", &wasm, "--input", spin]);
    assert!(!e.status.success());
    let msg = stderr(&e);
    assert!(msg.contains("300ms time limit (the host's limit for scorer plugins)"), "{msg}");

    // A setting that is not one is named, with the world's section.
    let e = run(&[("LATHE_PLUGIN_SCORER_MEMORY", "4")], &["plugin", "test", &wasm, "--input", pair]);
    assert!(stderr(&e).contains("LATHE_PLUGIN_SCORER_") && stderr(&e).contains("`memory`"), "{}", stderr(&e));
}
