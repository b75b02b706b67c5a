//! The job table: a queue with leases, in plain SQL.
//!
//! A worker [`claim`](Db::claim)s a queued job and receives a [`Lease`]: the row is now
//! `running`, owned by that worker until `lease_expires_at`, and carries a fencing token that
//! every claim of the job increments. The worker [`heartbeat`](Db::heartbeat)s to extend the
//! lease (and learns whether cancellation was requested), appends events, and finally
//! completes, fails or marks the job cancelled. Every one of those writes names the token it
//! holds; once the lease was reaped ([`reap_expired`](Db::reap_expired)) and perhaps claimed
//! again, the old holder's writes match no row and return [`StoreError::LeaseLost`], so a
//! worker that was merely slow can never overwrite the work of the one that replaced it.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::types::Json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::on_insert_error;
use crate::{Backend, Db, Pool, Result, StoreError, duration_ms, new_id, now_ms, on_pool};

/// The PostgreSQL channel that [`Db::enqueue`] (and every requeue) notifies.
const WORK_CHANNEL: &str = "lathe_jobs";
/// How long SQLite's [`Db::wait_for_work`] sleeps at most: it has no notifications, so this
/// bounds how late an idle worker notices a new job.
const SQLITE_POLL: Duration = Duration::from_millis(250);
/// Pause before the PostgreSQL listener reconnects after losing its connection.
const LISTENER_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The spelling in the `state` column and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled: nothing will change the job any more.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for JobState {
    type Error = StoreError;

    fn try_from(s: String) -> Result<JobState> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| StoreError::Invalid(format!("job state `{s}`")))
    }
}

/// A job to queue. Higher `priority` runs first; within a priority, the older job first.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    /// The job's id when the caller chose it ([`crate::new_job_id`]); a new one otherwise.
    pub id: Option<String>,
    pub project_id: String,
    /// Which pipeline runs it (`train`, `eval`, …); workers claim the kinds they can run.
    pub kind: String,
    pub spec: Value,
    pub priority: i32,
    /// How many claims the job gets before a retryable failure or a dead worker fails it.
    pub max_attempts: i32,
    /// The plugins it runs with: name → sha256, pinned when it is queued.
    pub plugins: BTreeMap<String, String>,
    /// What it needs of the worker that runs it.
    pub needs: Needs,
}

/// What a job needs of its worker: only a worker that has it claims the job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Needs {
    /// The device kind (`cpu`, `cuda`, `wgpu`); any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Memory in MiB (the GPU's for a GPU worker, the host's otherwise); any when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_mb: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// What a worker can run, as it announces itself: its device kind and memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    pub device: String,
    pub memory_mb: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub project_id: String,
    pub kind: String,
    #[sqlx(json)]
    pub spec: Value,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    pub priority: i32,
    /// Claims so far, this one included while running.
    pub attempts: i32,
    pub max_attempts: i32,
    /// The worker that holds (or last held) the job.
    pub worker: Option<String>,
    /// The fencing token of the latest claim (0 before the first).
    pub lease_token: i64,
    pub lease_expires_at: Option<i64>,
    pub cancel_requested: bool,
    /// Why the job failed, or why its last attempt did when it was requeued.
    pub error: Option<String>,
    #[sqlx(json(nullable))]
    pub outcome: Option<Value>,
    /// The plugins it runs with: name → sha256, pinned when it was queued.
    #[sqlx(json)]
    pub plugins: BTreeMap<String, String>,
    /// The device kind it needs, if any.
    pub needs_device: Option<String>,
    /// The memory it needs in MiB (0: any).
    pub needs_memory_mb: i64,
    /// The sha256 of the manifest of its latest checkpoint in the artifact store
    /// ([`Db::record_checkpoint`]), for a worker that resumes it on another machine.
    pub checkpoint: Option<String>,
    pub created_at: i64,
    /// When the latest attempt started.
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// A claimed job: the row as claimed, and the fencing token that the worker's writes name.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    pub job: JobRow,
    /// Strictly increasing over the claims of this job.
    pub token: i64,
    pub worker: String,
}

