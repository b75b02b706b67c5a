//! `lathe bench api` and `lathe bench claims`: the service's throughput.
//!
//! `bench api` starts a real server (the same router `lathe serve` runs) on loopback over a
//! seeded store, then starts a second process, `lathe bench api-load`, that holds a fixed
//! number of keep-alive connections open and sends GET requests back to back (a closed
//! loop, so the load is bounded by the connection count) for a fixed time per endpoint.
//! The load generator measures each request from the first byte written to the last byte
//! of the body read, so the figures include HTTP parsing on both sides.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use lathe_jobs::event::NullSink;
use lathe_jobs::pipeline::data::{ImportSpec, import};
use lathe_server::{AppState, ServerConfig};
use lathe_store::{Db, NewJob};
use serde::{Deserialize, Serialize};

#[derive(Args)]
pub struct ClaimsBench {
    /// Default: SQLite in a temporary folder.
    #[arg(long)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Concurrent claimers (each its own connection pool, like separate workers).
    #[arg(long, default_value_t = 4)]
    pub claimers: usize,
}

#[derive(Args)]
pub struct ApiBench {
    /// Default: SQLite in a temporary folder.
    #[arg(long)]
    database_url: Option<String>,
    /// Keep-alive connections the load generator holds open (the bound on the load).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Seconds of load per endpoint (after half a second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Jobs for the claims/s measurement that follows (0: skip it).
    #[arg(long, default_value_t = 2000)]
    claim_jobs: usize,
    /// Print one JSON object per endpoint instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ApiLoad {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    connections: usize,
    #[arg(long)]
    seconds: f64,
    /// Paths to load, one after the other.
    #[arg(long = "path", required = true)]
    paths: Vec<String>,
}

/// One endpoint's figures, as the load generator prints them (one JSON line each).
#[derive(Serialize, Deserialize)]
struct EndpointResult {
    path: String,
    requests: usize,
    errors: usize,
    requests_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// The token the load generator sends, passed in the environment rather than on the
/// command line, where `ps` would show it.
const TOKEN_VAR: &str = "LATHE_BENCH_TOKEN";

pub fn api(a: &ApiBench) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = database_url(a.database_url.as_deref(), dir.path());
    let backend = backend_name(&url);
    let results = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let state =
                AppState::open(ServerConfig::new(dir.path().join("data")), Some(&url)).await?;
            let (token, paths) = seed(&state, dir.path()).await?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            tokio::spawn(async move {
                if let Err(e) =
                    lathe_server::serve_on(listener, state, 0, std::future::pending()).await
                {
                    eprintln!("bench server: {e}");
                }
            });

            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            cmd.args(["bench", "api-load", "--addr", &addr.to_string()])
                .args([
                    "--connections",
                    &a.connections.to_string(),
                    "--seconds",
                    &a.seconds.to_string(),
                ])
                .env(TOKEN_VAR, &token)
                .stderr(std::process::Stdio::inherit());
            for (_, p) in &paths {
                cmd.args(["--path", p]);
            }
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await?
                .context("starting the load generator")?;
            ensure!(
                out.status.success(),
                "the load generator failed ({})",
                out.status
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .zip(paths)
                .map(|(l, (label, _))| {
                    let mut r = serde_json::from_str::<EndpointResult>(l)
                        .with_context(|| format!("load generator output: {l}"))?;
                    r.path = label.to_string();
                    Ok(r)
                })
                .collect::<Result<Vec<_>>>()
        })?;

    if a.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{backend}, {} keep-alive connections from a second process, {} s per endpoint",
            a.connections, a.seconds
        );
        println!(
            "{:<54} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6}",
            "GET", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
        );
        for r in &results {
            println!(
                "{:<54} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6}",
                r.path, r.requests_per_s, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms, r.errors
            );
        }
    }
    let failed: usize = results.iter().map(|r| r.errors).sum();
    ensure!(failed == 0, "{failed} requests failed");
    if a.claim_jobs > 0 {
        claims(&ClaimsBench {
            database_url: a.database_url.clone(),
            jobs: a.claim_jobs,
            claimers: 4,
        })?;
    }
    Ok(())
}

