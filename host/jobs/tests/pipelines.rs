//! The job layer through its pipelines, on a tiny random model and the real plugins:
//! owned specs in, typed outcomes and events out, bad suites refused before any
//! generation, cancelled training resumable.

use std::path::{Path, PathBuf};

use lathe_engine::config::Architecture;
use lathe_jobs::eval::{Item, Plugins, PluginRef, Subject, Suite};
use lathe_jobs::pipeline::data::{ImportSpec, SplitSpec};
use lathe_jobs::pipeline::eval::{BaselineSpec, EvalSpec};
use lathe_jobs::pipeline::train::TrainSpec;
use lathe_jobs::settings::TrainSettings;
use lathe_jobs::{Env, ErrorKind, Event, JobError, NullSink, Recorder};

struct Project {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    env: Env,
}

fn project(n: usize) -> Project {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let tiny = lathe_engine::tiny::write_tiny(&root.join("model"), Architecture::Llama, 3).unwrap();
    let words = ["the", "thin", "cat", "sat", "in", "hat", "he", "ran", "tin", "then"];
    let mut text = String::new();
    for i in 0..n {
        let w = format!("{} {}", words[i % words.len()], words[(i * 7 + 3) % words.len()]);
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("say {w} {i}")},
            {"role": "assistant", "content": format!("{w} {i}")},
        ]});
        text.push_str(&format!("{line}\n"));
    }
    std::fs::write(root.join("data.jsonl"), text).unwrap();
    let env = Env::new(root.join("home"), lathe_engine::Device::flex());
    Project { model: tiny.gguf, env, root, _dir: dir }
}

fn suite(scorer: &str, config: serde_json::Value, gate: Option<&str>) -> Suite {
    let mut s = serde_json::json!({
        "name": "words",
        "templates": [{"name": "plain", "user": "{{ input }}"}],
        "scorers": [{"plugin": scorer, "config": config}],
        "shots": [0],
        "max_tokens": 4
    });
    if let Some(g) = gate {
        s["gate"] = serde_json::json!({"metric": g, "min": 0.5});
    }
    Suite::from_json(&s.to_string()).unwrap()
}

/// A plugin from the sandbox's hostile set, built by its build script beside this test's
/// target folder (`<target>/wasm-plugins`).
fn hostile(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap();
    let path = target.join("wasm-plugins/wasm32-wasip2/release").join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.is_file(), "{} is missing: build lathe-sandbox first (its build script makes it)", path.display());
    path
}

#[test]
fn a_gate_on_a_metric_no_scorer_produces_is_refused_when_the_suite_loads() {
    let p = project(0);
    let e = Plugins::load(&p.env, &suite("exact-match", serde_json::json!({}), Some("accuracy"))).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let msg = e.to_string();
    assert!(msg.contains("`accuracy`") && msg.contains("`exact-match`"), "{msg}");
    // `valid` exists only with a validator.
    let e = Plugins::load(&p.env, &suite("exact-match", serde_json::json!({}), Some("valid"))).err().unwrap();
    assert!(e.to_string().contains("no scorer produces"), "{e}");
    assert!(Plugins::load(&p.env, &suite("exact-match", serde_json::json!({}), Some("exact-match"))).is_ok());
}

#[test]
fn a_metric_is_named_by_what_its_plugin_declares_not_by_its_file_name() {
    let p = project(0);
    let path = p.root.join("my-scorer.wasm");
    std::fs::write(&path, lathe_sandbox::builtin("exact-match").unwrap()).unwrap();
    let s = suite(path.to_str().unwrap(), serde_json::json!({}), None);
    let plugins = Plugins::load(&p.env, &s).unwrap();
    assert_eq!(plugins.primary_metric(), "exact-match");
    let s = suite(path.to_str().unwrap(), serde_json::json!({}), Some("exact-match"));
    assert!(Plugins::load(&p.env, &s).is_ok());
}

