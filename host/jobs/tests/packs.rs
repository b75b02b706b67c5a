//! Eval packs: built deterministically from a source folder, verified on every read (a
//! changed byte, a leak, an unlisted plugin are refused), held against the host's limits,
//! installed into a data folder with their plugins pinned.

use std::path::Path;

use lathe_jobs::eval::Plugins;
use lathe_jobs::pack::shipped::Template;
use lathe_jobs::pack::{LocalPacks, Pack};
use lathe_jobs::{Env, NullSink};
use lathe_sandbox::{Runtime, RuntimeConfig};

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig { cache_dir: lathe_jobs::env::default_plugin_cache(), ..RuntimeConfig::default() }).unwrap()
}

fn source(dir: &Path, template: Template) -> std::path::PathBuf {
    let src = dir.join(format!("src-{}", template.name()));
    template.write(&src, None).unwrap();
    src
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn err(r: lathe_jobs::Result<impl std::fmt::Debug>) -> String {
    r.expect_err("should have been refused").to_string()
}

#[test]
fn the_same_source_builds_the_same_bytes_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    for t in [Template::Blank, Template::InvoiceExtraction, Template::SupportTriage, Template::GroundedQa] {
        let src = source(dir.path(), t);
        let a = Pack::build(&src, &rt).unwrap();
        // A second folder written from the same template builds the very same bytes.
        let again = dir.path().join(format!("again-{}", t.name()));
        t.write(&again, None).unwrap();
        assert_eq!(Pack::build(&again, &rt).unwrap(), a, "{}", t.name());
        assert_eq!(t.build(&rt).unwrap(), a, "the catalogue's build of {} differs", t.name());

        let pack = Pack::read(&a).unwrap();
        assert_eq!(pack.sha256, lathe_util::sha256_hex(&a));
        assert_eq!(pack.manifest.name, t.name());
        let d = pack.describe();
        assert_eq!(d["sha256"], pack.sha256.as_str());
        assert!(!pack.data(lathe_jobs::pack::DataRole::Heldout).is_empty());
        // Every suite reference is pinned to a plugin the pack carries, the judge's too.
        for s in &pack.suites {
            let judge = s.judge.iter().map(|j| (&j.plugin, &j.sha256));
            for (name, sha) in s.scorers.iter().chain(s.validator.iter()).map(|r| (&r.plugin, &r.sha256)).chain(judge) {
                let sha = sha.as_deref().expect("pinned");
                assert!(pack.plugin_bytes(sha).is_some(), "{name} pins {sha}");
            }
        }
    }
}

#[test]
fn a_pack_with_any_byte_changed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Pack::build(&source(dir.path(), Template::Blank), &runtime()).unwrap();
    // The manifest and the headers byte by byte, the rest (the component) at a stride.
    let positions: Vec<usize> = (0..4096.min(bytes.len())).chain((4096..bytes.len()).step_by(251)).chain([bytes.len() - 1]).collect();
    for i in positions {
        let mut t = bytes.clone();
        t[i] = t[i].wrapping_add(1);
        assert!(Pack::read(&t).is_err(), "a change at byte {i} of {} was accepted", bytes.len());
    }
    let mut short = bytes.clone();
    short.truncate(bytes.len() - 512);
    assert!(Pack::read(&short).is_err());
}

#[test]
fn plugins_that_ask_for_more_than_the_host_allows_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let allowed = rt.config().limits_for(lathe_sandbox::Kind::Scorer);
    let (memory_mb, timeout_ms) = (allowed.memory_bytes >> 20, allowed.timeout.as_millis());
    let src = source(dir.path(), Template::Blank);
    let ok = Pack::read(&Pack::build(&src, &rt).unwrap()).unwrap();
    assert_eq!(ok.check(&rt).unwrap().len(), 1);

    edit(&src.join("pack.toml"), "memory_mb = 16", "memory_mb = 4096");
    let pack = Pack::read(&Pack::build(&src, &rt).unwrap()).unwrap();
    let e = err(pack.check(&rt));
    assert!(e.contains("plugin `exact-match`") && e.contains("4096 MiB") && e.contains(&format!("scorer plugins at most {memory_mb} MiB")), "{e}");

    edit(&src.join("pack.toml"), "memory_mb = 4096", "memory_mb = 16\nnetwork = true");
    let pack = Pack::read(&Pack::build(&src, &rt).unwrap()).unwrap();
    let e = err(pack.check(&rt));
    assert!(e.contains("plugin `exact-match`") && e.contains("network"), "{e}");

    edit(&src.join("pack.toml"), "network = true\ntimeout_ms = 500", "timeout_ms = 600000");
    let e = err(Pack::read(&Pack::build(&src, &rt).unwrap()).unwrap().check(&rt));
    assert!(e.contains("600000 ms") && e.contains(&format!("scorer plugins at most {timeout_ms} ms")), "{e}");
}

