//! `lathe serve` and `lathe worker` as processes: the official `openai` package fine-tunes
//! SmolLM2 through the server and chats with the base and the fine-tune, a worker killed
//! with SIGKILL mid-training is replaced by another that resumes from the checkpoint to
//! the same adapter as an uninterrupted run, and a server killed mid-upload lists nothing
//! partial.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::s3_server::S3Server;
use crate::{repo_root, smollm2};

/// A running `lathe serve`, killed on drop.
pub struct Service {
    child: Child,
    pub url: String,
    pub admin: String,
}

impl Service {
    pub fn start(data_dir: &Path, args: &[&str]) -> Service {
        Self::start_with_env(data_dir, args, &[])
    }

    /// With environment variables (an object store's endpoint and keys).
    fn start_with_env(data_dir: &Path, args: &[&str], env: &[(String, String)]) -> Service {
        let (child, url, admin) = Self::spawn(data_dir, args, env);
        Service { child, url, admin: admin.expect("the first start prints an admin token") }
    }

    /// A later start on the same data folder, whose admin token the first start printed.
    fn start_again(data_dir: &Path, admin: String) -> Service {
        let (child, url, _) = Self::spawn(data_dir, &[], &[]);
        Service { child, url, admin }
    }

    fn spawn(data_dir: &Path, args: &[&str], env: &[(String, String)]) -> (Child, String, Option<String>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args(["serve", "--addr", "127.0.0.1:0", "--data-dir", data_dir.to_str().unwrap()])
            .args(args)
            .envs(env.iter().cloned())
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut url, mut admin) = (None, None);
        while url.is_none() {
            let line = rx.recv_timeout(Duration::from_secs(60)).expect("lathe serve prints its address");
            if let Some(u) = line.strip_prefix("lathe serve: listening on ") {
                url = Some(u.to_string());
            } else if line.trim_start().starts_with("lathe_") {
                admin = Some(line.trim().to_string());
            }
        }
        (child, url.unwrap(), admin)
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = ureq::request(method, &format!("{}{path}", self.url)).set("authorization", &format!("Bearer {}", self.admin));
        let resp = match body {
            Some(b) => req.set("content-type", "application/json").send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match resp {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        (status, serde_json::from_str(&resp.into_string().unwrap()).unwrap_or(Value::Null))
    }

    fn upload(&self, project: &str, name: &str, bytes: &[u8]) -> String {
        let mut body = format!("--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\r\n").into_bytes();
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n--b--\r\n");
        let resp = ureq::post(&format!("{}/api/v1/projects/{project}/files", self.url))
            .set("authorization", &format!("Bearer {}", self.admin))
            .set("content-type", "multipart/form-data; boundary=b")
            .send_bytes(&body)
            .unwrap();
        serde_json::from_str::<Value>(&resp.into_string().unwrap()).unwrap()["id"].as_str().unwrap().to_string()
    }

    pub fn submit(&self, project: &str, request: Value) -> String {
        let (status, row) = self.call("POST", &format!("/api/v1/projects/{project}/jobs"), Some(request));
        assert_eq!(status, 202, "{row}");
        row["id"].as_str().unwrap().to_string()
    }

    pub fn wait(&self, project: &str, job: &str, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (_, row) = self.call("GET", &format!("/api/v1/projects/{project}/jobs/{job}"), None);
            if ["succeeded", "failed", "cancelled"].contains(&row["state"].as_str().unwrap_or("")) {
                return row;
            }
            assert!(start.elapsed() < within, "job {job} did not finish: {row}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn project(&self) -> String {
        let (status, p) = self.call("POST", "/api/v1/projects", Some(json!({"name": "invoices"})));
        assert_eq!(status, 201, "{p}");
        p["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server killed with SIGKILL while an upload streams in, half of it sent: after a
/// restart no partial file or plugin is listed, and the client's retry succeeds.
#[test]
fn a_server_killed_mid_upload_lists_nothing_partial_and_the_retry_succeeds() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Service::start(dir.path(), &["--workers", "0"]);
    let project = server.project();
    let line = b"{\"messages\": [{\"role\": \"user\", \"content\": \"say the cat\"}, {\"role\": \"assistant\", \"content\": \"the cat\"}]}\n";
    let data: Vec<u8> = line.iter().copied().cycle().take(line.len() * 60_000).collect();
    let plugin = lathe_sandbox::builtin("exact-match").unwrap().to_vec();
    let mut file_body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n".to_vec();
    file_body.extend_from_slice(&data);
    file_body.extend_from_slice(b"\r\n--b--\r\n");
    for (path, content_type, body) in [
        (format!("/api/v1/projects/{project}/files"), "multipart/form-data; boundary=b", &file_body),
        (format!("/api/v1/projects/{project}/plugins"), "application/wasm", &plugin),
    ] {
        // Headers for the whole body, then half of it; the server is killed while it waits
        // for the rest.
        let addr = server.url.trim_start_matches("http://").to_string();
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            server.admin,
            body.len()
        );
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(&body[..body.len() / 2]).unwrap();
        conn.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        drop(conn);
        let admin = server.admin.clone();
        server = Service::start_again(dir.path(), admin);
        for list in ["files", "plugins"] {
            let (status, rows) = server.call("GET", &format!("/api/v1/projects/{project}/{list}"), None);
            assert_eq!(status, 200, "{rows}");
            assert_eq!(rows["data"], json!([]), "nothing of the cut {path} is listed as a {list} row");
        }
    }
    // The retries, whole.
    let id = server.upload(&project, "big.jsonl", &data);
    let (_, file) = server.call("GET", &format!("/api/v1/projects/{project}/files/{id}"), None);
    assert_eq!(file["bytes"], data.len(), "{file}");
    let resp = ureq::post(&format!("{}/api/v1/projects/{project}/plugins", server.url))
        .set("authorization", &format!("Bearer {}", server.admin))
        .send_bytes(&plugin)
        .unwrap();
    assert_eq!(resp.status(), 201);
    let (_, plugins) = server.call("GET", &format!("/api/v1/projects/{project}/plugins"), None);
    assert_eq!(plugins["data"].as_array().unwrap().len(), 1, "{plugins}");
}

fn worker(data_dir: &Path, lease_secs: &str, args: &[&str], env: &[(String, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(["worker", "--data-dir", data_dir.to_str().unwrap(), "--lease-secs", lease_secs, "--threads", "1"])
        .args(args)
        .envs(env.iter().cloned())
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

pub fn venv_python() -> PathBuf {
    let p = repo_root().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh (it makes the venv with the openai package)", p.display());
    p
}

#[test]
fn the_openai_package_fine_tunes_smollm2_through_lathe_serve_then_chats_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = format!("smollm2={}", smollm2().display());
    let s = Service::start(&dir.path().join("data"), &["--model", &model, "--lease-secs", "60"]);
    let project = s.project();
    let train = dir.path().join("train.jsonl");
    lathe_jobs::invoices::write_jsonl(&train, &lathe_jobs::invoices::invoice_examples(60, 3)).unwrap();
    let suite = dir.path().join("suite.json");
    std::fs::write(&suite, serde_json::to_string(&lathe_jobs::invoices::invoice_suite()).unwrap()).unwrap();

    let script = repo_root().join("tests/e2e/openai_finetune.py");
    let out = Command::new(venv_python())
        .args([script.to_str().unwrap(), &s.url, &s.admin, &project, train.to_str().unwrap(), suite.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let losses: Vec<f64> = summary["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).collect();
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{summary}");

    // Then it chats with the base and the fine-tuned model through the inference API.
    let script = repo_root().join("tests/e2e/openai_serve.py");
    let ft = summary["fine_tuned_model"].as_str().unwrap();
    let out = Command::new(venv_python()).args([script.to_str().unwrap(), &s.url, &s.admin, &project, "smollm2", ft]).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_worker_killed_mid_training_is_replaced_and_the_adapter_equals_an_uninterrupted_run() {
    killed_worker_is_replaced(None);
}

/// The same with artifacts in an S3 bucket, and the dead worker's disk gone with it: the
/// next worker restores the run folder from the bucket.
#[test]
fn a_worker_killed_mid_training_with_its_disk_is_resumed_from_the_object_store() {
    let bucket = S3Server::start();
    killed_worker_is_replaced(Some(&bucket));
}

fn killed_worker_is_replaced(bucket: Option<&S3Server>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tiny = lathe_engine::tiny::write_tiny(&dir.path().join("model"), lathe_engine::config::Architecture::Llama, 3).unwrap();
    let model = format!("tiny={}", tiny.gguf.display());
    let (s3_args, env) = match bucket {
        Some(b) => (vec!["--artifacts", "s3://lathe/team"], S3Server::env(&b.endpoint())),
        None => (vec![], vec![]),
    };
    let s = Service::start_with_env(&data, &[&["--model", &model, "--workers", "0"][..], &s3_args].concat(), &env);
    let project = s.project();
    let mut first = worker(&data, "2", &s3_args, &env);

    let mut text = String::new();
    for i in 0..40 {
        let line = json!({"messages": [{"role": "user", "content": format!("say the cat {i}")}, {"role": "assistant", "content": format!("the cat {i}")}]});
        text.push_str(&format!("{line}\n"));
    }
    let file = s.upload(&project, "words.jsonl", text.as_bytes());
    let import = s.submit(&project, json!({"kind": "data_import", "file_id": file, "name": "words"}));
    assert_eq!(s.wait(&project, &import, Duration::from_secs(60))["state"], "succeeded");
    let split = s.submit(&project, json!({"kind": "data_split", "version": "words", "heldout": 0.2, "name": "words"}));
    assert_eq!(s.wait(&project, &split, Duration::from_secs(60))["state"], "succeeded");
    let suite = json!({"name": "words", "templates": [{"name": "plain", "user": "{{ input }}"}], "scorers": [{"plugin": "exact-match"}], "shots": [0], "max_tokens": 4});
    assert_eq!(s.call("PUT", &format!("/api/v1/projects/{project}/suites/words"), Some(suite)).0, 200);

    let train = json!({"kind": "train", "model": "tiny", "suite": "words", "data": "words.train",
                       "settings": {"rank": 4, "epochs": 1000, "max_steps": 1500, "batch_size": 2, "save_every": 25,
                                    "learning_rate": 1e-3, "metric_items": 0, "patience": 0, "eval_every": 500}});
    let killed = s.submit(&project, train.clone());
    let run_dir = data.join("projects").join(&project).join("runs").join(&killed);
    let start = Instant::now();
    while !run_dir.join("checkpoints/step-00000050").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint at step 50");
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert!(!run_dir.join("last").exists(), "the run finished before the worker was killed; make it longer");
    let (_, row) = s.call("GET", &format!("/api/v1/projects/{project}/jobs/{killed}"), None);
    assert_eq!(row["state"], "running", "{row}");
    if bucket.is_some() {
        std::fs::remove_dir_all(&run_dir).unwrap(); // the dead worker's disk
    }

    // Another worker claims the job once its lease has expired and resumes it.
    let mut second = worker(&data, "2", &s3_args, &env);
    let done = s.wait(&project, &killed, Duration::from_secs(300));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    if bucket.is_some() {
        let (_, events) = s.call("GET", &format!("/api/v1/projects/{project}/jobs/{killed}/events?limit=1000"), None);
        let events = events["data"].as_array().unwrap();
        let restored = events.iter().position(|e| e["data"]["message"].as_str().is_some_and(|m| m.starts_with("restored the last checkpoint from the artifact store")));
        let restored = restored.unwrap_or_else(|| panic!("the second attempt did not restore from the bucket: {events:?}"));
        // It went on from the checkpoint, not from step 1.
        let next_step = events[restored..].iter().find(|e| e["data"]["series"] == "train/loss").map(|e| e["data"]["x"].as_u64().unwrap());
        assert!(next_step.is_some_and(|x| x > 25), "after the restore, training went on at step {next_step:?}");
    }

    let clean = s.submit(&project, train);
    assert_eq!(s.wait(&project, &clean, Duration::from_secs(300))["state"], "succeeded");
    second.kill().unwrap();
    second.wait().unwrap();
    let clean_dir = data.join("projects").join(&project).join("runs").join(&clean);
    for f in ["last/adapter_model.safetensors", "metrics.jsonl"] {
        assert_eq!(std::fs::read(run_dir.join(f)).unwrap(), std::fs::read(clean_dir.join(f)).unwrap(), "{f} differs from the uninterrupted run's");
    }
}

/// `lathe bench api` drives a real server from a second process: every endpoint it loads
/// answers 200 (the bench fails on any error), and each gets a line with its figures.
#[test]
fn bench_api_loads_every_read_endpoint_without_an_error() {
    let out = crate::lathe(&["bench", "api", "--seconds", "0.3", "--connections", "2", "--claim-jobs", "20", "--json"]);
    assert!(out.status.success(), "{}", crate::stderr(&out));
    let stdout = crate::stdout(&out);
    let lines: Vec<Value> = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    for l in &lines {
        assert!(l["requests"].as_u64().unwrap() > 0 && l["errors"] == 0, "{l}");
        assert!(l["p99_ms"].as_f64().unwrap() >= l["p50_ms"].as_f64().unwrap(), "{l}");
    }
    assert!(stdout.contains("claim+complete"), "{stdout}");
}

/// `lathe bench artifacts` puts files through the store and reads them back on a store with
/// an empty cache, so every read is a download from the bucket; against moto, the multipart
/// path too (17 MiB is past the 16 MiB threshold). The bench fails if a download comes back
/// another size.
#[test]
fn bench_artifacts_uploads_and_downloads_through_the_bucket() {
    let bucket = S3Server::start();
    let out = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(["bench", "artifacts", "--artifacts", "s3://lathe/bench", "--size-mib", "17", "--count", "2", "--json"])
        .envs(S3Server::env(&bucket.endpoint()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", crate::stderr(&out));
    let v: Value = serde_json::from_str(crate::stdout(&out).trim()).unwrap();
    assert!(v["upload_mib_per_s"].as_f64().unwrap() > 0.0 && v["download_mib_per_s"].as_f64().unwrap() > 0.0, "{v}");

    // The local folder has nothing to download.
    let out = crate::lathe(&["bench", "artifacts", "--size-mib", "1", "--count", "1", "--json"]);
    assert!(out.status.success(), "{}", crate::stderr(&out));
    let v: Value = serde_json::from_str(crate::stdout(&out).trim()).unwrap();
    assert!(v["upload_mib_per_s"].as_f64().unwrap() > 0.0 && v["download_mib_per_s"].is_null(), "{v}");
}