#[test]
fn a_score_that_is_nan_or_outside_0_1_is_refused_naming_the_plugin_and_item() {
    let p = project(0);
    let m = lathe_engine::load(&p.model, p.env.device()).unwrap();
    let subject = Subject::base(&m, "tiny");
    let items: Vec<Item> = (0..3).map(|i| Item { input: format!("say {i}"), reference: format!("{i}"), label: None }).collect();
    let bad = hostile("hostile-bad-score");
    for value in [serde_json::json!(1.5), serde_json::json!(-0.1), serde_json::json!("nan")] {
        let s = suite(bad.to_str().unwrap(), serde_json::json!({ "value": value }), None);
        let plugins = Plugins::load(&p.env, &s).unwrap();
        let e = lathe_jobs::eval::run(&subject, &s, &plugins, &s.templates[0], &[], &items, None, &NullSink, "eval").unwrap_err();
        assert!(matches!(e, JobError::BadScore { item: 0, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("hostile-bad-score") && msg.contains("item 0") && msg.contains("[0, 1]"), "{msg}");
    }
}

#[test]
fn pipelines_report_their_steps_and_a_cancelled_training_resumes_from_its_checkpoint() {
    let p = project(40);
    let events = Recorder::default();
    let imported = lathe_jobs::pipeline::data::import(
        &p.env,
        &ImportSpec { file: p.root.join("data.jsonl"), name: Some("words".into()), ..ImportSpec::default() },
        &events,
    )
    .unwrap();
    assert_eq!(imported.report.rows, 40);
    let split = lathe_jobs::pipeline::data::split(
        &p.env,
        &SplitSpec { version: "words".into(), heldout: 0.2, seed: 1, stratify: true, name: Some("words".into()) },
        &events,
    )
    .unwrap();
    assert!(split.leakage.exact.is_empty());
    let s = suite("exact-match", serde_json::json!({}), Some("exact-match"));
    let base = lathe_jobs::pipeline::eval::baseline(
        &p.env,
        &BaselineSpec { model: p.model.clone(), suite: s.clone(), data: "words.heldout".into(), train: "words.train".into(), limit: Some(4) },
        &events,
    )
    .unwrap();
    assert_eq!(base.baseline.best.items.len(), 4);
    assert!(base.path.is_file());

    let got = events.events();
    let started = got.iter().filter(|e| matches!(e, Event::StepStarted { .. })).count();
    let finished = got.iter().filter(|e| matches!(e, Event::StepFinished { .. })).count();
    assert_eq!(started, finished, "every step that starts finishes: {got:?}");
    assert!(got.iter().any(|e| matches!(e, Event::Progress { done: 4, total: 4, .. })), "{got:?}");
    assert!(got.iter().any(|e| matches!(e, Event::Artifact { kind, .. } if kind == "run")), "{got:?}");
    // Events serialise for the job-events table and the browser.
    let json = serde_json::to_value(&got[0]).unwrap();
    assert_eq!(json["type"], "step_started");

    // Training: cancelled after its first step, it checkpoints; resumed, it finishes the
    // same run with the same adapter as one never stopped.
    let settings = TrainSettings { rank: 4, max_steps: 4, batch_size: 4, learning_rate: 1e-3, metric_items: 0, save_every: 2, ..TrainSettings::default() };
    let spec = |out: &Path, resume: bool| TrainSpec {
        model: p.model.clone(),
        data: "words.train".into(),
        suite: s.clone(),
        template: None,
        out: Some(out.to_path_buf()),
        settings: settings.clone(),
        resume,
    };
    let whole = Recorder::default();
    let full = lathe_jobs::pipeline::train::train(&p.env, &spec(&p.root.join("full"), false), &whole).unwrap();
    let losses = whole.events().iter().filter(|e| matches!(e, Event::Metric { series, .. } if series == "train/loss")).count();
    assert_eq!(losses, 4);

    let cancelled = Recorder::default();
    cancelled.cancel();
    let e = lathe_jobs::pipeline::train::train(&p.env, &spec(&p.root.join("cut"), false), &cancelled).unwrap_err();
    assert!(matches!(e, JobError::Cancelled), "{e}");
    assert!(p.root.join("cut/checkpoints/step-00000001").is_dir());
    let resumed = lathe_jobs::pipeline::train::train(&p.env, &spec(&p.root.join("cut"), true), &NullSink).unwrap();
    assert_eq!(resumed.best().history, full.best().history);
    let bytes = |d: &Path| std::fs::read(d.join("last/adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&p.root.join("cut")), bytes(&p.root.join("full")));

    // The adapter evaluates through the same pipeline.
    let out = lathe_jobs::pipeline::eval::run(
        &p.env,
        &EvalSpec {
            model: p.model.clone(),
            adapter: Some(full.adapter_dir.clone()),
            suite: s,
            data: "words.heldout".into(),
            template: None,
            shots: 0,
            train: None,
            limit: Some(4),
        },
        &NullSink,
    )
    .unwrap();
    assert_eq!(out.run.adapter.as_deref(), Some(full.adapter_dir.to_str().unwrap()));
}

#[test]
fn bad_specs_fail_with_the_kind_a_server_maps_to_a_status() {
    let p = project(10);
    let missing = lathe_jobs::pipeline::data::split(
        &p.env,
        &SplitSpec { version: "nope".into(), heldout: 0.2, seed: 0, stratify: true, name: None },
        &NullSink,
    )
    .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    let bad_template = lathe_jobs::pipeline::eval::run(
        &p.env,
        &EvalSpec {
            model: p.model.clone(),
            adapter: None,
            suite: suite("exact-match", serde_json::json!({}), None),
            data: "x".into(),
            template: Some("fancy".into()),
            shots: 0,
            train: None,
            limit: None,
        },
        &NullSink,
    )
    .unwrap_err();
    assert!(bad_template.to_string().contains("no template `fancy`; it has `plain`"), "{bad_template}");
    let formatter = ImportSpec {
        file: p.root.join("data.jsonl"),
        formatter: Some(PluginRef::new("exact-match", serde_json::json!({}))),
        ..ImportSpec::default()
    };
    let e = lathe_jobs::pipeline::data::import(&p.env, &formatter, &NullSink).unwrap_err();
    assert!(e.to_string().contains("it is a scorer, but a formatter is needed"), "{e}");
}