/// Sums over the job table: jobs that started and their time queued, jobs that finished
/// and their time running (milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobTiming {
    pub started: i64,
    pub wait_ms_sum: i64,
    pub finished: i64,
    pub run_ms_sum: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct JobEvent {
    /// 1, 2, 3 … within one job.
    pub seq: i64,
    pub kind: String,
    #[sqlx(json)]
    pub data: Value,
    pub created_at: i64,
}

macro_rules! job_columns {
    () => {
        "id, project_id, kind, spec, state, priority, attempts, max_attempts, worker, lease_token, \
         lease_expires_at, cancel_requested, error, outcome, plugins, needs_device, needs_memory_mb, \
         checkpoint, created_at, started_at, finished_at"
    };
}

/// The claim: one `UPDATE` whose subquery picks the job. On SQLite a single write statement
/// holds the database's write lock from its first read to its commit, so two processes
/// cannot pick the same row; on PostgreSQL the subquery locks the row it picks and skips
/// rows other claimers have locked, so concurrent claimers take different jobs without
/// waiting on each other. With `fits`, `$4` and `$5` are the worker's device kind and
/// memory and only jobs whose needs they meet are picked; the kinds, if any, follow.
fn claim_sql(backend: Backend, fits: bool, kinds: usize) -> String {
    let first_kind = if fits { 6 } else { 4 };
    let mut filter = match kinds {
        0 => String::new(),
        n => format!(
            " AND kind IN ({})",
            (first_kind..first_kind + n)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if fits {
        filter.push_str(" AND (needs_device IS NULL OR needs_device = $4) AND needs_memory_mb <= $5");
    }
    let kind_filter = filter;
    let lock = match backend {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
    };
    format!(
        "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = $1, \
                lease_token = lease_token + 1, lease_expires_at = $2, started_at = $3 \
         WHERE state = 'queued' AND id = (\
             SELECT id FROM jobs WHERE state = 'queued'{kind_filter} \
             ORDER BY priority DESC, seq LIMIT 1{lock}) \
         RETURNING {}",
        job_columns!()
    )
}

impl Db {
    pub async fn enqueue(&self, job: NewJob) -> Result<JobRow> {
        if job.max_attempts < 1 {
            return Err(StoreError::Invalid(format!(
                "job: max_attempts is {}, must be at least 1",
                job.max_attempts
            )));
        }
        if job.needs.memory_mb < 0 {
            return Err(StoreError::Invalid(format!("job: needs {} MiB of memory; give 0 for any", job.needs.memory_mb)));
        }
        let sql = concat!(
            "INSERT INTO jobs (id, project_id, kind, spec, state, priority, max_attempts, created_at, plugins, \
             needs_device, needs_memory_mb) \
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10) RETURNING ",
            job_columns!()
        );
        let id = job.id.clone().unwrap_or_else(|| new_id("job"));
        let row: JobRow = on_pool!(self, p => sqlx::query_as(sql)
            .bind(&id)
            .bind(&job.project_id)
            .bind(&job.kind)
            .bind(Json(&job.spec))
            .bind(job.priority)
            .bind(job.max_attempts)
            .bind(now_ms())
            .bind(Json(&job.plugins))
            .bind(&job.needs.device)
            .bind(job.needs.memory_mb)
            .fetch_one(p)
            .await)
        .map_err(|e| {
            on_insert_error(
                e,
                || format!("job id `{id}` already exists"),
                || StoreError::not_found("project", &job.project_id),
            )
        })?;
        self.notify_work(&row.kind).await;
        Ok(row)
    }

    /// Claims the highest-priority, oldest queued job whose kind is one of `kinds` (any kind
    /// when empty) for `worker`, leased for `lease`, whatever the job needs. `None` when
    /// there is nothing to do.
    pub async fn claim(
        &self,
        worker: &str,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Lease>> {
        self.claim_fitting(worker, kinds, None, lease).await
    }

    /// [`claim`](Db::claim) of a job whose needs `fits` meets (its device kind, its memory),
    /// when given: what a worker that announced its capabilities claims.
    pub async fn claim_fitting(
        &self,
        worker: &str,
        kinds: &[&str],
        fits: Option<&Capabilities>,
        lease: Duration,
    ) -> Result<Option<Lease>> {
        let sql = claim_sql(self.backend(), fits.is_some(), kinds.len());
        let now = now_ms();
        let row: Option<JobRow> = on_pool!(self, p => {
            let mut query = sqlx::query_as(&sql).bind(worker).bind(now.saturating_add(duration_ms(lease))).bind(now);
            if let Some(c) = fits {
                query = query.bind(&c.device).bind(c.memory_mb);
            }
            for kind in kinds {
                query = query.bind(*kind);
            }
            query.fetch_optional(p).await
        })?;
        Ok(row.map(|job| Lease {
            token: job.lease_token,
            worker: worker.to_owned(),
            job,
        }))
    }

    /// Extends the lease to `lease` from now, if it is still held, and says whether someone
    /// asked to cancel the job (the worker should then stop and [`mark_cancelled`](Db::mark_cancelled)).
    /// A lease past its expiry that no reaper has taken yet is still held: the token, not the
    /// clock, decides.
    pub async fn heartbeat(&self, l: &Lease, lease: Duration) -> Result<bool> {
        let sql = "UPDATE jobs SET lease_expires_at = $3 \
                   WHERE id = $1 AND lease_token = $2 AND state = 'running' RETURNING cancel_requested";
        let expires = now_ms().saturating_add(duration_ms(lease));
        let cancel: Option<bool> = on_pool!(self, p =>
            sqlx::query_scalar(sql).bind(&l.job.id).bind(l.token).bind(expires).fetch_optional(p).await)?;
        cancel.ok_or_else(|| lease_lost(l))
    }

    /// Records the manifest of the job's latest stored checkpoint (see
    /// [`JobRow::checkpoint`]); fenced like every write of a worker.
    pub async fn record_checkpoint(&self, l: &Lease, manifest_sha256: &str) -> Result<()> {
        let sql = "UPDATE jobs SET checkpoint = $3 WHERE id = $1 AND lease_token = $2 AND state = 'running'";
        let done = on_pool!(self, p =>
            sqlx::query(sql).bind(&l.job.id).bind(l.token).bind(manifest_sha256).execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 { Err(lease_lost(l)) } else { Ok(()) }
    }

    pub async fn complete(&self, l: &Lease, outcome: Value) -> Result<()> {
        let sql = "UPDATE jobs SET state = 'succeeded', outcome = $3, error = NULL, finished_at = $4, \
                          lease_expires_at = NULL \
                   WHERE id = $1 AND lease_token = $2 AND state = 'running'";
        let done = on_pool!(self, p =>
            sqlx::query(sql).bind(&l.job.id).bind(l.token).bind(Json(&outcome)).bind(now_ms()).execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(lease_lost(l));
        }
        Ok(())
    }

    /// Records a failed attempt. A `retryable` failure requeues the job while it has attempts
    /// left (and nobody asked to cancel it); otherwise the job is failed for good.
    pub async fn fail(&self, l: &Lease, error: &str, retryable: bool) -> Result<()> {
        let sql = "UPDATE jobs SET \
                       state = CASE WHEN $3 AND attempts < max_attempts AND NOT cancel_requested \
                                    THEN 'queued' ELSE 'failed' END, \
                       finished_at = CASE WHEN $3 AND attempts < max_attempts AND NOT cancel_requested \
                                          THEN NULL ELSE $5 END, \
                       error = $4, lease_expires_at = NULL \
                   WHERE id = $1 AND lease_token = $2 AND state = 'running' \
                   RETURNING state";
        let state: Option<String> = on_pool!(self, p => sqlx::query_scalar(sql)
            .bind(&l.job.id)
            .bind(l.token)
            .bind(retryable)
            .bind(error)
            .bind(now_ms())
            .fetch_optional(p)
            .await)?;
        match state.as_deref() {
            None => Err(lease_lost(l)),
            Some("queued") => {
                self.notify_work(&l.job.kind).await;
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }

    /// The worker stopped because cancellation was requested.
    pub async fn mark_cancelled(&self, l: &Lease) -> Result<()> {
        let sql = "UPDATE jobs SET state = 'cancelled', finished_at = $3, lease_expires_at = NULL \
                   WHERE id = $1 AND lease_token = $2 AND state = 'running'";
        let done = on_pool!(self, p => sqlx::query(sql).bind(&l.job.id).bind(l.token).bind(now_ms()).execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(lease_lost(l));
        }
        Ok(())
    }

    /// Cancels a job: a queued one at once; a running one by setting `cancel_requested`,
    /// which its worker learns at its next heartbeat. A finished job is left as it is.
    /// Returns the row after the change.
    pub async fn cancel(&self, project_id: &str, job_id: &str) -> Result<JobRow> {
        let sql = concat!(
            "UPDATE jobs SET \
                 state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END, \
                 finished_at = CASE WHEN state = 'queued' THEN $3 ELSE finished_at END, \
                 cancel_requested = CASE WHEN state IN ('queued', 'running') THEN TRUE ELSE cancel_requested END \
             WHERE id = $1 AND project_id = $2 \
             RETURNING ",
            job_columns!()
        );
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(job_id).bind(project_id).bind(now_ms()).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("job", job_id))
    }

    /// Queues a failed or cancelled job again, with one more attempt: the same id, spec and
    /// folders, so a training job continues from its last checkpoint. Its events go on
    /// after the ones it has. `Conflict` for a job that is queued, running or succeeded.
    pub async fn retry(&self, project_id: &str, job_id: &str) -> Result<JobRow> {
        let sql = concat!(
            "UPDATE jobs SET state = 'queued', max_attempts = attempts + 1, cancel_requested = FALSE, \
                 error = NULL, outcome = NULL, finished_at = NULL, worker = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND project_id = $2 AND state IN ('failed', 'cancelled') \
             RETURNING ",
            job_columns!()
        );
        let row: Option<JobRow> = on_pool!(self, p => sqlx::query_as(sql).bind(job_id).bind(project_id).fetch_optional(p).await)?;
        match row {
            Some(row) => {
                self.notify_work(&row.kind).await;
                Ok(row)
            }
            None => {
                let current = self.job(project_id, job_id).await?;
                Err(StoreError::Conflict(format!(
                    "job `{job_id}` is {}: only a failed or cancelled job is retried",
                    current.state.as_str()
                )))
            }
        }
    }

    /// Deals with running jobs whose lease expired (their worker died or hangs): requeued
    /// while attempts are left, failed otherwise, cancelled if cancellation was requested.
    /// Returns how many jobs it touched. Safe to run from every server and worker at once.
    pub async fn reap_expired(&self) -> Result<u64> {
        let sql = "UPDATE jobs SET \
                       state = CASE WHEN cancel_requested THEN 'cancelled' \
                                    WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END, \
                       finished_at = CASE WHEN NOT cancel_requested AND attempts < max_attempts \
                                          THEN NULL ELSE $1 END, \
                       error = 'worker ' || COALESCE(worker, '?') || ' stopped heartbeating and its lease expired \
                                (attempt ' || attempts || ' of ' || max_attempts || ')', \
                       lease_expires_at = NULL \
                   WHERE state = 'running' AND lease_expires_at < $1 \
                   RETURNING state";
        let states: Vec<String> =
            on_pool!(self, p => sqlx::query_scalar(sql).bind(now_ms()).fetch_all(p).await)?;
        if states.iter().any(|s| s == "queued") {
            self.notify_work("").await;
        }
        Ok(states.len() as u64)
    }

    /// A job of this project; `NotFound` for another project's job.
    pub async fn job(&self, project_id: &str, id: &str) -> Result<JobRow> {
        let sql = concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1 AND project_id = $2"
        );
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(id).bind(project_id).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("job", id))
    }

    /// A job by id alone, for workers, which are not scoped to a project.
    pub async fn job_any(&self, id: &str) -> Result<JobRow> {
        let sql = concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1");
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("job", id))
    }

    /// A project's jobs, newest first, at most `limit`, of one kind if `kind` is given,
    /// starting after the job `after` (the last id of the previous page, as OpenAI's
    /// `after`). `NotFound` for an unknown cursor.
    pub async fn jobs(
        &self,
        project_id: &str,
        kind: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        let before_seq = match after {
            None => i64::MAX,
            Some(after) => {
                let sql = "SELECT seq FROM jobs WHERE id = $1 AND project_id = $2";
                let seq: Option<i64> = on_pool!(self, p => sqlx::query_scalar(sql).bind(after).bind(project_id).fetch_optional(p).await)?;
                seq.ok_or_else(|| StoreError::not_found("job", after))?
            }
        };
        let limit = limit.max(0);
        Ok(match kind {
            None => {
                let sql = concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE project_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
                );
                on_pool!(self, p => sqlx::query_as(sql).bind(project_id).bind(before_seq).bind(limit).fetch_all(p).await)?
            }
            Some(kind) => {
                let sql = concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE project_id = $1 AND kind = $4 AND seq < $2 ORDER BY seq DESC LIMIT $3"
                );
                on_pool!(self, p => sqlx::query_as(sql).bind(project_id).bind(before_seq).bind(limit).bind(kind).fetch_all(p).await)?
            }
        })
    }

    /// Appends an event through a lease: `LeaseLost` if the lease is no longer held, so a
    /// replaced worker cannot add to the log of the attempt that replaced it.
    pub async fn append_event(&self, l: &Lease, kind: &str, data: Value) -> Result<i64> {
        let bump = "UPDATE jobs SET event_seq = event_seq + 1 \
                    WHERE id = $1 AND state = 'running' AND lease_token = $2 RETURNING event_seq";
        self.insert_event(bump, &l.job.id, Some(l.token), kind, data)
            .await?
            .ok_or_else(|| lease_lost(l))
    }

    /// Appends an event without a lease, in whatever state the job is: the server's own
    /// notes, such as "cancel requested".
    pub async fn append_event_unleased(
        &self,
        job_id: &str,
        kind: &str,
        data: Value,
    ) -> Result<i64> {
        let bump = "UPDATE jobs SET event_seq = event_seq + 1 WHERE id = $1 RETURNING event_seq";
        self.insert_event(bump, job_id, None, kind, data)
            .await?
            .ok_or_else(|| StoreError::not_found("job", job_id))
    }

    /// The event's seq comes from a counter on the job row, bumped in the same transaction:
    /// the bump locks the row, so concurrent appends to one job get 1, 2, 3 … without gaps
    /// or duplicates, and (for leased appends) the same statement checks the fencing token.
    /// `None` when `bump` matched no row.
    async fn insert_event(
        &self,
        bump: &str,
        job_id: &str,
        token: Option<i64>,
        kind: &str,
        data: Value,
    ) -> Result<Option<i64>> {
        let insert = "INSERT INTO job_events (job_id, seq, kind, data, created_at) VALUES ($1, $2, $3, $4, $5)";
        on_pool!(self, p => async {
            // The first statement writes, so SQLite takes the write lock before reading anything.
            let mut tx = p.begin().await?;
            let mut query = sqlx::query_scalar(bump).bind(job_id);
            if let Some(token) = token {
                query = query.bind(token);
            }
            let Some(seq) = query.fetch_optional(&mut *tx).await? else { return Ok(None) };
            sqlx::query(insert)
                .bind(job_id)
                .bind(seq)
                .bind(kind)
                .bind(Json(&data))
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(seq))
        }.await)
    }

    /// A job's events with `seq > after_seq`, in order, at most `limit`. Not scoped to a
    /// project: the server resolves the job with [`Db::job`] first.
    pub async fn events(&self, job_id: &str, after_seq: i64, limit: i64) -> Result<Vec<JobEvent>> {
        let sql = "SELECT seq, kind, data, created_at FROM job_events \
                   WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
        Ok(
            on_pool!(self, p => sqlx::query_as(sql).bind(job_id).bind(after_seq).bind(limit.max(0)).fetch_all(p).await)?,
        )
    }

    /// How many jobs are in each state, every state listed (zero included), for `/metrics`.
    /// Queue wait and run time summed over jobs, for `/metrics`.
    pub async fn job_timing(&self) -> Result<JobTiming> {
        let sql = "SELECT \
                 COUNT(started_at), CAST(COALESCE(SUM(started_at - created_at), 0) AS BIGINT), \
                 COUNT(finished_at - started_at), CAST(COALESCE(SUM(finished_at - started_at), 0) AS BIGINT) \
             FROM jobs";
        let (started, wait, finished, run): (i64, i64, i64, i64) = on_pool!(self, p => sqlx::query_as(sql).fetch_one(p).await)?;
        Ok(JobTiming { started, wait_ms_sum: wait, finished, run_ms_sum: run })
    }

    /// A project's succeeded jobs, counted by kind (the workflow checklist, in one query).
    pub async fn succeeded_by_kind(&self, project_id: &str) -> Result<BTreeMap<String, i64>> {
        let sql = "SELECT kind, COUNT(*) FROM jobs WHERE project_id = $1 AND state = 'succeeded' GROUP BY kind";
        let counts: Vec<(String, i64)> = on_pool!(self, p => sqlx::query_as(sql).bind(project_id).fetch_all(p).await)?;
        Ok(counts.into_iter().collect())
    }

    pub async fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        let sql = "SELECT state, COUNT(*) FROM jobs GROUP BY state";
        let counts: Vec<(String, i64)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(JobState::ALL
            .iter()
            .map(|state| {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == state.as_str())
                    .map_or(0, |(_, n)| *n);
                (state.as_str().to_owned(), n)
            })
            .collect())
    }

    /// Returns when a job may have become available, or after `timeout`. On PostgreSQL a
    /// notification from an enqueue or requeue anywhere wakes it; SQLite has no such thing,
    /// so it sleeps at most a quarter of a second. A wake-up is a hint, not a promise: the
    /// caller claims again, and a job enqueued just before the wait started is found on the
    /// next round at the latest.
    pub async fn wait_for_work(&self, timeout: Duration) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(_) => tokio::time::sleep(timeout.min(SQLITE_POLL)).await,
            Pool::Postgres(pool, wakeups) => {
                let mut notified = pin!(wakeups.notify.notified());
                notified.as_mut().enable();
                wakeups.ensure_listening(pool);
                // Timing out is the ordinary outcome of an idle wait.
                let _ = tokio::time::timeout(timeout, notified).await;
            }
        }
        Ok(())
    }

    /// Wakes idle workers (PostgreSQL). Best effort: the job is already committed, and a
    /// worker that misses the wake-up finds it when its wait times out, so a failure here
    /// must not fail the enqueue (a caller would retry and queue the job twice).
    async fn notify_work(&self, kind: &str) {
        if let Pool::Postgres(pool, _) = &self.pool {
            let _ = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(WORK_CHANNEL)
                .bind(kind)
                .execute(pool)
                .await;
        }
    }
}

