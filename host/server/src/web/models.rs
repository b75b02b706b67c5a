//! Models: every adapter the project trained, with its lineage as the training run
//! recorded it (base model and its sha256, dataset version, chat template hash, suite,
//! settings), its exports, and download links.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Html;
use serde_json::{Value, json};

use super::{Pages, Viewer, WebResult, frame, page_ctx, render};
use crate::state::AppState;

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/projects/{project}/models", models)
}

async fn models(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let mut trained = Vec::new();
    for kind in ["train", "demo"] {
        trained.extend(s.db.jobs(&p.id, Some(kind), None, 100).await?.into_iter().filter(|j| j.state.as_str() == "succeeded"));
    }
    trained.sort_by_key(|j| std::cmp::Reverse(j.finished_at));
    let exports: Vec<_> = s.db.jobs(&p.id, Some("export"), None, 100).await?.into_iter().filter(|j| j.state.as_str() == "succeeded").collect();
    // The lineage each run wrote beside its adapter (`run.json`), read off the async threads.
    let adapters = tokio::task::spawn_blocking(move || {
        trained
            .into_iter()
            .map(|job| {
                let dir = job.outcome.as_ref().and_then(|o| o["adapter_dir"].as_str()).map(std::path::PathBuf::from);
                let run: Value = dir
                    .as_ref()
                    .and_then(|d| std::fs::read_to_string(d.join("run.json")).ok())
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or(Value::Null);
                let exported: Vec<Value> = exports
                    .iter()
                    .filter(|e| dir.as_ref().is_some_and(|d| e.spec["adapter"].as_str() == Some(&d.display().to_string())))
                    .map(|e| json!({"job": e.id, "format": e.spec["format"], "finished_at": e.finished_at}))
                    .collect();
                let suite = job.spec["suite"]["name"].as_str().map(str::to_string).or_else(|| (job.kind == "demo").then(|| lathe_jobs::invoices::invoice_suite().name));
                json!({"job": job, "run": run, "suite": suite, "template": job.spec["template"], "exports": exported})
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| super::WebError::internal(&e.to_string()))?;
    let mut adapters = Value::Array(adapters);
    s.redact_json(&mut adapters);
    render("models.html", page_ctx(frame(&viewer, Some(&p), "models"), minijinja::context! { adapters => adapters }))
}
