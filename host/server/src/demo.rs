//! `lathe demo` through the service: the demo workflow (`lathe_jobs::pipeline::demo`) runs
//! as a queued job of a project in the store, taken by an in-process worker, so that the
//! web UI afterwards shows it as any team's work: the suite, the dataset versions and their
//! lineage, the job with its training curves and log, and the report.

use std::sync::Arc;
use std::time::Duration;

use lathe_jobs::pipeline::Job;
use lathe_jobs::pipeline::demo::DemoSpec;
use lathe_jobs::{Event, Sink};
use lathe_store::{JobRow, Project, Secret};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// What the demo left in the store, and a token to look at it with.
pub struct DemoRun {
    pub project: Project,
    pub job: JobRow,
    pub token: Secret,
}

/// Creates the demo project (in the admin team, made on first start), saves its eval suite,
/// queues the demo job, runs it with an in-process worker and forwards its events to
/// `sink` as they are stored. Cancelling through `sink` cancels the job.
pub async fn run(state: &Arc<AppState>, spec: DemoSpec, sink: &dyn Sink) -> ApiResult<DemoRun> {
    state.db.ensure_admin().await?;
    let teams = state.db.teams().await?;
    let team = teams.iter().find(|t| t.name == "admin").or(teams.first()).ok_or_else(|| ApiError::Internal("no team".into()))?;
    let (_, token) = state.db.create_token(&team.id, None, "lathe demo", true).await?;
    let project = state.db.create_project(&team.id, "invoices-demo", "the demo: invoice fields from SmolLM2, prompted vs fine-tuned").await?;
    let mut suite = lathe_jobs::invoices::invoice_suite();
    if spec.zero_shot_only {
        suite.shots = vec![0];
    }
    let suite_json = serde_json::to_value(&suite).map_err(|e| ApiError::Internal(e.to_string()))?;
    crate::api::save_suite(state, &project.id, &suite.name, suite_json).await?;

    let row = crate::api::enqueue_job(state, &project.id, lathe_store::new_job_id(), &Job::Demo(spec), Default::default(), 0, 1).await?;

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(crate::worker::run(state.clone(), format!("demo-{}", std::process::id()), stop));
    let mut after = 0;
    let mut cancelled = false;
    let done = loop {
        for e in state.db.events(&row.id, after, 500).await? {
            after = e.seq;
            if let Ok(event) = serde_json::from_value::<Event>(e.data) {
                sink.emit(event);
            }
        }
        let now = state.db.job(&project.id, &row.id).await?;
        if now.state.is_finished() && state.db.events(&row.id, after, 1).await?.is_empty() {
            break now;
        }
        if sink.cancelled() && !cancelled {
            state.db.cancel(&project.id, &row.id).await?;
            cancelled = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = stop_tx.send(true);
    let _ = worker.await;
    Ok(DemoRun { project, job: done, token })
}