fn lease_lost(l: &Lease) -> StoreError {
    StoreError::LeaseLost {
        job: l.job.id.clone(),
        token: l.token,
    }
}

/// The PostgreSQL side of [`Db::wait_for_work`]: one background task per pool LISTENs on
/// [`WORK_CHANNEL`] and wakes every waiting task of this process, so idle workers cost one
/// connection between them rather than one each. Started on the first wait; stopped when
/// the last clone of the [`Db`] goes away.
#[derive(Default)]
pub(crate) struct PgWakeups {
    notify: Arc<Notify>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl PgWakeups {
    fn ensure_listening(&self, pool: &PgPool) {
        // A poisoned lock only means another waiter panicked mid-check; the slot is still valid.
        let mut task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Also restarts the task if the runtime it ran on has gone (tests, CLI one-shots).
        if task.as_ref().is_none_or(|t| t.is_finished()) {
            *task = Some(tokio::spawn(listen(pool.clone(), Arc::clone(&self.notify))));
        }
    }
}

impl Drop for PgWakeups {
    fn drop(&mut self) {
        let task = self
            .task
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(task) = task.take() {
            task.abort();
        }
    }
}

async fn listen(pool: PgPool, notify: Arc<Notify>) {
    while !pool.is_closed() {
        if let Ok(mut listener) = PgListener::connect_with(&pool).await
            && listener.listen(WORK_CHANNEL).await.is_ok()
        {
            // Whatever was enqueued while (re)connecting went unheard: let waiters look.
            notify.notify_waiters();
            // `Ok(None)`: the connection dropped and is being re-established; notifications
            // may have been lost meanwhile, so wake the waiters as for one.
            while let Ok(_notification) = listener.try_recv().await {
                notify.notify_waiters();
            }
        }
        tokio::time::sleep(LISTENER_RETRY).await;
    }
}