/// A team, its token, a project with a 1,000-example dataset and 200 queued jobs (no
/// worker runs, so they stay listed): what the read endpoints have to read. Returns the
/// token and the paths to load.
async fn seed(
    state: &AppState,
    dir: &std::path::Path,
) -> Result<(String, Vec<(&'static str, String)>)> {
    let db = &state.db;
    let team = db.create_team(&unique_name()).await?;
    let (_, secret) = db.create_token(&team.id, None, "bench", false).await?;
    let project = db
        .create_project(&team.id, "bench", "read endpoints under load")
        .await?;
    let mut job = String::new();
    for i in 0..200 {
        let row = db
            .enqueue(NewJob {
                id: None,
                project_id: project.id.clone(),
                kind: "listed".into(),
                spec: serde_json::json!({"i": i}),
                priority: 0,
                max_attempts: 1,
                plugins: Default::default(),
        needs: Default::default(),
            })
            .await?;
        job = row.id;
    }
    let source = dir.join("seed.jsonl");
    lathe_data::bench::generate_jsonl(&source, 1000, 7)?;
    let env = state.env(&project.id).await?;
    let spec = ImportSpec {
        file: source,
        source_name: Some("seed.jsonl".into()),
        name: Some("seed".into()),
        mapping: None,
        formatter: None,
    };
    let version = tokio::task::spawn_blocking(move || import(&env, &spec, &NullSink))
        .await??
        .version;
    let p = &project.id;
    let paths = vec![
        ("/api/v1/projects", "/api/v1/projects".to_string()),
        ("/api/v1/projects/{p}", format!("/api/v1/projects/{p}")),
        (
            "/api/v1/projects/{p}/jobs?limit=20",
            format!("/api/v1/projects/{p}/jobs?limit=20"),
        ),
        (
            "/api/v1/projects/{p}/jobs/{job}",
            format!("/api/v1/projects/{p}/jobs/{job}"),
        ),
        (
            "/api/v1/projects/{p}/datasets",
            format!("/api/v1/projects/{p}/datasets"),
        ),
        (
            "/api/v1/projects/{p}/datasets/{v}/examples?limit=20",
            format!("/api/v1/projects/{p}/datasets/{version}/examples?limit=20"),
        ),
        ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs".to_string()),
        ("/v1/models", "/v1/models".to_string()),
    ];
    Ok((secret.expose().to_string(), paths))
}

/// The load generator: for each path in turn, `connections` threads each hold one
/// keep-alive connection and send requests back to back.
pub fn load(a: &ApiLoad) -> Result<()> {
    let token = std::env::var(TOKEN_VAR).with_context(|| format!("{TOKEN_VAR} is not set"))?;
    for path in &a.paths {
        // Warm-up: connections, the server's caches, the database's pages.
        run_path(a.addr, &token, path, a.connections, 0.5)?;
        let r = run_path(a.addr, &token, path, a.connections, a.seconds)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn run_path(
    addr: SocketAddr,
    token: &str,
    path: &str,
    connections: usize,
    seconds: f64,
) -> Result<EndpointResult> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
    );
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let per_conn: Vec<Result<(Vec<u32>, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections.max(1))
            .map(|_| {
                let request = request.as_bytes();
                s.spawn(move || -> Result<(Vec<u32>, usize)> {
                    let mut latencies_us = Vec::with_capacity(1 << 14);
                    let mut errors = 0usize;
                    let mut conn = Conn::open(addr)?;
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match conn.get(request) {
                            Ok(200) => latencies_us
                                .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32),
                            Ok(_) => errors += 1,
                            Err(_) => {
                                errors += 1;
                                conn = Conn::open(addr)?;
                            }
                        }
                    }
                    Ok((latencies_us, errors))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a load thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = Vec::new();
    let mut errors = 0;
    for r in per_conn {
        let (l, e) = r?;
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |q: f64| {
        all.get(((all.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    Ok(EndpointResult {
        path: path.to_string(),
        requests: all.len(),
        errors,
        requests_per_s: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: all.last().map_or(0.0, |&us| us as f64 / 1000.0),
    })
}

/// One HTTP/1.1 keep-alive connection: just enough of the protocol to send a GET and read
/// the whole response (a `Content-Length` or a chunked body).
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    line: String,
    body: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            writer: stream.try_clone()?,
            reader: BufReader::with_capacity(1 << 16, stream),
            line: String::new(),
            body: Vec::new(),
        })
    }

    /// Sends the request and reads the response; returns its status code.
    fn get(&mut self, request: &[u8]) -> Result<u16> {
        self.writer.write_all(request)?;
        self.read_line()?;
        let status: u16 = self
            .line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {:?}", self.line))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            self.read_line()?;
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                bail!("bad header {header:?}")
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>()?);
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
        }
        match (length, chunked) {
            (Some(n), _) => self.read_body(n)?,
            (None, true) => loop {
                self.read_line()?;
                let n = usize::from_str_radix(
                    self.line.trim_end().split(';').next().unwrap_or(""),
                    16,
                )?;
                self.read_body(n)?;
                self.read_line()?;
                if n == 0 {
                    break;
                }
            },
            (None, false) => bail!("a response with neither Content-Length nor a chunked body"),
        }
        Ok(status)
    }

    fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        ensure!(
            self.reader.read_line(&mut self.line)? > 0,
            "the server closed the connection"
        );
        Ok(())
    }

    fn read_body(&mut self, n: usize) -> Result<()> {
        self.body.resize(n, 0);
        self.reader.read_exact(&mut self.body)?;
        Ok(())
    }
}

pub fn claims(a: &ClaimsBench) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = database_url(a.database_url.as_deref(), dir.path());
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let db = Db::connect(&url).await?;
        // A kind of this run's own, so jobs left on a shared database by other runs (or by
        // `bench api`'s listing) are not claimed and counted here.
        let kind = unique_name();
        let team = db.create_team(&kind).await?;
        let project = db.create_project(&team.id, "bench", "").await?;
        let start = Instant::now();
        for i in 0..a.jobs {
            let job = NewJob { id: None, project_id: project.id.clone(), kind: kind.clone(), spec: serde_json::json!({"i": i}), priority: 0, max_attempts: 1, plugins: Default::default(), needs: Default::default() };
            db.enqueue(job).await?;
        }
        let enqueue_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..a.claimers.max(1) {
            let (url, kind) = (url.clone(), kind.clone());
            tasks.push(tokio::spawn(async move {
                let db = Db::connect(&url).await?;
                let mut n = 0usize;
                while let Some(lease) = db.claim(&format!("bench-{c}"), &[kind.as_str()], Duration::from_secs(60)).await? {
                    db.complete(&lease, serde_json::json!(null)).await?;
                    n += 1;
                }
                Ok::<usize, lathe_store::StoreError>(n)
            }));
        }
        let mut per = Vec::new();
        for t in tasks {
            per.push(t.await??);
        }
        let claim_s = start.elapsed().as_secs_f64();
        ensure!(per.iter().sum::<usize>() == a.jobs, "claimed {} of {} jobs", per.iter().sum::<usize>(), a.jobs);
        let backend = backend_name(&url);
        println!(
            "{backend}: {} jobs; enqueue {:.0}/s; claim+complete {:.0}/s with {} claimers (split {per:?})",
            a.jobs,
            a.jobs as f64 / enqueue_s,
            a.jobs as f64 / claim_s,
            a.claimers
        );
        Ok(())
    })
}

/// The database a bench runs on: the one given, else SQLite in `dir` (a temporary folder).
fn database_url(given: Option<&str>, dir: &std::path::Path) -> String {
    given.map_or_else(|| format!("sqlite://{}", dir.join("lathe.db").display()), str::to_string)
}

fn backend_name(url: &str) -> &'static str {
    if url.starts_with("sqlite") { "SQLite" } else { "PostgreSQL" }
}

/// A team name no earlier run on the same database took.
fn unique_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("bench-{}-{nanos}", std::process::id())
}
