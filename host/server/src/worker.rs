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

/// Forwards a pipeline's events to the async side and reads the cancel flag.
struct ChannelSink {
    tx: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

impl Sink for ChannelSink {
    fn emit(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
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
    let sink = ChannelSink { tx, cancel: cancel.clone() };
    let mut handle = tokio::task::spawn_blocking(move || job.run(&env, &sink));
    let mut beat = tokio::time::interval((state.config.lease / 4).max(Duration::from_millis(250)));
    // Set once the lease is lost: the job is stopped and nothing more is written.
    let mut fenced = false;
    let result = loop {
        tokio::select! {
            Some(event) = rx.recv() => {
                if !fenced && let Err(e) = append(state, &lease, &event).await {
                    eprintln!("job {}: {e}; stopping", lease.job.id);
                    fenced = true;
                    cancel.store(true, Ordering::SeqCst);
                }
            }
            _ = beat.tick() => {
                match state.db.heartbeat(&lease, state.config.lease).await {
                    Ok(true) => cancel.store(true, Ordering::SeqCst),
                    Ok(false) => {}
                    Err(StoreError::LeaseLost { .. }) => {
                        fenced = true;
                        cancel.store(true, Ordering::SeqCst);
                    }
                    Err(e) => eprintln!("job {}: heartbeat: {e}", lease.job.id),
                }
                me.announce(state).await;
            }
            r = &mut handle => break r,
        }
    };
    while let Ok(event) = rx.try_recv() {
        if !fenced && append(state, &lease, &event).await.is_err() {
            fenced = true;
        }
    }
    if fenced {
        // Another worker holds the job now; its outcome is that worker's to write.
        return;
    }
    let written = match result {
        Ok(Ok(outcome)) => state.db.complete(&lease, outcome).await,
        Ok(Err(JobError::Cancelled)) => state.db.mark_cancelled(&lease).await,
        Ok(Err(e)) => {
            let _ = append(state, &lease, &Event::Log { level: lathe_jobs::Level::Warn, message: e.to_string() }).await;
            state.db.fail(&lease, &e.to_string(), e.kind() == ErrorKind::Internal).await
        }
        Err(panic) => state.db.fail(&lease, &format!("the job panicked: {panic}"), false).await,
    };
    if let Err(e) = written {
        eprintln!("job {}: recording its end: {e}", lease.job.id);
    }
}

async fn append(state: &AppState, lease: &Lease, event: &Event) -> Result<i64, StoreError> {
    let data = serde_json::to_value(event).expect("events serialise");
    let kind = data["type"].as_str().unwrap_or("event").to_string();
    state.db.append_event(lease, &kind, data).await
}
