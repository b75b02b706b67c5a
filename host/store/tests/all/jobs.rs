use std::time::{Duration, Instant};

use lathe_store::{Backend, Capabilities, Db, JobState, Needs, NewJob, StoreError};
use serde_json::json;

use crate::harness::TestDb;
use crate::team_and_project;

on_both_backends!(
    job_lifecycle,
    priority_then_fifo_and_kinds,
    cancel_queued_and_running,
    expired_lease_is_reaped_and_fenced,
    retries_stop_at_max_attempts,
    jobs_listing_pages,
    wait_for_work_wakes_on_enqueue,
    failed_and_cancelled_jobs_are_retried,
    workers_claim_only_the_jobs_that_fit_them,
);

const LEASE: Duration = Duration::from_secs(30);

fn job(project_id: &str, kind: &str, priority: i32, max_attempts: i32) -> NewJob {
    NewJob {
        id: None,
        project_id: project_id.into(),
        kind: kind.into(),
        spec: json!({"epochs": 3}),
        priority,
        max_attempts,
        plugins: Default::default(),
        needs: Default::default(),
    }
}

fn is_lease_lost<T: std::fmt::Debug>(r: Result<T, StoreError>, job: &str, token: i64) -> bool {
    matches!(&r, Err(StoreError::LeaseLost { job: j, token: t }) if j == job && *t == token)
}

async fn job_lifecycle(db: &Db) {
    let (_, project) = team_and_project(db, "lifecycle").await;
    let (_, other) = team_and_project(db, "lifecycle-other").await;
    let queued = db.enqueue(job(&project.id, "train", 0, 3)).await.unwrap();
    assert!(queued.id.starts_with("job_"));
    assert_eq!(
        (queued.state, queued.attempts, queued.lease_token),
        (JobState::Queued, 0, 0)
    );
    assert_eq!(queued.spec, json!({"epochs": 3}));
    assert!(matches!(
        db.enqueue(job("proj_missing", "train", 0, 1)).await,
        Err(StoreError::NotFound {
            what: "project",
            ..
        })
    ));
    assert!(matches!(
        db.enqueue(job(&project.id, "train", 0, 0)).await,
        Err(StoreError::Invalid(_))
    ));

    let lease = db
        .claim("worker-1", &[], LEASE)
        .await
        .unwrap()
        .expect("a queued job");
    assert_eq!(lease.job.id, queued.id);
    assert_eq!((lease.token, lease.worker.as_str()), (1, "worker-1"));
    assert_eq!(
        (lease.job.state, lease.job.attempts),
        (JobState::Running, 1)
    );
    assert_eq!(lease.job.worker.as_deref(), Some("worker-1"));
    assert!(lease.job.lease_expires_at.unwrap() >= lease.job.started_at.unwrap() + 29_000);
    assert!(
        db.claim("worker-2", &[], LEASE).await.unwrap().is_none(),
        "one job, one claim"
    );

    assert!(!db.heartbeat(&lease, LEASE).await.unwrap());
    assert_eq!(
        db.append_event(&lease, "progress", json!({"step": 1, "loss": 2.5}))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        db.append_event(&lease, "progress", json!({"step": 2, "loss": 2.1}))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        db.append_event_unleased(&queued.id, "note", json!("from the server"))
            .await
            .unwrap(),
        3
    );
    assert!(matches!(
        db.append_event_unleased("job_missing", "x", json!(null))
            .await,
        Err(StoreError::NotFound { .. })
    ));

    let events = db.events(&queued.id, 0, 100).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(
        (events[1].kind.as_str(), &events[1].data),
        ("progress", &json!({"step": 2, "loss": 2.1}))
    );
    let page = db.events(&queued.id, 1, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].seq, 2);

    db.complete(&lease, json!({"adapter": "sha"}))
        .await
        .unwrap();
    let done = db.job(&project.id, &queued.id).await.unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.outcome, Some(json!({"adapter": "sha"})));
    assert!(done.finished_at.is_some() && done.lease_expires_at.is_none() && done.error.is_none());
    assert_eq!(db.job_any(&queued.id).await.unwrap(), done);
    assert!(matches!(
        db.job(&other.id, &queued.id).await,
        Err(StoreError::NotFound { what: "job", .. })
    ));

    // A finished job's lease is gone.
    assert!(is_lease_lost(
        db.heartbeat(&lease, LEASE).await,
        &queued.id,
        1
    ));
    assert!(is_lease_lost(
        db.complete(&lease, json!(null)).await,
        &queued.id,
        1
    ));
    assert!(is_lease_lost(
        db.append_event(&lease, "late", json!(null)).await,
        &queued.id,
        1
    ));
    assert!(db.claim("worker-1", &[], LEASE).await.unwrap().is_none());

    let counts = db.job_counts().await.unwrap();
    assert_eq!(
        counts,
        [
            ("queued", 0),
            ("running", 0),
            ("succeeded", 1),
            ("failed", 0),
            ("cancelled", 0)
        ]
        .map(|(s, n)| (s.to_owned(), n))
    );
}

