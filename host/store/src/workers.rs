//! The workers that share the job table: each announces what it can run when it starts and
//! again each time it looks for work, so the server can show who is there, what each can
//! run and which job each holds. A worker that stops announcing is gone; its jobs come
//! back to the queue when their leases expire (see `jobs.rs`), not through this table.

use serde::Serialize;
use sqlx::types::Json;

use crate::jobs::Capabilities;
use crate::{Db, Result, now_ms, on_pool};

/// A worker as it last announced itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct WorkerRow {
    pub id: String,
    /// The machine it runs on.
    pub host: String,
    pub device: String,
    pub memory_mb: i64,
    /// The job kinds it claims; empty for all.
    #[sqlx(json)]
    pub kinds: Vec<String>,
    pub started_at: i64,
    pub seen_at: i64,
    /// The jobs it holds now (running under its lease), by id: from the job table, not
    /// this one.
    #[sqlx(skip)]
    pub running: Vec<String>,
}

impl Db {
    /// Records (or refreshes) a worker's announcement: what it can run, seen now. The first
    /// announcement of an id sets its start.
    pub async fn announce_worker(&self, id: &str, host: &str, can: &Capabilities, kinds: &[&str]) -> Result<()> {
        let sql = "INSERT INTO workers (id, host, device, memory_mb, kinds, started_at, seen_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $6) \
                   ON CONFLICT (id) DO UPDATE SET host = $2, device = $3, memory_mb = $4, kinds = $5, seen_at = $6";
        on_pool!(self, p => sqlx::query(sql)
            .bind(id)
            .bind(host)
            .bind(&can.device)
            .bind(can.memory_mb)
            .bind(Json(kinds))
            .bind(now_ms())
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// The workers seen at or after `since` (unix ms), newest start first, each with the
    /// jobs it runs now.
    pub async fn workers(&self, since: i64) -> Result<Vec<WorkerRow>> {
        let sql = "SELECT id, host, device, memory_mb, kinds, started_at, seen_at FROM workers \
                   WHERE seen_at >= $1 ORDER BY started_at DESC, id";
        let mut workers: Vec<WorkerRow> = on_pool!(self, p => sqlx::query_as(sql).bind(since).fetch_all(p).await)?;
        let running = "SELECT worker, id FROM jobs WHERE state = 'running' AND worker IS NOT NULL ORDER BY seq";
        let held: Vec<(String, String)> = on_pool!(self, p => sqlx::query_as(running).fetch_all(p).await)?;
        for w in &mut workers {
            w.running = held.iter().filter(|(worker, _)| *worker == w.id).map(|(_, job)| job.clone()).collect();
        }
        Ok(workers)
    }
}
