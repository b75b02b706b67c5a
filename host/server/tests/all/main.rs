//! The service through HTTP, on SQLite and on PostgreSQL: the router is called in-process
//! (`oneshot`), a real worker runs the real pipelines on a tiny model with the real
//! plugins, and every route answered is one the OpenAPI document lists; every web page
//! is checked against another team's session.

// The store's own harness; the server's tests use only part of it.
#[allow(dead_code)]
#[path = "../../../store/tests/all/harness.rs"]
mod harness;

mod api;
mod openai;
mod sweep;
mod web;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use lathe_engine::config::Architecture;
use lathe_server::{AppState, ServerConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Runs each scenario on SQLite and on PostgreSQL, each on a fresh database.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let t = crate::harness::TestDb::sqlite().await;
                    super::$scenario(crate::Server::start(&t.url).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let t = crate::harness::TestDb::postgres().await;
                    super::$scenario(crate::Server::start(&t.url).await).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;

/// A server over a test database, a tiny model named `tiny`, and an admin token.
pub struct Server {
    pub state: Arc<AppState>,
    pub admin: String,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

impl Server {
    pub async fn start(url: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let tiny = lathe_engine::tiny::write_tiny(&dir.path().join("model"), Architecture::Llama, 3).unwrap();
        let mut config = ServerConfig::new(dir.path().join("data"));
        config.models.clear();
        config.models.insert("tiny".into(), tiny.gguf);
        config.max_upload_bytes = 1 << 20;
        config.lease = Duration::from_secs(5);
        let state = AppState::open(config, Some(url)).await.unwrap();
        let admin = state.db.ensure_admin().await.unwrap().unwrap().expose().to_string();
        Server { state, admin, dir, stop: None }
    }

    /// Starts one in-process worker.
    pub fn start_worker(&mut self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let state = self.state.clone();
        tokio::spawn(async move { lathe_server::worker::run(state, "test-worker".into(), rx).await });
        self.stop = Some(tx);
    }

    pub async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = lathe_server::app(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    /// A JSON request with a token (and, for `/v1`, the project header).
    pub async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        self.call_in(method, uri, token, None, body).await
    }

    pub async fn call_in(&self, method: Method, uri: &str, token: Option<&str>, project: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(p) = project {
            req = req.header("openai-project", p);
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        };
        self.send(req.unwrap()).await
    }

    /// A multipart upload of `bytes` as `file` (and `purpose`).
    pub async fn upload(&self, uri: &str, token: &str, project: Option<&str>, filename: &str, bytes: &[u8]) -> (StatusCode, Value) {
        let boundary = "lathe-test-boundary";
        let mut body = Vec::new();
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n").as_bytes());
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", format!("multipart/form-data; boundary={boundary}"));
        if let Some(p) = project {
            req = req.header("openai-project", p);
        }
        self.send(req.body(Body::from(body)).unwrap()).await
    }

    /// Waits for a job to finish; its final row.
    pub async fn wait(&self, project: &str, job: &str, token: &str) -> Value {
        for _ in 0..600 {
            let (status, row) = self.call(Method::GET, &format!("/api/v1/projects/{project}/jobs/{job}"), Some(token), None).await;
            assert_eq!(status, StatusCode::OK, "{row}");
            if ["succeeded", "failed", "cancelled"].contains(&row["state"].as_str().unwrap()) {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {job} did not finish in a minute");
    }

    /// Submits a job and waits for it to succeed.
    pub async fn run_job(&self, project: &str, token: &str, request: Value) -> Value {
        let (status, row) = self.call(Method::POST, &format!("/api/v1/projects/{project}/jobs"), Some(token), Some(request)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{row}");
        let done = self.wait(project, row["id"].as_str().unwrap(), token).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        done
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            let _ = stop.send(true);
        }
    }
}

/// Chat examples of a toy task: `say the cat 3` → `the cat 3`.
pub fn words_jsonl(n: usize) -> Vec<u8> {
    let words = ["the", "thin", "cat", "sat", "in", "hat", "he", "ran", "tin", "then"];
    let mut text = String::new();
    for i in 0..n {
        let w = format!("{} {}", words[i % words.len()], words[(i * 7 + 3) % words.len()]);
        let line = json!({"messages": [
            {"role": "user", "content": format!("say {w} {i}")},
            {"role": "assistant", "content": format!("{w} {i}")},
        ]});
        text.push_str(&format!("{line}\n"));
    }
    text.into_bytes()
}

pub fn words_suite(gate: &str) -> Value {
    json!({
        "name": "words",
        "templates": [{"name": "plain", "user": "{{ input }}"}],
        "scorers": [{"plugin": "exact-match"}],
        "gate": {"metric": gate, "min": 0.5},
        "shots": [0],
        "max_tokens": 4
    })
}

/// A team (made through the admin route) with one project: (token, project id).
/// The start of the cross-team sweeps: team `alpha` with something behind every id a
/// route can name (a file, an import job, a suite, a token, a member), and team `beta`
/// with a project of its own.
pub struct TwoTeams {
    pub a: String,
    pub b: String,
    pub b_project: String,
    /// Route placeholder → alpha's id for it.
    slots: Vec<(&'static str, String)>,
}

impl TwoTeams {
    /// A route template with alpha's ids in its placeholders.
    pub fn fill(&self, template: &str) -> String {
        self.slots.iter().fold(template.to_string(), |uri, (slot, id)| uri.replace(slot, id))
    }

    pub fn id(&self, slot: &str) -> &str {
        &self.slots.iter().find(|(s, _)| *s == slot).expect("a known placeholder").1
    }

    /// Alpha's project, job, file and member ids: what beta's own lists must not show.
    pub fn owned_ids(&self) -> [&str; 4] {
        ["{project}", "{job}", "{file}", "{member}"].map(|slot| self.id(slot))
    }
}

pub async fn two_teams(s: &mut Server) -> TwoTeams {
    s.start_worker();
    let (a, project) = team_with_project(s, "alpha").await;
    let (b, b_project) = team_with_project(s, "beta").await;
    let (_, file) = s.upload(&format!("/api/v1/projects/{project}/files"), &a, None, "w.jsonl", &words_jsonl(20)).await;
    let job = s.run_job(&project, &a, json!({"kind": "data_import", "file_id": file["id"], "name": "words"})).await;
    s.call(Method::PUT, &format!("/api/v1/projects/{project}/suites/words"), Some(&a), Some(words_suite("exact-match"))).await;
    let (_, tokens) = s.call(Method::GET, "/api/v1/tokens", Some(&a), None).await;
    let (_, member) = s.call(Method::POST, "/api/v1/members", Some(&a), Some(json!({"name": "Ana"}))).await;
    // A pack in alpha's catalogue.
    let rt = lathe_sandbox::Runtime::new(lathe_sandbox::RuntimeConfig { cache_dir: lathe_jobs::env::default_plugin_cache(), ..Default::default() }).unwrap();
    let pack = lathe_jobs::pack::shipped::Template::Blank.build(&rt).unwrap();
    let upload = Request::builder().method(Method::POST).uri("/api/v1/packs").header("authorization", format!("Bearer {a}")).body(Body::from(pack.clone())).unwrap();
    let (status, uploaded) = s.send(upload).await;
    assert_eq!(status, StatusCode::CREATED, "{uploaded}");
    let sha256 = lathe_util::sha256_hex(&pack);
    let (job, file) = (job["id"].as_str().unwrap().to_string(), file["id"].as_str().unwrap().to_string());
    let slots = vec![
        ("{project}", project),
        ("{job}", job.clone()),
        ("{job_id}", job),
        ("{file}", file.clone()),
        ("{file_id}", file),
        ("{plugin}", "exact-match".to_string()),
        ("{suite}", "words".to_string()),
        ("{version}", "words".to_string()),
        ("{run}", "0123abcd".to_string()),
        ("{token}", tokens["data"][0]["id"].as_str().unwrap().to_string()),
        ("{member}", member["member"]["id"].as_str().unwrap().to_string()),
        ("{name}", "report.html".to_string()),
        ("{*path}", "lathe.css".to_string()),
        ("{sha256}", sha256),
    ];
    TwoTeams { a, b, b_project, slots }
}

pub async fn team_with_project(s: &Server, team: &str) -> (String, String) {
    let (status, made) = s.call(Method::POST, "/api/v1/teams", Some(&s.admin), Some(json!({"name": team}))).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let token = made["token"].as_str().unwrap().to_string();
    let (status, p) = s.call(Method::POST, "/api/v1/projects", Some(&token), Some(json!({"name": "invoices"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{p}");
    (token, p["id"].as_str().unwrap().to_string())
}