#[test]
fn a_source_that_leaks_or_names_an_unlisted_plugin_does_not_build() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let src = source(dir.path(), Template::Blank);
    let heldout = std::fs::read_to_string(src.join("data/heldout.jsonl")).unwrap();
    let first = heldout.lines().next().unwrap();
    std::fs::write(src.join("data/fewshot.jsonl"), format!("{first}\n")).unwrap();
    let e = err(Pack::build(&src, &rt));
    assert!(e.contains("leakage") && e.contains("What is 2 + 2?"), "{e}");

    let src = dir.path().join("unlisted");
    Template::Blank.write(&src, Some("unlisted")).unwrap();
    edit(&src.join("suites/answers.json"), "\"exact-match\"", "\"token-f1\"");
    let e = err(Pack::build(&src, &rt));
    assert!(e.contains("`token-f1`") && e.contains("does not list"), "{e}");

    let src = dir.path().join("badname");
    assert!(Template::Blank.write(&src, Some("Bad Name")).is_err());
}

#[test]
fn an_installed_pack_runs_with_its_pinned_plugins_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let bytes = Pack::build(&source(dir.path(), Template::SupportTriage), &rt).unwrap();
    let env = Env::new(dir.path().join("data"), lathe_engine::Device::flex());
    let local = LocalPacks::new(&env);
    let installed = local.install(&bytes, &NullSink).unwrap();
    assert_eq!(installed.suites, ["triage"]);
    assert_eq!(local.list().unwrap()["support-triage"].sha256, lathe_util::sha256_hex(&bytes));
    assert_eq!(std::fs::read(local.file("support-triage").unwrap()).unwrap(), bytes, "export gives back the installed bytes");

    // The data are versions with the roles the baseline needs, under the pack's names.
    let store = env.datasets().unwrap();
    let heldout = store.resolve("packs/support-triage/heldout").unwrap();
    assert_eq!(lathe_jobs::eval::heldout_items(&store, &heldout).unwrap().len(), 60);
    let pool = store.resolve("packs/support-triage/fewshot").unwrap();
    assert_eq!(lathe_jobs::eval::train_items(&store, &pool).unwrap().len(), 20);

    // The suite is found by name and loads its pinned plugin.
    let suite = local.suite("triage").unwrap();
    let pinned = suite.scorers[0].sha256.clone().unwrap();
    Plugins::load(&env, &suite).unwrap();

    // It runs held to what the pack asked for (32 MiB, 1 s), not the host's 64 MiB.
    let r = &suite.scorers[0];
    let p = env.plugin_ref(&r.plugin, r.sha256.as_deref(), r.limits, lathe_sandbox::Kind::Scorer).unwrap();
    assert_eq!((p.limits().memory_bytes, p.limits().timeout), (32 << 20, std::time::Duration::from_millis(1000)));

    // Pinned to other bytes, the same name is refused with both hashes.
    let mut other = suite.clone();
    other.scorers[0].sha256 = Some("0".repeat(64));
    let e = err(Plugins::load(&env, &other).map(|_| ()));
    assert!(e.contains(&"0".repeat(64)) && e.contains(&pinned), "{e}");

    // Installing the same pack again changes nothing.
    let again = local.install(&bytes, &NullSink).unwrap();
    assert_eq!(again, installed);
}

