//! A real S3-compatible server for the tests (moto's, from the venv `scripts/setup.sh`
//! makes), and a TCP relay in front of it that a test can cut and restore: the object store
//! unreachable, as a network partition or a restart makes it. Shared by the store, server
//! and end-to-end tests.

#![allow(dead_code)] // each test crate uses its part

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `moto_server` on a free loopback port with one bucket, killed on drop. Its state lives
/// in memory, so each test starts from an empty store.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub bucket: String,
}

impl S3Server {
    pub fn start() -> S3Server {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).ancestors().find(|p| p.join(".venv").exists()).map(|p| p.join(".venv/bin/moto_server"));
        let moto = root.filter(|p| p.exists()).expect("moto_server is missing: run scripts/setup.sh (it installs moto[server] in .venv)");
        let port = free_port();
        let child = Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let server = S3Server { child, port, bucket: "lathe".into() };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "moto_server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = server.request("PUT", &format!("/{}", server.bucket), b"");
        assert_eq!(status, 200, "creating the test bucket");
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `object_store` settings that reach this server at `endpoint` (this server's, or a
    /// relay's in front of it).
    pub fn options(endpoint: &str) -> Vec<(String, String)> {
        [("aws_endpoint", endpoint), ("aws_access_key_id", "test"), ("aws_secret_access_key", "test"), ("aws_region", "us-east-1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The same settings as environment variables, for a `lathe` process.
    pub fn env(endpoint: &str) -> Vec<(String, String)> {
        Self::options(endpoint).into_iter().map(|(k, v)| (k.replace("aws_endpoint", "aws_endpoint_url").to_uppercase(), v)).collect()
    }

    /// An unsigned request (moto does not check signatures), for what the store under test
    /// must not be trusted to do itself: making the bucket, planting a corrupt object.
    /// Returns the status code.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> u16 {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", self.port, body.len());
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay from a loopback port to a server. [`cut`](Relay::cut) closes the port and
/// every connection through it (clients get "connection refused" until
/// [`restore`](Relay::restore) listens again on the same port), as when a store becomes
/// unreachable.
pub struct Relay {
    pub port: u16,
    /// The address it listens on: loopback, or another interface's (a network namespace's
    /// link, for clients on another "host").
    bind: Ipv4Addr,
    shared: Arc<RelayShared>,
}

struct RelayShared {
    target: u16,
    cut: AtomicBool,
    /// Client bytes still let through before the relay cuts itself; negative: no limit.
    budget: AtomicI64,
    open: Mutex<Vec<TcpStream>>,
}

impl Relay {
    pub fn to(target: u16) -> Relay {
        Relay::on(Ipv4Addr::LOCALHOST, target)
    }

    /// Listening on `bind`, relaying to the loopback port `target`.
    pub fn on(bind: Ipv4Addr, target: u16) -> Relay {
        let relay = Relay {
            port: TcpListener::bind((bind, 0)).unwrap().local_addr().unwrap().port(),
            bind,
            shared: Arc::new(RelayShared { target, cut: AtomicBool::new(false), budget: AtomicI64::new(-1), open: Mutex::new(Vec::new()) }),
        };
        relay.listen();
        relay
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn listen(&self) {
        let listener = TcpListener::bind((self.bind, self.port)).expect("the relay's port");
        listener.set_nonblocking(true).unwrap();
        let shared = self.shared.clone();
        std::thread::spawn(move || {
            while !shared.cut.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(("127.0.0.1", shared.target)) else {
                            continue;
                        };
                        let mut open = shared.open.lock().unwrap();
                        open.push(client.try_clone().unwrap());
                        open.push(server.try_clone().unwrap());
                        drop(open);
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), shared.clone(), true);
                        pipe(server, client, shared.clone(), false);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // `listener` is dropped here: the port refuses connections.
        });
    }

    /// Closes the port and every connection through it.
    pub fn cut(&self) {
        cut(&self.shared);
        std::thread::sleep(Duration::from_millis(20)); // the accept loop sees it and closes
    }

    /// Cuts once `bytes` more client bytes went through (the middle of an upload).
    pub fn cut_after(&self, bytes: i64) {
        self.shared.budget.store(bytes, Ordering::SeqCst);
    }

    /// Listens again on the same port.
    pub fn restore(&self) {
        let start = Instant::now();
        while TcpStream::connect((self.bind, self.port)).is_ok() {
            assert!(start.elapsed() < Duration::from_secs(5), "the relay's old listener is still open");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.shared.budget.store(-1, Ordering::SeqCst);
        self.shared.cut.store(false, Ordering::SeqCst);
        self.listen();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        cut(&self.shared);
    }
}

fn cut(shared: &RelayShared) {
    shared.cut.store(true, Ordering::SeqCst);
    for stream in shared.open.lock().unwrap().drain(..) {
        let _ = stream.shutdown(Shutdown::Both);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, shared: Arc<RelayShared>, counted: bool) {
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if counted && shared.budget.load(Ordering::SeqCst) >= 0 && shared.budget.fetch_sub(n as i64, Ordering::SeqCst) < n as i64 {
                cut(&shared);
                break;
            }
            if to.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}
