//! Eval packs as a user meets them: written, built, inspected, installed from the CLI and
//! through the server into a fresh project, run as a baseline on SmolLM2 both ways with the
//! same result; a pack with one byte changed, or whose plugin asks for network or more
//! memory than allowed, refused by both.

use std::path::Path;

use serde_json::{Value, json};

use crate::service::Service;
use crate::{lathe, smollm2, stderr, stdout};

fn ok(args: &[&str]) -> String {
    let o = lathe(args);
    assert!(o.status.success(), "lathe {args:?} failed:\n{}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn refused(args: &[&str]) -> String {
    let o = lathe(args);
    assert_eq!(o.status.code(), Some(1), "lathe {args:?} should have failed:\n{}{}", stdout(&o), stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    stderr(&o)
}

fn post_bytes(svc: &Service, path: &str, bytes: &[u8]) -> (u16, Value) {
    let resp = ureq::post(&format!("{}{path}", svc.url)).set("authorization", &format!("Bearer {}", svc.admin)).set("content-type", "application/octet-stream").send_bytes(bytes);
    let resp = match resp {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {path}: {e}"),
    };
    (resp.status(), serde_json::from_str(&resp.into_string().unwrap()).unwrap_or(Value::Null))
}

/// A run as both shells must agree on it: everything but its id (which hashes the model's
/// name: a path for the CLI, the configured name for the server), the model's name and the
/// speed.
fn comparable(run: &Value) -> Value {
    let mut r = run.clone();
    for k in ["id", "model", "examples_per_s"] {
        r.as_object_mut().unwrap().remove(k);
    }
    r
}

fn build(src: &Path, out: &Path) -> String {
    let printed = ok(&["pack", "build", src.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    printed.lines().find_map(|l| l.strip_prefix("sha256 ")).expect("build prints the sha256").to_string()
}

#[test]
fn a_pack_built_and_installed_runs_the_same_baseline_from_the_cli_and_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    ok(&["pack", "new", &d("src"), "--template", "support-triage", "--name", "my-triage"]);
    let sha = build(&dir.path().join("src"), &dir.path().join("my.lathepack"));
    let bytes = std::fs::read(d("my.lathepack")).unwrap();
    assert_eq!(sha, lathe_util::sha256_hex(&bytes));

    let inspect = ok(&["pack", "inspect", &d("my.lathepack")]);
    for want in ["my-triage@1.0.0", &sha, "classification", "network: none", "gate classification ≥ 0.8", "heldout", "60 items"] {
        assert!(inspect.contains(want), "inspect lacks {want:?}:\n{inspect}");
    }

    // The CLI: install, list, export byte for byte, then the baseline on the pack's data.
    ok(&["pack", "install", &d("my.lathepack"), "--data-dir", &d("cli")]);
    assert!(ok(&["pack", "list", "--data-dir", &d("cli")]).contains(&sha[..12]));
    ok(&["pack", "export", "my-triage", "--out", &d("exported.lathepack"), "--data-dir", &d("cli")]);
    assert_eq!(std::fs::read(d("exported.lathepack")).unwrap(), bytes);
    let model = smollm2();
    let printed = ok(&[
        "eval", "baseline", "--model", model.to_str().unwrap(), "--suite", "triage", "--data", "packs/my-triage/heldout",
        "--train", "packs/my-triage/fewshot", "--limit", "6", "--data-dir", &d("cli"),
    ]);
    let run_file = printed.lines().find_map(|l| l.strip_prefix("run ")).expect("the baseline prints its run file");
    let cli_run: Value = serde_json::from_str(&std::fs::read_to_string(run_file).unwrap()).unwrap();

    // The server: the exported file into the team's catalogue, then into a fresh project.
    let svc = Service::start(&dir.path().join("server"), &[]);
    let (status, described) = post_bytes(&svc, "/api/v1/packs", &std::fs::read(d("exported.lathepack")).unwrap());
    assert_eq!(status, 201, "{described}");
    assert_eq!(described["sha256"], sha.as_str());
    let (_, catalogue) = svc.call("GET", "/api/v1/packs", None);
    let names: Vec<&str> = catalogue["data"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for want in ["invoice-extraction", "support-triage", "grounded-qa", "my-triage"] {
        assert!(names.contains(&want), "the catalogue lacks {want}: {names:?}");
    }
    let (_, project) = svc.call("POST", "/api/v1/projects", Some(json!({"name": "triage"})));
    let project = project["id"].as_str().unwrap();
    let (status, installed) = svc.call("POST", &format!("/api/v1/projects/{project}/packs"), Some(json!({"sha256": sha})));
    assert_eq!(status, 201, "{installed}");
    let (_, suite) = svc.call("GET", &format!("/api/v1/projects/{project}/suites/triage"), None);
    assert!(suite["definition"]["scorers"][0]["sha256"].is_string(), "the installed suite pins its scorer: {suite}");

    let (status, job) = svc.call(
        "POST",
        &format!("/api/v1/projects/{project}/jobs"),
        Some(json!({"kind": "eval_baseline", "model": "smollm2-135m-instruct", "suite": "triage", "data": "packs/my-triage/heldout", "train": "packs/my-triage/fewshot", "limit": 6})),
    );
    assert_eq!(status, 202, "{job}");
    let job = svc.wait(project, job["id"].as_str().unwrap(), std::time::Duration::from_secs(600));
    assert_eq!(job["state"], "succeeded", "{job}");
    let server_run = &job["outcome"]["baseline"]["best"];
    assert_eq!(comparable(server_run), comparable(&cli_run), "the server's baseline differs from the CLI's");
    assert_eq!(server_run["plugins"]["classification"], suite["definition"]["scorers"][0]["sha256"], "the run records the pinned hash");

    // One byte changed: refused by the CLI and by the server.
    let mut tampered = bytes.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x20;
    std::fs::write(d("tampered.lathepack"), &tampered).unwrap();
    let e = refused(&["pack", "inspect", &d("tampered.lathepack")]);
    assert!(e.contains("not a Lathe pack") || e.contains("changed after it was built"), "{e}");
    let e = refused(&["pack", "install", &d("tampered.lathepack"), "--data-dir", &d("cli2")]);
    assert!(e.contains("pack"), "{e}");
    let (status, body) = post_bytes(&svc, "/api/v1/packs", &tampered);
    assert_eq!(status, 400, "{body}");
}

#[test]
fn packs_whose_plugins_ask_for_network_or_too_much_memory_are_refused_naming_plugin_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let svc = Service::start(&dir.path().join("server"), &[]);
    for (name, ask, says) in [("greedy", "memory_mb = 4096", "4096 MiB"), ("chatty", "network = true", "network")] {
        ok(&["pack", "new", &d(name), "--name", name]);
        let toml = dir.path().join(name).join("pack.toml");
        let text = std::fs::read_to_string(&toml).unwrap().replace("memory_mb = 16", ask);
        std::fs::write(&toml, text).unwrap();
        let file = dir.path().join(format!("{name}.lathepack"));
        build(&dir.path().join(name), &file);
        let e = refused(&["pack", "install", file.to_str().unwrap(), "--data-dir", &d("cli")]);
        assert!(e.contains("plugin `exact-match`") && e.contains(says), "{e}");
        let (status, body) = post_bytes(&svc, "/api/v1/packs", &std::fs::read(&file).unwrap());
        assert_eq!(status, 400, "{body}");
        let message = body.to_string();
        assert!(message.contains("exact-match") && message.contains(says), "{message}");
    }
    // Nothing was installed.
    assert!(ok(&["pack", "list", "--data-dir", &d("cli")]).contains("no packs installed"));
}

/// The grounded-qa pack carries the judge's verdicts from its measured baseline: once
/// installed, its judged suite's best prompt replays them on SmolLM2 (no judge endpoint, no
/// API key), and the same run without them has to ask the judge, which is not there.
#[test]
fn the_grounded_qa_pack_replays_its_judged_baseline_from_its_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    ok(&["pack", "new", &d("src"), "--template", "grounded-qa"]);
    build(&dir.path().join("src"), &dir.path().join("g.lathepack"));
    let inspect = ok(&["pack", "inspect", &d("g.lathepack"), "--json"]);
    let described: Value = serde_json::from_str(&inspect).unwrap();
    let shipped = described["verdicts"]["rows"].as_u64().expect("the pack lists its verdicts");
    let installed = ok(&["pack", "install", &d("g.lathepack"), "--data-dir", &d("home")]);
    assert!(installed.contains(&format!("{shipped} of the pack's {shipped} added to the judge cache")), "{installed}");

    let model = smollm2();
    let judged = || {
        let args = [
            "eval", "run", "--model", model.to_str().unwrap(), "--suite", "grounded-qa-judged", "--data", "packs/grounded-qa/heldout",
            "--train", "packs/grounded-qa/fewshot", "--template", "answer", "--shots", "2", "--limit", "6", "--data-dir", &d("home"),
        ];
        std::process::Command::new(env!("CARGO_BIN_EXE_lathe")).args(args).env_remove("LATHE_JUDGE_API_KEY").output().unwrap()
    };
    let o = judged();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("judge: 0 verdicts asked, 6 replayed from the cache"), "{}", stdout(&o));
    let run_file = stdout(&o).lines().find_map(|l| l.strip_prefix("run ").map(String::from)).expect("the run prints its file");
    let run: Value = serde_json::from_str(&std::fs::read_to_string(run_file).unwrap()).unwrap();
    assert!(run["metrics"]["judge"]["mean"].is_number(), "{}", run["metrics"]);

    std::fs::remove_file(dir.path().join("home/judge-cache.jsonl")).unwrap();
    let o = judged();
    assert!(!o.status.success(), "without the verdicts the judge must be asked");
    assert!(stderr(&o).contains("$LATHE_JUDGE_API_KEY is not set"), "{}", stderr(&o));
}