#[test]
fn a_new_version_diffs_against_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let src = source(dir.path(), Template::Blank);
    let v1 = Pack::read(&Pack::build(&src, &rt).unwrap()).unwrap();
    edit(&src.join("pack.toml"), "version = \"1.0.0\"", "version = \"1.1.0\"");
    edit(&src.join("data/heldout.jsonl"), "Paris", "Paris, France");
    let v2 = Pack::read(&Pack::build(&src, &rt).unwrap()).unwrap();
    let d = v2.diff(&v1);
    assert_eq!(d["from"]["version"], "1.0.0");
    assert_eq!(d["to"]["version"], "1.1.0");
    assert_eq!(d["data"]["changed"][0]["name"], "heldout");
    assert_eq!(d["plugins"]["changed"].as_array().unwrap().len(), 0);
    assert_eq!(d["suites"]["changed"].as_array().unwrap().len(), 0);
}

/// A pack's cached judge verdicts are checked when built and read, land in the judge cache
/// when installed (once: a second install adds none), and count as data in a diff.
#[test]
fn cached_verdicts_install_into_the_judge_cache_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let src = source(dir.path(), Template::GroundedQa);
    let v1 = Pack::read(&Pack::build(&src, &rt).unwrap()).unwrap();
    let shipped = v1.verdicts().len();
    assert!(shipped > 0 && v1.manifest.verdicts.as_ref().unwrap().rows == shipped as u64);

    let env = Env::new(dir.path().join("data"), lathe_engine::Device::flex());
    let local = LocalPacks::new(&env);
    local.install(&Pack::build(&src, &rt).unwrap(), &NullSink).unwrap();
    let mut cache = lathe_jobs::eval::judge::VerdictCache::open(&env.judge_cache()).unwrap();
    assert_eq!(cache.add_all(v1.verdicts()).unwrap(), 0, "every verdict is in the cache");
    local.install(&Pack::build(&src, &rt).unwrap(), &NullSink).unwrap();
    let lines = std::fs::read_to_string(env.judge_cache()).unwrap().lines().count();
    assert_eq!(lines, shipped, "a second install adds nothing");

    // A changed verdict is other data: a new version's diff says so.
    let path = src.join("data/verdicts.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let mut v: serde_json::Value = serde_json::from_str(first).unwrap();
    v["score"] = serde_json::json!(0.5);
    std::fs::write(&path, format!("{v}\n{rest}")).unwrap();
    edit(&src.join("pack.toml"), "version = \"1.0.0\"", "version = \"1.0.1\"");
    let v2 = Pack::read(&Pack::build(&src, &rt).unwrap()).unwrap();
    assert_eq!(v2.diff(&v1)["data"]["changed"][0]["name"], "verdicts");

    // Not a verdict, or the same key twice with different verdicts: refused, with the line.
    std::fs::write(&path, format!("{first}\n{{\"key\": \"x\"}}\n")).unwrap();
    let e = err(Pack::build(&src, &rt));
    assert!(e.contains("data/verdicts.jsonl line 2"), "{e}");
    std::fs::write(&path, format!("{first}\n{v}\n")).unwrap();
    let e = err(Pack::build(&src, &rt));
    assert!(e.contains("line 2") && e.contains("two different verdicts"), "{e}");
}

/// The data check runs the pack's pinned validator and its report names that exact
/// component, as an eval run does.
#[test]
fn the_data_check_records_the_validators_hash() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let env = Env::new(dir.path().join("data"), lathe_engine::Device::flex());
    let local = LocalPacks::new(&env);
    local.install(&Pack::build(&source(dir.path(), Template::InvoiceExtraction), &rt).unwrap(), &NullSink).unwrap();
    let suite = local.suite("invoice-fields").unwrap();
    let validator = suite.validator.clone().expect("the invoice suite validates outputs");
    let sha = validator.sha256.clone().expect("pinned");
    let spec = lathe_jobs::pipeline::data::CurateSpec {
        version: "packs/invoice-extraction/heldout".into(),
        dedupe: false,
        near: None,
        pii: None,
        validator: Some(validator),
        drop_invalid: false,
        name: None,
    };
    let out = lathe_jobs::pipeline::data::curate(&env, &spec, &NullSink).unwrap();
    let report = out.validation.unwrap();
    assert_eq!(report.validator, format!("json-schema@sha256:{sha}"));
    assert_eq!(report.checked, 40);
    assert_eq!(report.passed, 40, "the pack's own references match its schema: {:?}", report.failures);
}
