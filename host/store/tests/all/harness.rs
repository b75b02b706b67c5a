//! Real databases for the scenarios: SQLite in a temporary folder, and PostgreSQL, either the
//! server named by `LATHE_TEST_POSTGRES_URL` or a throwaway cluster this process starts.
//! Every test gets a database of its own.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use lathe_store::{Backend, Db};
use sqlx::{Connection, Executor, PgConnection, SqliteConnection};

pub struct TestDb {
    pub db: Db,
    /// What [`Db::connect`] opened; another pool on it is another process's view.
    pub url: String,
    /// The SQLite folder, deleted on drop.
    pub dir: Option<tempfile::TempDir>,
    /// The PostgreSQL database to drop on drop.
    pg_database: Option<String>,
}

impl std::ops::Deref for TestDb {
    type Target = Db;
    fn deref(&self) -> &Db {
        &self.db
    }
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temporary folder");
        let url = format!("sqlite://{}", dir.path().join("lathe.db").display());
        let db = Db::connect(&url).await.expect("opening SQLite");
        assert_eq!(db.backend(), Backend::Sqlite);
        TestDb {
            db,
            url,
            dir: Some(dir),
            pg_database: None,
        }
    }

    pub async fn postgres() -> TestDb {
        let server = server();
        let name = format!(
            "lathe_test_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = PgConnection::connect(&server.admin_url)
            .await
            .expect("connecting to the test PostgreSQL server");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("CREATE DATABASE");
        admin.close().await.expect("closing the admin connection");
        let url = server.url_for(&name);
        let db = Db::connect(&url).await.expect("opening PostgreSQL");
        assert_eq!(db.backend(), Backend::Postgres);
        TestDb {
            db,
            url,
            dir: None,
            pg_database: Some(name),
        }
    }

    /// A second, independent pool on the same database, as another process would have.
    pub async fn connect_again(&self) -> Db {
        Db::connect(&self.url)
            .await
            .expect("opening the database again")
    }

    /// Rows read behind the store's back, to check what it really wrote.
    pub async fn raw<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        match self.db.backend() {
            Backend::Sqlite => {
                let mut c = SqliteConnection::connect(&self.url)
                    .await
                    .expect("raw SQLite connection");
                sqlx::query_as(sql)
                    .fetch_all(&mut c)
                    .await
                    .expect("raw query")
            }
            Backend::Postgres => {
                let mut c = PgConnection::connect(&self.url)
                    .await
                    .expect("raw PostgreSQL connection");
                sqlx::query_as(sql)
                    .fetch_all(&mut c)
                    .await
                    .expect("raw query")
            }
        }
    }
}

impl TestDb {
    /// Restarts this test process's PostgreSQL cluster (a fast shutdown: every connection
    /// is cut, as a database failover or an upgrade would) and waits until it accepts
    /// connections again; `pause` is how long it stays down. Panics for a server this
    /// process did not start.
    pub fn restart_postgres(&self, pause: std::time::Duration) {
        let cluster = server().cluster.as_ref().expect("a cluster this process started (unset LATHE_TEST_POSTGRES_URL)");
        run(as_postgres(&cluster.pg_ctl, cluster.root).arg("-D").arg(&cluster.data).args(["-m", "fast", "-w", "stop"]), "pg_ctl stop").unwrap();
        std::thread::sleep(pause);
        let log = cluster.data.parent().unwrap().join("postgres.log");
        let mut start = as_postgres(&cluster.pg_ctl, cluster.root);
        start.arg("-D").arg(&cluster.data).arg("-l").arg(&log).args(["-w", "-t", "60", "-o"]).arg(&cluster.options).arg("start");
        run(&mut start, "pg_ctl start").unwrap();
    }

    /// Runs SQL behind the store's back (several statements may be given), to put the
    /// database in a state the store would never make: a fault to survive.
    pub async fn exec(&self, sql: &str) {
        match self.db.backend() {
            Backend::Sqlite => {
                let mut c = SqliteConnection::connect(&self.url).await.expect("raw SQLite connection");
                c.execute(sql).await.expect("raw SQL");
            }
            Backend::Postgres => {
                let mut c = PgConnection::connect(&self.url).await.expect("raw PostgreSQL connection");
                c.execute(sql).await.expect("raw SQL");
            }
        }
    }
}

impl Drop for TestDb {
    /// Drops the test's PostgreSQL database (on a thread of its own: `drop` cannot await).
    fn drop(&mut self) {
        let Some(name) = self.pg_database.take() else {
            return;
        };
        let admin_url = server().admin_url.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await
                    .ok()
            })
        });
        // A database left behind is harmless; the cluster (or the test server) outlives it.
        let _ = dropped.join();
    }
}

static NEXT_DATABASE: AtomicUsize = AtomicUsize::new(0);

