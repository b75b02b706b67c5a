use std::io;
use std::path::{Path, PathBuf};

/// Everything the store can fail with. The server maps `NotFound` to 404, `Conflict` to
/// 409, `Invalid` to 400 and the rest to 500; a worker that gets `LeaseLost` stops working
/// on that job, because someone else now owns it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    /// A unique constraint: a second project with the same name in one team, and the like.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The lease with this fencing token no longer holds the job: it expired and was reaped
    /// (and perhaps claimed by another worker), or the job was finished or cancelled.
    #[error(
        "job `{job}`: the lease with fencing token {token} is no longer held (expired and reaped, re-claimed, or the job finished)"
    )]
    LeaseLost { job: String, token: i64 },
    /// Input the store refuses before touching anything: a malformed URL, sha256, job spec.
    #[error("invalid {0}")]
    Invalid(String),
    /// Bytes given for an artifact did not hash to the sha256 they were announced with.
    #[error("artifact content does not match its sha256: expected {expected}, got {actual}")]
    Integrity { expected: String, actual: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The object store refused or failed a request, after retrying it for as long as the
    /// store was configured to wait where the failure was transient (unreachable, 5xx).
    #[error("object store {url}: {what}: {source}")]
    ObjectStore { url: String, what: String, source: Box<object_store::Error> },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("applying migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    pub(crate) fn not_found(what: &'static str, id: &str) -> StoreError {
        StoreError::NotFound {
            what,
            id: id.to_owned(),
        }
    }

    /// For `map_err`: an I/O error that names the file it happened on.
    pub(crate) fn io(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Classifies a failed insert: a unique violation becomes `Conflict(conflict())`, a foreign
/// key violation (the parent row does not exist) becomes `missing`, anything else stays a
/// database error.
pub(crate) fn on_insert_error(
    e: sqlx::Error,
    conflict: impl FnOnce() -> String,
    missing: impl FnOnce() -> StoreError,
) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(conflict()),
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => missing(),
        _ => StoreError::Database(e),
    }
}

/// Whether an error is a unique violation (for the few inserts that retry on a race).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}
