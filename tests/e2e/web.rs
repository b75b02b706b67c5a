//! The web UI in headless Chromium: `web_journey.py` walks a team through the whole workflow
//! on SmolLM2 in a browser, then checks what must not work (another team's view, a forged
//! form, a request to another host). Screenshots go to `$LATHE_TOUR_DIR` (relative to the
//! repository) when it is set (the README's tour is made that way), else to a temporary
//! folder.

use std::process::Command;

use serde_json::{Value, json};

use crate::repo_root;
use crate::service::{Service, venv_python};

#[test]
fn a_team_runs_the_workflow_in_a_browser_and_another_team_sees_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Service::start(&dir.path().join("data"), &["--lease-secs", "60"]);
    let (status, team) = s.call("POST", "/api/v1/teams", Some(json!({"name": "other-team"})));
    assert_eq!(status, 201, "{team}");
    let other_token = team["token"].as_str().unwrap().to_string();

    let data = dir.path().join("invoices.jsonl");
    // Two exact duplicates and one e-mail address for the curation step to find.
    let mut examples = lathe_jobs::invoices::invoice_examples(60, 5);
    examples.extend(examples[..2].to_vec());
    examples[10].messages[0].content.push_str("\nQuestions: billing@example.com");
    lathe_jobs::invoices::write_jsonl(&data, &examples).unwrap();
    // A component built from plugins/ (the build embeds them), uploaded as the project's own.
    let wasm = dir.path().join("json-field-match.wasm");
    std::fs::write(&wasm, lathe_sandbox::builtin("json-field-match").unwrap()).unwrap();
    // Relative to the repository (tests run in the crate's folder).
    let shots = std::env::var("LATHE_TOUR_DIR").map(|d| repo_root().join(d)).unwrap_or_else(|_| dir.path().join("shots"));

    let script = repo_root().join("tests/e2e/web_journey.py");
    let out = Command::new(venv_python())
        .args([script.to_str().unwrap(), &s.url, &s.admin, &other_token, data.to_str().unwrap(), wasm.to_str().unwrap(), shots.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let project = summary["project"].as_str().unwrap();
    // What the browser did is in the store: the adapter it downloaded was trained there.
    let (_, job) = s.call("GET", &format!("/api/v1/projects/{project}/jobs/{}", summary["train_job"].as_str().unwrap()), None);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["spec"]["settings"]["rank"], 8, "{job}");
    for page in ["login", "projects", "workflow", "datasets", "dataset", "plugin", "suites", "jobs", "train-live", "report", "settings"] {
        assert!(shots.join(format!("{page}.png")).is_file(), "no screenshot of {page}");
    }
}
