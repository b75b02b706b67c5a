//! Workers on hosts of their own: network namespaces the test makes with `ip netns`, each
//! joined to this one by a veth link, as separate machines on a network would be. Their
//! only way to the database is that link (a relay on this side of it forwards to the
//! test's PostgreSQL, which listens on loopback only).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::TestDb;
use crate::s3_server::Relay;
use crate::service::Service;

/// A network namespace with a veth link to this one; `gateway` is this side's address.
struct Host {
    name: String,
    link: String,
    gateway: Ipv4Addr,
}

impl Host {
    /// Host `i` (0..64) of this test process: namespace `lathe-<pid>-<i>`, a /30 of its own.
    fn make(i: u8) -> Host {
        let tag = std::process::id() % 100_000;
        let (name, link) = (format!("lathe-{tag}-{i}"), format!("lx{tag}h{i}"));
        let peer = format!("{link}p");
        let gateway = Ipv4Addr::new(10, 213, (tag % 250) as u8, 4 * i + 1);
        let inside = Ipv4Addr::new(10, 213, (tag % 250) as u8, 4 * i + 2);
        ip(&["netns", "add", &name]);
        let host = Host { name, link, gateway };
        ip(&["link", "add", &host.link, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &host.name]);
        ip(&["addr", "add", &format!("{gateway}/30"), "dev", &host.link]);
        ip(&["link", "set", &host.link, "up"]);
        ip(&["-n", &host.name, "addr", "add", &format!("{inside}/30"), "dev", &peer]);
        ip(&["-n", &host.name, "link", "set", &peer, "up"]);
        ip(&["-n", &host.name, "link", "set", "lo", "up"]);
        host
    }

    /// `program` run inside the namespace.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.link]).stderr(Stdio::null()).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the `ip` tool (iproute2) runs");
    assert!(out.status.success(), "ip {}: {} (the test needs root to make network namespaces)", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Worker processes, killed on drop.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two `lathe worker` processes (two workers each), on two hosts, race for 1,000 jobs
/// queued before either starts: each job runs once (one attempt, one start event), and
/// both hosts take a share.
#[test]
fn two_workers_on_hosts_of_their_own_run_1000_queued_jobs_exactly_once() {
    const JOBS: usize = 1000;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = rt.block_on(TestDb::postgres());
    let pg_port: u16 = db
        .url
        .strip_prefix("postgres://postgres@127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("the test's PostgreSQL is not this process's loopback cluster: {}", db.url));

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Service::start(&data, &["--database-url", &db.url, "--workers", "0"]);
    let project = s.project();
    let file = dir.path().join("race.jsonl");
    let rows: Vec<String> = (0..5).map(|i| json!({"prompt": format!("q{i}"), "completion": format!("a{i}")}).to_string()).collect();
    std::fs::write(&file, rows.join("\n") + "\n").unwrap();
    let project_dir = data.join("projects").join(&project);
    let out = crate::lathe(&["data", "import", file.to_str().unwrap(), "--name", "race", "--data-dir", project_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", crate::stderr(&out));
    for _ in 0..JOBS {
        s.submit(&project, json!({"kind": "data_stats", "version": "race"}));
    }

    let hosts = [Host::make(0), Host::make(1)];
    // The boundary holds: from a host, the database's loopback port is not there.
    let reach = hosts[0]
        .command(Path::new("bash"))
        .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{pg_port}")])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!reach.success(), "a host reached the database's loopback port");
    let relays: Vec<Relay> = hosts.iter().map(|h| Relay::on(h.gateway, pg_port)).collect();
    let mut workers = Workers(Vec::new());
    for (host, relay) in hosts.iter().zip(&relays) {
        let url = db.url.replace(&format!("127.0.0.1:{pg_port}"), &format!("{}:{}", host.gateway, relay.port));
        let child = host
            .command(Path::new(env!("CARGO_BIN_EXE_lathe")))
            .args(["worker", "--data-dir", data.to_str().unwrap(), "--database-url", &url, "--workers", "2", "--threads", "1"])
            .current_dir(crate::repo_root())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        workers.0.push(child);
    }

    let start = Instant::now();
    loop {
        let done: Vec<(i64,)> = rt.block_on(db.raw("SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')"));
        if done[0].0 as usize == JOBS {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(600), "{} of {JOBS} jobs ended in 10 minutes", done[0].0);
        for w in &mut workers.0 {
            assert!(w.try_wait().unwrap().is_none(), "a worker exited before the queue was empty");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let jobs: Vec<(String, String, i32, Option<String>)> = rt.block_on(db.raw("SELECT id, state, attempts, worker FROM jobs"));
    assert_eq!(jobs.len(), JOBS);
    for (id, state, attempts, _) in &jobs {
        assert_eq!((state.as_str(), *attempts), ("succeeded", 1), "job {id}");
    }
    let starts: Vec<(String, i64)> = rt.block_on(db.raw("SELECT job_id, count(*) FROM job_events WHERE kind = 'step_started' GROUP BY job_id"));
    assert_eq!(starts.len(), JOBS, "every job started");
    assert!(starts.iter().all(|(_, n)| *n == 1), "a job started twice: {:?}", starts.iter().find(|(_, n)| *n != 1));
    // Each process names its workers `worker-<host>-<pid>-<n>`; both hosts ran jobs.
    for w in &workers.0 {
        let mine = jobs.iter().filter(|j| j.3.as_deref().is_some_and(|name| name.contains(&format!("-{}-", w.id())))).count();
        assert!(mine > 0, "the worker process {} ran none of the {JOBS} jobs", w.id());
    }
}