struct Server {
    /// A database that exists, to run CREATE/DROP DATABASE from.
    admin_url: String,
    /// `scheme://user@host:port`, to which `/<database>` and `query` are appended.
    base: String,
    query: String,
    /// The cluster this process started (none for `LATHE_TEST_POSTGRES_URL`'s).
    cluster: Option<Cluster>,
}

/// A throwaway cluster: its `pg_ctl`, data folder, server options (its port among them),
/// and whether it runs as `postgres`.
struct Cluster {
    pg_ctl: PathBuf,
    data: PathBuf,
    options: String,
    root: bool,
}

impl Server {
    fn url_for(&self, database: &str) -> String {
        format!("{}/{database}{}", self.base, self.query)
    }
}

/// The PostgreSQL server of this test process, started on first use.
fn server() -> &'static Server {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    match SERVER.get_or_init(|| match std::env::var("LATHE_TEST_POSTGRES_URL") {
        Ok(url) => Ok(external(&url)),
        Err(_) => start_cluster(),
    }) {
        Ok(server) => server,
        Err(e) => panic!("{e}"),
    }
}

/// `postgres://user:pw@host:port/db?opts` → admin URL as given; test databases next to `db`.
fn external(url: &str) -> Server {
    let (main, query) = url
        .split_once('?')
        .map_or((url, String::new()), |(m, q)| (m, format!("?{q}")));
    let authority = main.find("://").map_or(0, |i| i + 3);
    let path = main[authority..]
        .find('/')
        .map_or(main.len(), |i| i + authority);
    Server {
        admin_url: url.to_owned(),
        base: main[..path].to_owned(),
        query,
        cluster: None,
    }
}

const NO_POSTGRES: &str = "the PostgreSQL tests need a server: none is named by LATHE_TEST_POSTGRES_URL, \
     and no initdb/pg_ctl was found under /usr/lib/postgresql/*/bin to start one. \
     Run scripts/setup.sh (it installs Debian's `postgresql` package) or set \
     LATHE_TEST_POSTGRES_URL=postgres://user:password@host:port/database";

/// The newest PostgreSQL installed the Debian way.
fn find_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// PostgreSQL refuses to run as root; as root, its programs run as the `postgres` user that
/// Debian's package creates.
fn as_postgres(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let out = command.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// initdb into a temporary folder and start the server on a free local port, with a
/// watchdog that stops it and deletes the folder once this test process has exited.
fn start_cluster() -> Result<Server, String> {
    let bin = find_bin_dir().ok_or(NO_POSTGRES)?;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let dir = tempfile::Builder::new()
        .prefix("lathe-test-pg-")
        .tempdir()
        .map_err(|e| format!("temporary folder for PostgreSQL: {e}"))?
        .keep();
    if root {
        run(
            Command::new("chown").arg("postgres:").arg(&dir),
            "chown of the PostgreSQL folder to `postgres`",
        )?;
    }
    let data = dir.join("data");
    let pg_ctl = bin.join("pg_ctl");

    // The watchdog goes first, so that it cleans up after a failed start too. It runs in a
    // process group of its own, so it survives a test runner killing this process's group.
    let mut stop = as_postgres(&pg_ctl, root);
    stop.arg("-D").arg(&data).args(["-m", "immediate", "stop"]);
    Command::new("sh")
        .arg("-c")
        .arg(r#"pid=$1; dir=$2; shift 2; while kill -0 "$pid" 2>/dev/null; do sleep 1; done; "$@" >/dev/null 2>&1; rm -rf "$dir""#)
        .arg("sh")
        .arg(std::process::id().to_string())
        .arg(&dir)
        .arg(stop.get_program())
        .args(stop.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the PostgreSQL watchdog: {e}"))?;

    run(
        as_postgres(&bin.join("initdb"), root)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ]),
        "initdb",
    )?;

    let log = dir.join("postgres.log");
    let mut last_error = String::new();
    // A free port can be taken by someone else before the server binds it: try a few.
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let options = format!(
            "-k {} -c listen_addresses=127.0.0.1 -p {port} -c max_connections=400 -c shared_buffers=32MB \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            dir.display()
        );
        let started = run(
            as_postgres(&pg_ctl, root)
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o"])
                .arg(&options)
                .arg("start"),
            "pg_ctl start",
        );
        match started {
            Ok(()) => {
                let base = format!("postgres://postgres@127.0.0.1:{port}");
                return Ok(Server {
                    admin_url: format!("{base}/postgres"),
                    base,
                    query: String::new(),
                    cluster: Some(Cluster { pg_ctl, data, options, root }),
                });
            }
            Err(e) => {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                last_error = format!("{e}\nserver log:\n{log}");
            }
        }
    }
    Err(format!(
        "could not start the test PostgreSQL cluster in {}: {last_error}",
        dir.display()
    ))
}
