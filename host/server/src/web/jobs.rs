//! Jobs: submit any pipeline with the workflow's defaults filled in, watch one live (loss,
//! learning rate, tokens/s and the watched metric as curves, the log, progress and ETA),
//! cancel, and download what it wrote; and the workers that run them.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use lathe_jobs::settings::TrainSettings;
use lathe_store::JobRow;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::data::plugin_choices;
use super::{CsrfForm, Fields, Pages, Viewer, WebError, WebResult, field, frame, page_ctx, render, see_other};
use crate::api::{self, JobRequest};
use crate::state::AppState;

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/projects/{project}/jobs", jobs)
        .post("/projects/{project}/jobs", submit)
        .get("/projects/{project}/jobs/table", table)
        .get("/projects/{project}/jobs/{job}", job)
        .get("/projects/{project}/jobs/{job}/events", events)
        .post("/projects/{project}/jobs/{job}/cancel", cancel)
        .post("/projects/{project}/jobs/{job}/retry", retry)
        .get("/projects/{project}/jobs/{job}/artifacts/{name}", artifact)
        .get("/projects/{project}/jobs/{job}/report", report)
        .get("/workers", workers)
}

/// The workers sharing the database, with this team's jobs each runs.
async fn workers(State(s): State<Arc<AppState>>, viewer: Viewer) -> WebResult<Html<String>> {
    let workers = api::workers(&s, &viewer.caller).await?;
    render("workers.html", page_ctx(frame(&viewer, None, "workers"), json!({"workers": workers})))
}

#[derive(Deserialize)]
struct JobsPage {
    after: Option<String>,
}

const JOBS_PER_PAGE: i64 = 50;

/// A page of jobs, newest first, and the cursor of the next page.
async fn job_page(s: &AppState, project_id: &str, after: Option<&str>) -> WebResult<(Vec<JobRow>, Option<String>)> {
    let mut rows = s.db.jobs(project_id, None, after, JOBS_PER_PAGE + 1).await?;
    let next = (rows.len() as i64 > JOBS_PER_PAGE).then(|| rows[JOBS_PER_PAGE as usize - 1].id.clone());
    rows.truncate(JOBS_PER_PAGE as usize);
    Ok((rows.into_iter().map(|r| s.public_job(r)).collect(), next))
}

/// Eval runs a report can compare: the best run of each baseline, and each eval run.
async fn eval_runs(s: &AppState, project_id: &str) -> WebResult<Vec<Value>> {
    let mut runs = Vec::new();
    for (kind, pointer) in [("eval_baseline", "/baseline/best"), ("eval_run", "/run")] {
        for j in s.db.jobs(project_id, Some(kind), None, 100).await? {
            if let Some(run) = j.outcome.as_ref().and_then(|o| o.pointer(pointer)) {
                runs.push(json!({"id": run["id"], "job": j.id, "kind": kind, "template": run["template"], "shots": run["shots"], "adapter": run["adapter"].as_str().map(|a| s.redact(a)), "created_at": j.created_at}));
            }
        }
    }
    Ok(runs)
}

async fn jobs(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Query(q): Query<JobsPage>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let (rows, next) = job_page(&s, &p.id, q.after.as_deref()).await?;
    let trained: Vec<JobRow> = s.db.jobs(&p.id, Some("train"), None, 100).await?.into_iter().filter(|j| j.state.as_str() == "succeeded").collect();
    let settings = serde_json::to_value(api::train_settings(&s, &p.id, Map::new())?).map_err(|e| WebError::internal(&e.to_string()))?;
    let ctx = minijinja::context! {
        jobs => rows, next => next, active => rows_active(&s, &p.id).await?,
        suites => s.db.suites(&p.id).await?, versions => api::dataset_versions(&s, &p.id).await?,
        models => s.config.models.keys().collect::<Vec<_>>(), trained => trained, runs => eval_runs(&s, &p.id).await?,
        settings => settings, primary_settings => PRIMARY_SETTINGS, plugins => plugin_choices(&s, &p.id).await?,
    };
    render("jobs.html", page_ctx(frame(&viewer, Some(&p), "jobs"), ctx))
}

/// Whether any job of the project is queued or running (the table then refreshes itself).
async fn rows_active(s: &AppState, project_id: &str) -> WebResult<bool> {
    Ok(s.db.jobs(project_id, None, None, 20).await?.iter().any(|j| !j.state.is_finished()))
}