async fn priority_then_fifo_and_kinds(db: &Db) {
    let (_, project) = team_and_project(db, "priorities").await;
    let mut ids = Vec::new();
    for (name, priority) in [
        ("low-1", 0),
        ("high-1", 10),
        ("low-2", 0),
        ("high-2", 10),
        ("mid", 5),
    ] {
        let row = db
            .enqueue(NewJob {
                spec: json!({"name": name}),
                ..job(&project.id, "eval", priority, 1)
            })
            .await
            .unwrap();
        ids.push((name, row.id));
    }
    let train = db.enqueue(job(&project.id, "train", 100, 1)).await.unwrap();

    let mut order = Vec::new();
    while let Some(lease) = db.claim("w", &["eval", "quantize"], LEASE).await.unwrap() {
        order.push(lease.job.spec["name"].as_str().unwrap().to_owned());
        db.complete(&lease, json!(null)).await.unwrap();
    }
    assert_eq!(order, ["high-1", "high-2", "mid", "low-1", "low-2"]);

    // The train job waited for a worker that runs trains, despite its priority.
    assert_eq!(db.job_any(&train.id).await.unwrap().state, JobState::Queued);
    let lease = db.claim("w", &["train"], LEASE).await.unwrap().unwrap();
    assert_eq!(lease.job.id, train.id);
}

