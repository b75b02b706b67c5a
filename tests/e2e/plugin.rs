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
