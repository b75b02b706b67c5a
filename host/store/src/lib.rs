//! Lathe's persistent state.
//!
//! - [`Db`]: metadata (teams, their members and API tokens, projects, files, plugins, eval suites) and the job
//!   table with leases, on SQLite (the embedded default: one file, nothing to run) or on
//!   PostgreSQL (several servers and workers sharing one state). The SQL is written once
//!   where both dialects agree, which is almost everywhere; the few places that differ (the
//!   claim's `FOR UPDATE SKIP LOCKED`, LISTEN/NOTIFY) say so.
//! - [`ArtifactStore`]: content-addressed blobs (datasets, checkpoints, adapters, plugins)
//!   named by their sha256; rows in the database point at them. In a local folder
//!   ([`LocalArtifacts`], the default) or an S3-compatible bucket ([`S3Artifacts`]).
//!
//! Timestamps are unix milliseconds (`i64`) on both backends, taken from the caller's clock:
//! hosts that share a PostgreSQL database should keep their clocks synchronised (NTP), and
//! leases should be much longer than the skew between them.

mod artifacts;
mod auth;
mod deployments;
mod error;
mod jobs;
mod members;
mod packs;
mod projects;
mod sessions;
mod workers;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use artifacts::{ArtifactStore, LocalArtifacts, MULTIPART_THRESHOLD, S3Artifacts, S3Config};
pub use auth::{Secret, Team, TokenInfo};
pub use deployments::{Deployment, NewDeployment, check_deploy_name};
pub use error::{Result, StoreError};
pub use jobs::{Capabilities, JobEvent, JobRow, JobState, JobTiming, Lease, Needs, NewJob};
pub use members::{MEMBER, Member, OWNER, ROLES};
pub use packs::{PackInstall, PackRow, ProjectPack};
pub use projects::{FileRow, NewFile, NewPlugin, PluginRow, Project, SuiteRow};
pub use sessions::{SESSION_TTL_MS, WebSession};
pub use workers::WorkerRow;

/// How long a SQLite connection waits for another writer (another pool or process on the
/// same file) before giving up with "database is locked".
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per pool. SQLite runs one writer at a time whatever the pool size, so a few
/// serve its concurrent readers; PostgreSQL's allow for the server's parallel requests (one
/// of them is the job listener's, see `Db::wait_for_work`).
const SQLITE_POOL_SIZE: u32 = 8;
const POSTGRES_POOL_SIZE: u32 = 16;
/// How often opening a SQLite database tries again after losing a race (see `open_sqlite`).
const SQLITE_OPEN_RETRIES: u32 = 5;

/// Which database a [`Db`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle on the database: a connection pool, cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool, Arc<jobs::PgWakeups>),
}

/// Runs the same code on whichever pool the [`Db`] holds: `$pool` is a `&SqlitePool` in one
/// arm and a `&PgPool` in the other, so one query written with `sqlx::query*` serves both.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match &$db.pool {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool, _) => $body,
        }
    };
}
pub(crate) use on_pool;

impl Db {
    /// Opens `sqlite:///abs/path/lathe.db` (created if missing; WAL, foreign keys on, a busy
    /// timeout so several pools or processes can share the file) or `postgres://…`, and
    /// applies the migrations for that backend.
    pub async fn connect(url: &str) -> Result<Db> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?;
            // Every connection to `:memory:` would see a database of its own.
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            Self::open_sqlite(options, if in_memory { 1 } else { SQLITE_POOL_SIZE }).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(POSTGRES_POOL_SIZE)
                .connect(url)
                .await?;
            sqlx::migrate!("../../migrations/postgres")
                .run(&pool)
                .await?;
            Ok(Db {
                pool: Pool::Postgres(pool, Arc::default()),
            })
        } else {
            // Only the scheme: the rest may hold a password.
            let scheme = url.split_once(':').map_or("(none)", |(s, _)| s);
            Err(StoreError::Invalid(format!(
                "database URL scheme `{scheme}`: expected sqlite:///path/to/lathe.db or postgres://…"
            )))
        }
    }

    /// The embedded default: the SQLite file `<data_dir>/lathe.db`, the folder created if
    /// missing.
    pub async fn open_embedded(data_dir: &Path) -> Result<Db> {
        std::fs::create_dir_all(data_dir).map_err(StoreError::io(data_dir))?;
        Self::open_sqlite(
            SqliteConnectOptions::new().filename(data_dir.join("lathe.db")),
            SQLITE_POOL_SIZE,
        )
        .await
    }

    /// Opens the pool and migrates. Processes that open a fresh file at the same moment race
    /// twice: switching the new file to WAL can fail at once with "database is locked" (SQLite
    /// does not wait where waiting could deadlock), and migrations take no lock on SQLite (on
    /// PostgreSQL they take an advisory one), so both apply a migration and the later one
    /// fails, its transaction rolled back. The loser simply opens again: the file is then in
    /// WAL mode and the migrations are recorded as applied.
    async fn open_sqlite(options: SqliteConnectOptions, max_connections: u32) -> Result<Db> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Durable at every checkpoint, not every commit: WAL keeps the file consistent.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(SQLITE_BUSY_TIMEOUT);
        let mut retries = 0;
        loop {
            match Self::try_open_sqlite(&options, max_connections).await {
                Ok(db) => return Ok(db),
                Err(e) if retries < SQLITE_OPEN_RETRIES && lost_open_race(&e) => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(retries))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_open_sqlite(options: &SqliteConnectOptions, max_connections: u32) -> Result<Db> {
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options.clone())
            .await?;
        if let Err(e) = sqlx::migrate!("../../migrations/sqlite").run(&pool).await {
            pool.close().await;
            return Err(e.into());
        }
        Ok(Db {
            pool: Pool::Sqlite(pool),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(..) => Backend::Postgres,
        }
    }

    /// Closes every connection, waiting for queries in flight; later calls fail. (The
    /// PostgreSQL listener of [`Db::wait_for_work`] lets go of its connection on its own.)
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// Whether opening SQLite failed the way a concurrent open of a fresh file makes it fail:
/// SQLITE_BUSY or SQLITE_LOCKED (primary codes 5 and 6, whatever the extended code), or a
/// migration that another process applied first.
fn lost_open_race(e: &StoreError) -> bool {
    match e {
        StoreError::Migrate(_) => true,
        StoreError::Database(sqlx::Error::Database(d)) => d
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
        _ => false,
    }
}

/// Milliseconds since the unix epoch, the one timestamp format of every table.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `n` random characters from `[a-z0-9]`.
pub(crate) fn random_lower_alnum(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A new job id, for callers that name output folders after the job before queuing it
/// ([`NewJob::id`]).
pub fn new_job_id() -> String {
    new_id("job")
}

/// A new row id such as `job_k3v9…`: the prefix says what it names, 20 random characters
/// (about 103 bits) make collisions a non-issue.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_lower_alnum(20))
}
