//! A worker: claims queued jobs, runs each pipeline on the blocking pool, stores its
//! events through its lease, heartbeats (which also carries cancel requests), and records
//! the outcome. `lathe serve` runs workers in-process; `lathe worker` runs them alone
//! against a shared database. A worker that loses its lease (it stalled past the lease
//! and the job was given to another) stops writing: every write is fenced by the lease.
//!
//! A worker announces what it can run (its device kind and memory) when it looks for work
//! and with every heartbeat, and claims only the jobs whose needs that meets: a job that
//! needs `cuda` waits for a GPU worker however many CPU workers are idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lathe_jobs::pipeline::Job;
use lathe_jobs::{ErrorKind, Event, JobError, Sink};
use lathe_store::{Capabilities, Lease, StoreError};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::checkpoints::{self, Mirror};
use crate::state::AppState;

/// Who a worker is and what it can run, as it announces itself.
struct Me {
    id: String,
    host: String,
    can: Capabilities,
}

impl Me {
    async fn announce(&self, state: &AppState) {
        if let Err(e) = state.db.announce_worker(&self.id, &self.host, &self.can, &[]).await {
            eprintln!("worker {}: announcing itself: {e}", self.id);
        }
    }
}

/// Runs until `stop` turns true.
pub async fn run(state: Arc<AppState>, worker_id: String, mut stop: watch::Receiver<bool>) {
    let me = Me { id: worker_id, host: crate::state::hostname(), can: state.capabilities() };
    let worker_id = &me.id;
    while !*stop.borrow() {
        me.announce(&state).await;
        if let Err(e) = state.db.reap_expired().await {
            eprintln!("worker {worker_id}: reaping expired leases: {e}");
        }
        match state.db.claim_fitting(worker_id, &[], Some(&me.can), state.config.lease).await {
            Ok(Some(lease)) => run_one(&state, &me, lease).await,
            Ok(None) => {
                tokio::select! {
                    _ = state.db.wait_for_work(Duration::from_secs(2)) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => {
                eprintln!("worker {worker_id}: claiming a job: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Forwards a pipeline's events to the async side, reads the cancel flag, and keeps
/// training checkpoints in the object store when there is one.
struct ChannelSink {
    tx: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    mirror: Option<Mirror>,
}

impl Sink for ChannelSink {
    fn emit(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn checkpoint(&self, _dir: &std::path::Path) -> Result<(), String> {
        match &self.mirror {
            Some(mirror) => mirror.keep().map_err(|e| format!("keeping it in the artifact store: {e}")),
            None => Ok(()),
        }
    }
}

/// Runs one claimed job to its end (or until the lease is lost).
async fn run_one(state: &AppState, me: &Me, lease: Lease) {
    let job: Job = match serde_json::from_value(json!({"kind": lease.job.kind, "spec": lease.job.spec})) {
        Ok(j) => j,
        Err(e) => {
            let _ = state.db.fail(&lease, &format!("the job's spec cannot be read: {e}"), false).await;
            return;
        }
    };
    let env = match state.job_env(&lease.job).await {
        Ok(env) => env,
        Err(e) => {
            let _ = state.db.fail(&lease, &format!("preparing the job: {e}"), true).await;
            return;
        }
    };
    let cancel = Arc::new(AtomicBool::new(lease.job.cancel_requested));
    let (tx, mut rx) = mpsc::unbounded_channel();
    // With an object store, a training job's checkpoints are kept there too, and a job
    // claimed again gets back what its run folder lacks (another machine's disk, or none).
    let run_dir = job.run_dir().filter(|_| state.config.artifacts.is_some()).map(std::path::Path::to_path_buf);
    if let (Some(dir), Some(manifest)) = (&run_dir, lease.job.checkpoint.clone()) {
        let (artifacts, dir) = (state.artifacts.clone(), dir.clone());
        match tokio::task::spawn_blocking(move || checkpoints::restore(artifacts.as_ref(), &manifest, &dir)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                let message = format!("restored the last checkpoint from the artifact store ({n} files)");
                let _ = tx.send(Event::Log { level: lathe_jobs::Level::Info, message });
            }
            Ok(Err(e)) => {
                let _ = state.db.fail(&lease, &format!("restoring the last checkpoint from the artifact store: {e}"), true).await;
                return;
            }
            Err(e) => {
                let _ = state.db.fail(&lease, &format!("restoring the last checkpoint: {e}"), true).await;
                return;
            }
        }
    }
    let mirror = run_dir.map(|dir| Mirror::new(state.artifacts.clone(), state.db.clone(), lease.clone(), dir));
    let sink = ChannelSink { tx, cancel: cancel.clone(), mirror };
    let mut handle = tokio::task::spawn_blocking(move || job.run(&env, &sink));
    let mut beat = tokio::time::interval((state.config.lease / 4).max(Duration::from_millis(250)));
    let mut events = Outbox::default();
    let result = loop {
        tokio::select! {
            Some(event) = rx.recv() => {
                events.push(event);
                events.flush(state, &lease).await;
            }
            _ = beat.tick() => {
                match state.db.heartbeat(&lease, state.config.lease).await {
                    Ok(true) => cancel.store(true, Ordering::SeqCst),
                    Ok(false) => {}
                    Err(StoreError::LeaseLost { .. }) => events.fenced = true,
                    Err(e) => eprintln!("job {}: heartbeat: {e}", lease.job.id),
                }
                events.flush(state, &lease).await;
                me.announce(state).await;
            }
            r = &mut handle => break r,
        }
        if events.fenced {
            cancel.store(true, Ordering::SeqCst);
        }
    };
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    if let Ok(Err(e)) = &result
        && !matches!(e, JobError::Cancelled)
    {
        events.push(Event::Log { level: lathe_jobs::Level::Warn, message: e.to_string() });
    }
    // The events first, then the outcome, each retried while the database is away (a
    // restart, a lost connection) for as long as the lease would last.
    let deadline = tokio::time::Instant::now() + state.config.lease;
    let mut pause = Duration::from_millis(100);
    loop {
        events.flush(state, &lease).await;
        if events.fenced {
            // Another worker holds the job now; its outcome is that worker's to write.
            return;
        }
        let written = if events.is_empty() {
            match &result {
                Ok(Ok(outcome)) => state.db.complete(&lease, outcome.clone()).await,
                Ok(Err(JobError::Cancelled)) => state.db.mark_cancelled(&lease).await,
                Ok(Err(e)) => state.db.fail(&lease, &e.to_string(), e.kind() == ErrorKind::Internal).await,
                Err(panic) => state.db.fail(&lease, &format!("the job panicked: {panic}"), false).await,
            }
        } else {
            Err(StoreError::Invalid(format!("{} events not written yet", events.len())))
        };
        match written {
            Ok(()) | Err(StoreError::LeaseLost { .. }) => return,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                eprintln!("job {}: recording its end: {e}; the lease will run out and the job be retried", lease.job.id);
                return;
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// A job's events on their way to the database, in order. A write refused because the
/// lease is lost fences the worker (nothing more is written); any other failure (the
/// database restarting, a dropped connection) keeps the events for the next flush, so a
/// short outage costs the job nothing.
#[derive(Default)]
struct Outbox {
    pending: std::collections::VecDeque<Event>,
    fenced: bool,
    /// Whether the last flush failed, so an outage is reported once, not per event.
    failing: bool,
}

impl Outbox {
    fn push(&mut self, event: Event) {
        if !self.fenced {
            self.pending.push_back(event);
        }
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn len(&self) -> usize {
        self.pending.len()
    }

    async fn flush(&mut self, state: &AppState, lease: &Lease) {
        while let Some(event) = self.pending.front() {
            match append(state, lease, event).await {
                Ok(_) => {
                    self.pending.pop_front();
                    if std::mem::take(&mut self.failing) {
                        eprintln!("job {}: writing events again", lease.job.id);
                    }
                }
                Err(e @ StoreError::LeaseLost { .. }) => {
                    eprintln!("job {}: {e}; stopping", lease.job.id);
                    self.fenced = true;
                    self.pending.clear();
                    return;
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.failing, true) {
                        eprintln!("job {}: writing an event: {e}; keeping {} events to retry", lease.job.id, self.pending.len());
                    }
                    return;
                }
            }
        }
    }
}

async fn append(state: &AppState, lease: &Lease, event: &Event) -> Result<i64, StoreError> {
    let data = serde_json::to_value(event).expect("events serialise");
    let kind = data["type"].as_str().unwrap_or("event").to_string();
    state.db.append_event(lease, &kind, data).await
}