async fn cancel_queued_and_running(db: &Db) {
    let (_, project) = team_and_project(db, "cancel").await;
    let (_, other) = team_and_project(db, "cancel-other").await;

    let queued = db.enqueue(job(&project.id, "train", 0, 1)).await.unwrap();
    assert!(matches!(
        db.cancel(&other.id, &queued.id).await,
        Err(StoreError::NotFound { .. })
    ));
    let cancelled = db.cancel(&project.id, &queued.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(cancelled.finished_at.is_some());
    assert!(
        db.claim("w", &[], LEASE).await.unwrap().is_none(),
        "a cancelled job is never claimed"
    );

    let running = db.enqueue(job(&project.id, "train", 0, 3)).await.unwrap();
    let lease = db.claim("w", &[], LEASE).await.unwrap().unwrap();
    assert!(!db.heartbeat(&lease, LEASE).await.unwrap());
    let requested = db.cancel(&project.id, &running.id).await.unwrap();
    assert_eq!(
        (requested.state, requested.cancel_requested),
        (JobState::Running, true)
    );
    db.append_event_unleased(&running.id, "cancel requested", json!({"by": "api"}))
        .await
        .unwrap();
    assert!(
        db.heartbeat(&lease, LEASE).await.unwrap(),
        "the heartbeat reports the cancel"
    );
    db.mark_cancelled(&lease).await.unwrap();
    let row = db.job(&project.id, &running.id).await.unwrap();
    assert_eq!(row.state, JobState::Cancelled);
    assert!(row.finished_at.is_some());

    // A cancel-requested job that fails retryably is not retried.
    let third = db.enqueue(job(&project.id, "train", 0, 3)).await.unwrap();
    let lease = db.claim("w", &[], LEASE).await.unwrap().unwrap();
    db.cancel(&project.id, &third.id).await.unwrap();
    db.fail(&lease, "interrupted", true).await.unwrap();
    assert_eq!(db.job_any(&third.id).await.unwrap().state, JobState::Failed);

    // Finished jobs stay as they are.
    let again = db.cancel(&project.id, &running.id).await.unwrap();
    assert_eq!(again, row);
    assert!(matches!(
        db.cancel(&project.id, "job_missing").await,
        Err(StoreError::NotFound { what: "job", .. })
    ));
}

async fn expired_lease_is_reaped_and_fenced(db: &Db) {
    let (_, project) = team_and_project(db, "reaper").await;
    let queued = db.enqueue(job(&project.id, "train", 0, 3)).await.unwrap();
    assert_eq!(db.reap_expired().await.unwrap(), 0);

    let old = db
        .claim("dying-worker", &[], Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    db.append_event(&old, "progress", json!({"step": 1}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(db.reap_expired().await.unwrap(), 1);
    let requeued = db.job_any(&queued.id).await.unwrap();
    assert_eq!((requeued.state, requeued.attempts), (JobState::Queued, 1));
    let error = requeued.error.unwrap();
    assert!(
        error.contains("dying-worker") && error.contains("stopped heartbeating"),
        "{error}"
    );

    // Between the reap and the next claim the old lease is already dead.
    assert!(is_lease_lost(
        db.heartbeat(&old, LEASE).await,
        &queued.id,
        old.token
    ));

    let new = db
        .claim("healthy-worker", &[], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(new.job.id, queued.id);
    assert!(
        new.token > old.token,
        "fencing token {} not above {}",
        new.token,
        old.token
    );
    assert_eq!(new.job.attempts, 2);

    // The old worker wakes up: every write through its lease is refused.
    assert!(is_lease_lost(
        db.heartbeat(&old, LEASE).await,
        &queued.id,
        old.token
    ));
    assert!(is_lease_lost(
        db.append_event(&old, "progress", json!({"step": 2})).await,
        &queued.id,
        old.token
    ));
    assert!(is_lease_lost(
        db.complete(&old, json!("stale")).await,
        &queued.id,
        old.token
    ));
    assert!(is_lease_lost(
        db.fail(&old, "stale", false).await,
        &queued.id,
        old.token
    ));
    assert!(is_lease_lost(
        db.mark_cancelled(&old).await,
        &queued.id,
        old.token
    ));
    let message = db.heartbeat(&old, LEASE).await.unwrap_err().to_string();
    assert!(
        message.contains(&queued.id) && message.contains(&old.token.to_string()),
        "{message}"
    );

    // The new holder is unaffected; the live lease is not reaped.
    assert!(!db.heartbeat(&new, LEASE).await.unwrap());
    assert_eq!(db.reap_expired().await.unwrap(), 0);
    assert_eq!(
        db.append_event(&new, "progress", json!({"step": 1}))
            .await
            .unwrap(),
        2
    );
    db.complete(&new, json!({"ok": true})).await.unwrap();
    let done = db.job_any(&queued.id).await.unwrap();
    assert_eq!(
        (done.state, done.outcome),
        (JobState::Succeeded, Some(json!({"ok": true})))
    );

    // A dead worker on the last attempt fails the job, saying why.
    let last = db.enqueue(job(&project.id, "train", 0, 1)).await.unwrap();
    db.claim("dying-worker", &[], Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(db.reap_expired().await.unwrap(), 1);
    let failed = db.job_any(&last.id).await.unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.finished_at.is_some());
    assert!(failed.error.unwrap().contains("stopped heartbeating"));
}

async fn retries_stop_at_max_attempts(db: &Db) {
    let (_, project) = team_and_project(db, "retries").await;
    let queued = db.enqueue(job(&project.id, "eval", 0, 2)).await.unwrap();

    let first = db.claim("w", &[], LEASE).await.unwrap().unwrap();
    db.fail(&first, "CUDA out of memory", true).await.unwrap();
    let row = db.job_any(&queued.id).await.unwrap();
    assert_eq!(
        (row.state, row.attempts, row.error.as_deref()),
        (JobState::Queued, 1, Some("CUDA out of memory"))
    );
    assert!(row.finished_at.is_none());

    let second = db.claim("w", &[], LEASE).await.unwrap().unwrap();
    assert_eq!((second.job.attempts, second.token), (2, 2));
    db.fail(&second, "CUDA out of memory again", true)
        .await
        .unwrap();
    let row = db.job_any(&queued.id).await.unwrap();
    assert_eq!((row.state, row.attempts), (JobState::Failed, 2));
    assert_eq!(row.error.as_deref(), Some("CUDA out of memory again"));
    assert!(row.finished_at.is_some());
    assert!(db.claim("w", &[], LEASE).await.unwrap().is_none());

    // A failure that is not retryable ends the job at the first attempt.
    let fatal = db.enqueue(job(&project.id, "eval", 0, 5)).await.unwrap();
    let lease = db.claim("w", &[], LEASE).await.unwrap().unwrap();
    db.fail(&lease, "the suite has no scorer", false)
        .await
        .unwrap();
    let row = db.job_any(&fatal.id).await.unwrap();
    assert_eq!((row.state, row.attempts), (JobState::Failed, 1));
}

async fn jobs_listing_pages(db: &Db) {
    let (_, project) = team_and_project(db, "listing").await;
    let (_, other) = team_and_project(db, "listing-other").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            db.enqueue(job(&project.id, "eval", i % 2, 1))
                .await
                .unwrap()
                .id,
        );
        db.enqueue(job(&other.id, "eval", 0, 1)).await.unwrap();
    }
    let project_id = project.id.as_str();
    let page = |after: Option<String>, limit| async move {
        db.jobs(project_id, None, after.as_deref(), limit)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(page(None, 2).await, [ids[4].clone(), ids[3].clone()]);
    assert_eq!(
        page(Some(ids[3].clone()), 2).await,
        [ids[2].clone(), ids[1].clone()]
    );
    assert_eq!(page(Some(ids[1].clone()), 2).await, [ids[0].clone()]);
    assert!(page(Some(ids[0].clone()), 2).await.is_empty());
    assert_eq!(page(None, 100).await.len(), 5);
    assert!(page(None, 0).await.is_empty());
    assert!(matches!(
        db.jobs(&project.id, None, Some("job_missing"), 2).await,
        Err(StoreError::NotFound { .. })
    ));
    // Another project's job is no cursor here.
    let theirs = db.jobs(&other.id, None, None, 1).await.unwrap().remove(0).id;
    assert!(matches!(
        db.jobs(&project.id, None, Some(&theirs), 2).await,
        Err(StoreError::NotFound { .. })
    ));
    // One kind only, paged the same way: the two `train` jobs among the evals.
    let mut trains = Vec::new();
    for _ in 0..2 {
        trains.push(db.enqueue(job(&project.id, "train", 0, 1)).await.unwrap().id);
        db.enqueue(job(&project.id, "eval", 0, 1)).await.unwrap();
    }
    let of_kind = |after: Option<String>| async move {
        db.jobs(project_id, Some("train"), after.as_deref(), 1)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(of_kind(None).await, [trains[1].clone()]);
    assert_eq!(of_kind(Some(trains[1].clone())).await, [trains[0].clone()]);
    assert!(of_kind(Some(trains[0].clone())).await.is_empty());
}

async fn wait_for_work_wakes_on_enqueue(t: &TestDb) {
    let (_, project) = team_and_project(t, "waiting").await;
    // The first wait starts the PostgreSQL listener and ends once it listens, so that only a
    // notification can end the next wait early.
    let waiter = t.connect_again().await;
    waiter.wait_for_work(Duration::from_secs(5)).await.unwrap();
    let wait = tokio::spawn(async move {
        let started = Instant::now();
        waiter.wait_for_work(Duration::from_secs(20)).await.unwrap();
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let enqueued = Instant::now();
    t.enqueue(job(&project.id, "eval", 0, 1)).await.unwrap();
    let waited = wait.await.unwrap();
    match t.backend() {
        // Woken by the notification, not by the timeout.
        Backend::Postgres => {
            assert!(
                waited >= Duration::from_millis(300),
                "woke before the enqueue: {waited:?}"
            );
            assert!(
                enqueued.elapsed() < Duration::from_secs(5),
                "not woken by NOTIFY: {waited:?}"
            );
        }
        // SQLite polls: a wait is a short sleep whatever the timeout.
        Backend::Sqlite => assert!(waited < Duration::from_secs(2), "{waited:?}"),
    }
    let started = Instant::now();
    t.wait_for_work(Duration::from_millis(50)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));

    // Closing stops the listener, which holds a connection of the pool for good.
    tokio::time::timeout(Duration::from_secs(10), t.close())
        .await
        .expect("close() returns");
}

async fn failed_and_cancelled_jobs_are_retried(db: &Db) {
    let (_, project) = team_and_project(db, "retry").await;
    let (_, other) = team_and_project(db, "retry-other").await;
    let queued = db.enqueue(job(&project.id, "train", 0, 1)).await.unwrap();
    match db.retry(&project.id, &queued.id).await {
        Err(StoreError::Conflict(msg)) => assert!(msg.contains("is queued"), "{msg}"),
        other => panic!("a queued job is not retried: {other:?}"),
    }
    let lease = db.claim("w", &[], LEASE).await.unwrap().unwrap();
    db.append_event(&lease, "log", json!({"message": "step 1"})).await.unwrap();
    db.fail(&lease, "worker ran out of disk", true).await.unwrap();
    assert_eq!(db.job_any(&queued.id).await.unwrap().state, JobState::Failed, "one attempt only");
    assert!(matches!(db.retry(&other.id, &queued.id).await, Err(StoreError::NotFound { .. })));

    // Retried: queued again with one more attempt, the error gone, the events kept; the
    // old lease stays fenced off.
    let again = db.retry(&project.id, &queued.id).await.unwrap();
    assert_eq!((again.state, again.attempts, again.max_attempts, again.error.as_deref()), (JobState::Queued, 1, 2, None));
    assert!(again.finished_at.is_none());
    let second = db.claim("w2", &[], LEASE).await.unwrap().unwrap();
    assert_eq!((second.job.id.as_str(), second.job.attempts), (queued.id.as_str(), 2));
    assert!(is_lease_lost(db.append_event(&lease, "log", json!({})).await, &queued.id, lease.token));
    db.append_event(&second, "log", json!({"message": "resumed"})).await.unwrap();
    assert_eq!(db.events(&queued.id, 0, 10).await.unwrap().len(), 2);
    db.complete(&second, json!({"ok": true})).await.unwrap();
    match db.retry(&project.id, &queued.id).await {
        Err(StoreError::Conflict(msg)) => assert!(msg.contains("is succeeded"), "{msg}"),
        other => panic!("a succeeded job is not retried: {other:?}"),
    }

    // A cancelled job too.
    let cancelled = db.enqueue(job(&project.id, "eval", 0, 3)).await.unwrap();
    db.cancel(&project.id, &cancelled.id).await.unwrap();
    let again = db.retry(&project.id, &cancelled.id).await.unwrap();
    assert_eq!((again.state, again.cancel_requested), (JobState::Queued, false));
    // Only succeeded jobs count, by kind, per project.
    let counts = db.succeeded_by_kind(&project.id).await.unwrap();
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), [("train".to_string(), 1)]);
    assert!(db.succeeded_by_kind(&other.id).await.unwrap().is_empty());
}

/// A job's needs (device kind, memory) decide which workers may claim it: a CPU worker
/// skips the GPU job queued before its own, a GPU worker with too little memory takes
/// nothing, one with enough takes the GPU jobs in queue order. The workers' announcements
/// list who holds what.
async fn workers_claim_only_the_jobs_that_fit_them(db: &Db) {
    let (_, project) = team_and_project(db, "fits").await;
    let needing = |name: &str, device: Option<&str>, memory_mb: i64| NewJob {
        spec: json!({"name": name}),
        needs: Needs { device: device.map(Into::into), memory_mb },
        ..job(&project.id, "train", 0, 1)
    };
    let gpu = db.enqueue(needing("gpu", Some("cuda"), 40_000)).await.unwrap();
    assert_eq!((gpu.needs_device.as_deref(), gpu.needs_memory_mb), (Some("cuda"), 40_000));
    let any = db.enqueue(needing("any", None, 0)).await.unwrap();
    let cpu = db.enqueue(needing("cpu", Some("cpu"), 0)).await.unwrap();
    let big = db.enqueue(needing("big", None, 64_000)).await.unwrap();
    let negative = db.enqueue(needing("negative", None, -1)).await;
    assert!(matches!(&negative, Err(StoreError::Invalid(m)) if m.contains("-1 MiB")), "{negative:?}");

    let laptop = Capabilities { device: "cpu".into(), memory_mb: 16_000 };
    let small_gpu = Capabilities { device: "cuda".into(), memory_mb: 24_000 };
    let big_gpu = Capabilities { device: "cuda".into(), memory_mb: 80_000 };
    assert_eq!(claim_as(db, "laptop", &laptop).await, Some(any.id.clone()), "the GPU job ahead of it is skipped");
    assert_eq!(claim_as(db, "laptop", &laptop).await, Some(cpu.id.clone()));
    assert_eq!(claim_as(db, "laptop", &laptop).await, None, "64 GB is more than it has");
    assert_eq!(claim_as(db, "small-gpu", &small_gpu).await, None, "40 GB is more than it has; the CPU job is taken");
    assert_eq!(claim_as(db, "big-gpu", &big_gpu).await, Some(gpu.id.clone()));
    assert_eq!(claim_as(db, "big-gpu", &big_gpu).await, Some(big.id.clone()), "a job needing no device runs on any that fits");
    assert_eq!(claim_as(db, "big-gpu", &big_gpu).await, None);

    // The announcements: the first sets the start, each one the last sighting.
    db.announce_worker("laptop", "host-a", &laptop, &[]).await.unwrap();
    db.announce_worker("big-gpu", "host-b", &big_gpu, &["train", "eval_run"]).await.unwrap();
    let first = db.workers(0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    db.announce_worker("laptop", "host-a", &laptop, &[]).await.unwrap();
    let workers = db.workers(0).await.unwrap();
    let by_id = |ws: &[lathe_store::WorkerRow], id: &str| ws.iter().find(|w| w.id == id).cloned().unwrap();
    let (before, after) = (by_id(&first, "laptop"), by_id(&workers, "laptop"));
    assert_eq!(after.started_at, before.started_at);
    assert!(after.seen_at > before.seen_at);
    assert_eq!((after.host.as_str(), after.device.as_str(), after.memory_mb), ("host-a", "cpu", 16_000));
    assert_eq!(after.running, [any.id.clone(), cpu.id.clone()]);
    let gpu_worker = by_id(&workers, "big-gpu");
    assert_eq!(gpu_worker.kinds, ["train", "eval_run"]);
    assert_eq!(gpu_worker.running, [gpu.id.clone(), big.id.clone()]);
    assert!(db.workers(after.seen_at + 1).await.unwrap().is_empty(), "none seen since");
}

async fn claim_as(db: &Db, worker: &str, can: &Capabilities) -> Option<String> {
    db.claim_fitting(worker, &[], Some(can), LEASE).await.unwrap().map(|l| l.job.id)
}

/// PostgreSQL restarted under an open pool: the connections it held died with the server,
/// and the next claim and completion simply open new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_reconnects_after_postgres_restarts() {
    let t = TestDb::postgres().await;
    let (_, project) = team_and_project(&t, "restart").await;
    let queued = t.enqueue(job(&project.id, "train", 0, 1)).await.unwrap();
    let t = tokio::task::spawn_blocking(move || {
        t.restart_postgres(Duration::from_millis(200));
        t
    })
    .await
    .unwrap();
    let lease = t.claim("after-restart", &[], LEASE).await.unwrap().expect("the queued job");
    assert_eq!(lease.job.id, queued.id);
    t.complete(&lease, json!({"ok": true})).await.unwrap();
    assert_eq!(t.job(&project.id, &queued.id).await.unwrap().state, JobState::Succeeded);
}
