//! Several claimers, each with a pool of its own as separate processes would have, drain one
//! queue: every job must be run exactly once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lathe_store::{JobState, NewJob};
use serde_json::json;

use crate::harness::TestDb;
use crate::team_and_project;

on_both_backends!(four_claimers_drain_500_jobs_exactly_once);

const JOBS: usize = 500;
const CLAIMERS: usize = 4;

async fn four_claimers_drain_500_jobs_exactly_once(t: &TestDb) {
    let (_, project) = team_and_project(t, "load").await;
    for i in 0..JOBS {
        let job = NewJob {
            id: None,
            project_id: project.id.clone(),
            kind: "eval".into(),
            spec: json!({"i": i}),
            priority: 0,
            max_attempts: 1,
            plugins: Default::default(),
        needs: Default::default(),
        };
        t.enqueue(job).await.unwrap();
    }

    let runs: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let mut claimers = Vec::new();
    for n in 0..CLAIMERS {
        let db = t.connect_again().await;
        let runs = Arc::clone(&runs);
        claimers.push(tokio::spawn(async move {
            let worker = format!("worker-{n}");
            let mut done = 0;
            while let Some(lease) = db
                .claim(&worker, &["eval"], Duration::from_secs(60))
                .await
                .unwrap()
            {
                runs.lock()
                    .unwrap()
                    .entry(lease.job.id.clone())
                    .or_default()
                    .push(worker.clone());
                db.append_event(&lease, "progress", json!({"by": worker}))
                    .await
                    .unwrap();
                db.complete(&lease, json!({"by": worker})).await.unwrap();
                done += 1;
            }
            db.close().await;
            done
        }));
    }
    let mut per_claimer = Vec::new();
    for c in claimers {
        per_claimer.push(c.await.unwrap());
    }

    let runs = std::mem::take(&mut *runs.lock().unwrap());
    assert_eq!(runs.len(), JOBS, "jobs claimed");
    let twice: Vec<_> = runs
        .iter()
        .filter(|(_, workers)| workers.len() != 1)
        .collect();
    assert!(twice.is_empty(), "claimed more than once: {twice:?}");
    assert_eq!(per_claimer.iter().sum::<usize>(), JOBS);

    let counts = t.job_counts().await.unwrap();
    assert!(
        counts.contains(&("succeeded".to_owned(), JOBS as i64)),
        "{counts:?}"
    );
    let timing = t.job_timing().await.unwrap();
    assert_eq!((timing.started, timing.finished), (JOBS as i64, JOBS as i64), "{timing:?}");
    assert!(timing.wait_ms_sum >= 0 && timing.run_ms_sum >= 0, "{timing:?}");
    let mut after = None;
    let mut seen = 0;
    loop {
        let page = t.jobs(&project.id, None, after.as_deref(), 100).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for job in &page {
            assert_eq!(
                (job.state, job.attempts, job.lease_token),
                (JobState::Succeeded, 1, 1),
                "{}",
                job.id
            );
            assert_eq!(
                job.outcome.as_ref().unwrap()["by"],
                runs[&job.id][0].as_str()
            );
            let events = t.events(&job.id, 0, 10).await.unwrap();
            assert_eq!(events.len(), 1);
        }
        seen += page.len();
    }
    assert_eq!(seen, JOBS);
    eprintln!("{:?}: jobs per claimer {per_claimer:?}", t.backend());
}

/// `lathe serve` and `lathe worker` started together on a fresh embedded database: both
/// apply the migrations, neither fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_open_a_fresh_sqlite_file_together() {
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let path = dir.path().to_owned();
                tokio::spawn(async move { lathe_store::Db::open_embedded(&path).await })
            })
            .collect();
        for open in opens {
            let db = open.await.unwrap().unwrap();
            assert!(db.teams().await.unwrap().is_empty());
        }
    }
}