/// The jobs table alone, for htmx to refresh in place.
async fn table(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Query(q): Query<JobsPage>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let (rows, next) = job_page(&s, &p.id, q.after.as_deref()).await?;
    let ctx = minijinja::context! { jobs => rows, next => next, active => rows_active(&s, &p.id).await? };
    render("jobs_table.html", page_ctx(frame(&viewer, Some(&p), "jobs"), ctx))
}

/// The training settings shown outside the "advanced" fold.
const PRIMARY_SETTINGS: &[&str] = &["rank", "alpha", "dropout", "learning_rate", "epochs", "max_steps", "patience", "batch_size", "qlora"];

/// Form fields whose values are numbers or booleans in a job request.
const NUMBER_FIELDS: &[&str] = &["limit", "shots", "margin", "near", "heldout", "seed"];
const BOOL_FIELDS: &[&str] = &["dedupe", "drop_invalid", "stratify"];

/// The job request a form describes: empty fields are left out (the request's defaults
/// apply), `settings.*` fields become training settings typed like their defaults, plugin
/// choices become plugin references. The result goes through the same `JobRequest` the API
/// parses, so the web cannot ask for anything the API would refuse.
fn request_from_form(fields: &Fields) -> WebResult<JobRequest> {
    let defaults = serde_json::to_value(TrainSettings::default()).map_err(|e| WebError::internal(&e.to_string()))?;
    let mut req = Map::new();
    let mut settings = Map::new();
    for b in BOOL_FIELDS {
        if fields.iter().any(|(k, _)| k == &format!("has_{b}")) {
            req.insert(b.to_string(), Value::Bool(false));
        }
    }
    for (k, v) in fields {
        let v = v.trim();
        if k == "csrf" || k.starts_with("has_") {
            continue;
        }
        if let Some(key) = k.strip_prefix("settings.") {
            let typed = match &defaults[key] {
                Value::Bool(_) => Value::Bool(v == "on" || v == "true"),
                Value::Number(_) => json!(v.parse::<f64>().map_err(|_| WebError::bad(format!("{key}: `{v}` is not a number")))?),
                Value::Array(_) if v.is_empty() => json!([]),
                Value::Array(_) => json!(v.split(',').map(|x| x.trim().parse::<f64>()).collect::<Result<Vec<_>, _>>().map_err(|_| WebError::bad(format!("{key}: a comma-separated list of numbers")))?),
                Value::Null => return Err(WebError::bad(format!("`{key}` is not a training setting"))),
                _ => Value::String(v.to_string()),
            };
            // Whole numbers go as integers, so that integer settings deserialize.
            let typed = match typed.as_f64() {
                Some(x) if defaults[key].is_u64() && x.fract() == 0.0 && x >= 0.0 => json!(x as u64),
                _ => typed,
            };
            settings.insert(key.to_string(), typed);
            continue;
        }
        if v.is_empty() {
            continue;
        }
        let value = if NUMBER_FIELDS.contains(&k.as_str()) {
            let x: f64 = v.parse().map_err(|_| WebError::bad(format!("{k}: `{v}` is not a number")))?;
            if x.fract() == 0.0 && k != "margin" && k != "near" && k != "heldout" { json!(x as u64) } else { json!(x) }
        } else if BOOL_FIELDS.contains(&k.as_str()) {
            Value::Bool(v == "on" || v == "true")
        } else if k == "validator" || k == "formatter" {
            json!({"plugin": v})
        } else if k == "forgetting" {
            // A checkbox: the regression pack with its defaults.
            json!({})
        } else {
            Value::String(v.to_string())
        };
        req.insert(k.clone(), value);
    }
    if req.get("kind").and_then(Value::as_str) == Some("train") {
        req.insert("settings".into(), Value::Object(settings));
    }
    serde_json::from_value(Value::Object(req)).map_err(|e| WebError::bad(format!("job request: {e}")))
}

async fn submit(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Form(f): Form<Fields>) -> WebResult<Response> {
    viewer.check_csrf(field(&f, "csrf").unwrap_or_default())?;
    let p = s.project(&viewer.caller, &project).await?;
    let request = request_from_form(&f)?;
    let row = api::enqueue(&s, &p.id, request, Default::default(), 0).await?;
    Ok(see_other(&format!("/projects/{}/jobs/{}", p.id, row.id)))
}

async fn job(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, job)): Path<(String, String)>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let row = s.public_job(s.db.job(&p.id, &job).await?);
    // The artifacts a finished job offers for download.
    let artifacts: &[&str] = match (row.kind.as_str(), row.state.as_str()) {
        ("train", "succeeded") => &["adapter_model.safetensors", "adapter_config.json"],
        ("eval_report", "succeeded") => &["report.html", "report.json"],
        ("demo", "succeeded") => &["report.html", "report.json", "adapter_model.safetensors", "adapter_config.json"],
        ("export", "succeeded") => &["export"],
        _ => &[],
    };
    let ctx = minijinja::context! { job => row, artifacts => artifacts, spec => serde_json::to_string_pretty(&row.spec).unwrap_or_default(), outcome => row.outcome.as_ref().map(|o| serde_json::to_string_pretty(o).unwrap_or_default()) };
    render("job.html", page_ctx(frame(&viewer, Some(&p), "jobs"), ctx))
}

/// The job's events over SSE, as the API streams them, for the signed-in browser.
async fn events(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, job)): Path<(String, String)>, headers: HeaderMap) -> WebResult<Response> {
    let p = s.project(&viewer.caller, &project).await?;
    let row = s.db.job(&p.id, &job).await?;
    Ok(api::event_stream(s, row.id, &headers).into_response())
}

async fn cancel(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, job)): Path<(String, String)>, Form(f): Form<CsrfForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    let p = s.project(&viewer.caller, &project).await?;
    s.db.cancel(&p.id, &job).await?;
    Ok(see_other(&format!("/projects/{}/jobs/{job}", p.id)))
}

/// A failed or cancelled job queued again; a training job resumes from its checkpoint.
async fn retry(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, job)): Path<(String, String)>, Form(f): Form<CsrfForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    let p = s.project(&viewer.caller, &project).await?;
    s.db.retry(&p.id, &job).await?;
    Ok(see_other(&format!("/projects/{}/jobs/{job}", p.id)))
}

async fn artifact(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, job, name)): Path<(String, String, String)>) -> WebResult<Response> {
    let p = s.project(&viewer.caller, &project).await?;
    let mut response = api::artifact_response(&s, &p.id, &job, &name).await?;
    if !name.ends_with(".html") {
        let disposition = format!("attachment; filename=\"{job}-{name}\"");
        response.headers_mut().insert(axum::http::header::CONTENT_DISPOSITION, disposition.parse().map_err(|_| WebError::internal("file name"))?);
    }
    Ok(response)
}

#[derive(Deserialize)]
struct ReportQuery {
    /// `worse`, `better` or (default) every changed item.
    #[serde(default)]
    show: String,
}

/// A report job's (or the demo's) verdict read from its `report.json`: the comparison
/// with its interval, the runs against the gate, the baseline's trials, and the items that
/// changed, filtered to those that got worse or better.
async fn report(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, job)): Path<(String, String)>, Query(q): Query<ReportQuery>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let row = s.db.job(&p.id, &job).await?;
    let outcome = row.outcome.clone().unwrap_or(Value::Null);
    let path = match row.kind.as_str() {
        "eval_report" => outcome["json"].as_str(),
        "demo" => outcome["report"]["json"].as_str(),
        _ => None,
    }
    .map(std::path::PathBuf::from)
    .ok_or_else(|| WebError::not_found(format!("job `{job}` wrote no report")))?;
    let text = tokio::fs::read_to_string(&path).await.map_err(|_| WebError::not_found("the report file is gone"))?;
    let mut report: Value = serde_json::from_str(&text).map_err(|e| WebError::internal(&format!("report.json: {e}")))?;
    s.redact_json(&mut report);
    let row = s.public_job(row);
    let diffs = report["comparison"]["diffs"].as_array().cloned().unwrap_or_default();
    let delta = |d: &Value| d["candidate_score"].as_f64().unwrap_or(0.0) - d["baseline_score"].as_f64().unwrap_or(0.0);
    let (worse, better) = (diffs.iter().filter(|d| delta(d) < 0.0).count(), diffs.iter().filter(|d| delta(d) > 0.0).count());
    let shown: Vec<&Value> = diffs
        .iter()
        .filter(|d| match q.show.as_str() {
            "worse" => delta(d) < 0.0,
            "better" => delta(d) > 0.0,
            _ => true,
        })
        .collect();
    let ctx = minijinja::context! { job => row, report => report, diffs => shown, show => q.show, worse => worse, better => better, changed => diffs.len() };
    render("report.html", page_ctx(frame(&viewer, Some(&p), "jobs"), ctx))
}
