//! The OpenAI-compatible files and fine-tuning API under `/v1`, with the object shapes,
//! list envelopes, status lifecycle and error bodies the official `openai` clients expect.
//! The project is the `OpenAI-Project` header (`OpenAI(project=…)`), or the team's only
//! project. Lathe's own knobs travel as extra fields of the create request (`suite`,
//! `rank`, `alpha`, `targets`, `qlora`, `max_steps`, `learning_rate`, …); a project
//! without an eval suite gets no fine-tuning job.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use lathe_jobs::pipeline::Job;
use lathe_jobs::pipeline::train::FineTuneSpec;
use lathe_store::{JobRow, Project};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::{receive_file, train_settings};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The job kind behind OpenAI's fine-tuning jobs (`pipeline::Job::FineTune`).
const FINE_TUNE: &str = "fine_tune";

pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(list_files, upload_file))
        .routes(routes!(get_file))
        .routes(routes!(list_jobs, create_job))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(list_events))
        .routes(routes!(list_checkpoints))
        .routes(routes!(list_models))
}

/// The project a `/v1` request works in.
async fn project(s: &AppState, caller: &Caller, headers: &HeaderMap) -> ApiResult<Project> {
    if let Some(id) = headers.get("openai-project").and_then(|v| v.to_str().ok()) {
        return s.project(caller, id).await;
    }
    let mut projects = s.db.projects(&caller.team_id).await?;
    match projects.len() {
        1 => Ok(projects.remove(0)),
        0 => Err(ApiError::bad("this team has no project yet: create one (POST /api/v1/projects)")),
        _ => Err(ApiError::bad("this team has several projects: name one with the OpenAI-Project header (`OpenAI(project=…)`)")),
    }
}

fn seconds(ms: i64) -> i64 {
    ms / 1000
}

fn file_object(f: &lathe_store::FileRow) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": seconds(f.created_at),
        "filename": f.filename, "purpose": f.purpose, "status": "processed", "status_details": null,
    })
}

#[utoipa::path(get, path = "/v1/files", responses((status = 200, description = "files")))]
async fn list_files(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let p = project(&s, &caller, &headers).await?;
    let data: Vec<Value> = s.db.files(&p.id).await?.iter().map(file_object).collect();
    Ok(Json(json!({"object": "list", "data": data, "has_more": false})))
}

/// Upload a file (multipart `file` and `purpose`, as `client.files.create`).
#[utoipa::path(post, path = "/v1/files", responses((status = 200, description = "the file object")))]
async fn upload_file(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, multipart: Multipart) -> ApiResult<Json<Value>> {
    let p = project(&s, &caller, &headers).await?;
    let f = receive_file(&s, &p.id, multipart, "fine-tune").await?;
    Ok(Json(file_object(&f)))
}

#[utoipa::path(get, path = "/v1/files/{file_id}", params(("file_id" = String, Path)), responses((status = 200, description = "the file object")))]
async fn get_file(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, Path(file_id): Path<String>) -> ApiResult<Json<Value>> {
    let p = project(&s, &caller, &headers).await?;
    Ok(Json(file_object(&s.db.file(&p.id, &file_id).await?)))
}

/// `queued`, `running`, `succeeded`, `failed` or `cancelled`, as OpenAI names them.
fn status(job: &JobRow) -> &'static str {
    job.state.as_str()
}

fn job_object(s: &AppState, p: &Project, job: &JobRow) -> Value {
    let spec = &job.spec;
    let settings = &spec["settings"];
    // A configured model's path reads as its name.
    let model_name = s.redact(spec["model"].as_str().unwrap_or(""));
    let succeeded = status(job) == "succeeded";
    let error = job.error.as_ref().map(|m| json!({"code": "job_failed", "message": s.redact(m), "param": null}));
    json!({
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": seconds(job.created_at),
        "finished_at": job.finished_at.map(seconds),
        "model": model_name,
        "fine_tuned_model": succeeded.then(|| format!("ft:{model_name}:{}:{}", p.name, job.id)),
        "organization_id": p.team_id,
        "status": status(job),
        "hyperparameters": {
            "n_epochs": settings["epochs"],
            "batch_size": settings["batch_size"],
            "learning_rate_multiplier": settings["learning_rate"].as_f64().map(|lr| lr / 1e-4),
        },
        "training_file": spec["training_file"],
        "validation_file": null,
        "result_files": [],
        "trained_tokens": job.outcome.as_ref().map(trained_tokens),
        "error": error,
        "seed": settings["seed"],
        "estimated_finish": null,
        "integrations": [],
        "metadata": null,
        "method": {"type": "supervised"},
        "user_provided_suffix": null,
        // Lathe's own fields.
        "lathe": {"project": p.id, "suite": spec["suite"]["name"], "settings": settings, "outcome": job.outcome},
    })
}

fn trained_tokens(outcome: &Value) -> i64 {
    outcome["runs"]
        .as_array()
        .map(|runs| runs.iter().flat_map(|r| r["history"].as_array().cloned().unwrap_or_default()).map(|h| h["tokens"].as_i64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/fine_tuning/jobs", responses((status = 200, description = "fine-tuning jobs, newest first")))]
async fn list_jobs(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, Query(q): Query<ListQuery>) -> ApiResult<Json<Value>> {
    let p = project(&s, &caller, &headers).await?;
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let found = s.db.jobs(&p.id, Some(FINE_TUNE), q.after.as_deref(), limit + 1).await?;
    let has_more = found.len() as i64 > limit;
    let data: Vec<Value> = found.iter().take(limit as usize).map(|j| job_object(&s, &p, j)).collect();
    Ok(Json(json!({"object": "list", "data": data, "has_more": has_more})))
}

/// Create a fine-tuning job (`client.fine_tuning.jobs.create`).
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", responses((status = 200, description = "the job"), (status = 400, description = "e.g. no eval suite in the project")))]
async fn create_job(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, Json(body): Json<Map<String, Value>>) -> ApiResult<Json<Value>> {
    let p = project(&s, &caller, &headers).await?;
    let mut body = body;
    let str_field = |body: &mut Map<String, Value>, k: &str| -> ApiResult<Option<String>> {
        match body.remove(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(v)) => Ok(Some(v)),
            Some(other) => Err(ApiError::bad(format!("`{k}` must be a string, not {other}"))),
        }
    };
    let model = str_field(&mut body, "model")?.ok_or_else(|| ApiError::bad("`model` is required"))?;
    let training_file = str_field(&mut body, "training_file")?.ok_or_else(|| ApiError::bad("`training_file` is required"))?;
    let suite_name = str_field(&mut body, "suite")?;
    let template = str_field(&mut body, "template")?;
    for ignored in ["suffix", "validation_file", "metadata", "integrations", "method"] {
        body.remove(ignored);
    }
    // Lathe's own, as on the native API: the device kind and memory the job needs.
    let needs = crate::api::needs_from(body.remove("needs"))?;
    // The workflow: no fine-tune without an eval suite.
    let suites = s.db.suites(&p.id).await?;
    let suite_row = match &suite_name {
        Some(n) => suites.iter().find(|r| &r.name == n).ok_or_else(|| ApiError::bad(format!("the project has no eval suite `{n}`")))?,
        None => suites.first().ok_or_else(|| {
            ApiError::bad("this project has no eval suite: create one first (PUT /api/v1/projects/{project}/suites/{name}); Lathe measures every fine-tune against it")
        })?,
    };
    let suite = lathe_jobs::eval::Suite::from_json(&suite_row.definition.to_string())?;
    // OpenAI's hyperparameters, then Lathe's own settings as extra fields.
    let mut settings = Map::new();
    if let Some(Value::Object(h)) = body.remove("hyperparameters") {
        for (k, v) in h {
            match (k.as_str(), v) {
                (_, Value::String(auto)) if auto == "auto" => {}
                ("n_epochs", v) => drop(settings.insert("epochs".into(), v)),
                ("batch_size", v) => drop(settings.insert("batch_size".into(), v)),
                ("learning_rate_multiplier", v) => {
                    let m = v.as_f64().ok_or_else(|| ApiError::bad("learning_rate_multiplier must be a number"))?;
                    settings.insert("learning_rate".into(), json!(m * 1e-4));
                }
                (other, _) => return Err(ApiError::bad(format!("unknown hyperparameter `{other}`"))),
            }
        }
    }
    if let Some(seed) = body.remove("seed") {
        settings.insert("seed".into(), seed);
    }
    settings.extend(body);
    let settings = train_settings(&s, &p.id, settings)?;
    let file = s.db.file(&p.id, &training_file).await?;
    let job_id = lathe_store::new_job_id();
    let spec = FineTuneSpec {
        file: s.artifact_path(&file.sha256).await?,
        source_name: Some(file.filename.clone()),
        training_file: Some(training_file),
        model: s.model(&model)?.to_path_buf(),
        suite,
        template,
        heldout: 0.15,
        out: s.project_dir(&p.id).join("runs").join(&job_id),
        settings,
    };
    let row = crate::api::enqueue_job(&s, &p.id, job_id, &Job::FineTune(spec), needs, 0, 3).await?;
    Ok(Json(job_object(&s, &p, &row)))
}

async fn fine_tune_job(s: &AppState, p: &Project, id: &str) -> ApiResult<JobRow> {
    let job = s.db.job(&p.id, id).await?;
    if job.kind != FINE_TUNE {
        return Err(ApiError::not_found("fine-tuning job", id));
    }
    Ok(job)
}

#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}", params(("job_id" = String, Path)), responses((status = 200, description = "the job")))]
async fn get_job(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let p = project(&s, &caller, &headers).await?;
    let job = fine_tune_job(&s, &p, &id).await?;
    Ok(Json(job_object(&s, &p, &job)))
}

#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{job_id}/cancel", params(("job_id" = String, Path)), responses((status = 200, description = "the job")))]
async fn cancel_job(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let p = project(&s, &caller, &headers).await?;
    fine_tune_job(&s, &p, &id).await?;
    let job = s.db.cancel(&p.id, &id).await?;
    Ok(Json(job_object(&s, &p, &job)))
}

/// Events newest first, as OpenAI lists them; `after` is an event id.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}/events", params(("job_id" = String, Path)), responses((status = 200, description = "events")))]
async fn list_events(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, Path(id): Path<String>, Query(q): Query<ListQuery>) -> ApiResult<(StatusCode, Json<Value>)> {
    let p = project(&s, &caller, &headers).await?;
    let job = fine_tune_job(&s, &p, &id).await?;
    let limit = q.limit.unwrap_or(20).clamp(1, 1000) as usize;
    let before_seq = q.after.as_deref().and_then(|a| a.rsplit('-').next()).and_then(|n| n.parse::<i64>().ok()).unwrap_or(i64::MAX);
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let batch = s.db.events(&job.id, after, 1000).await?;
        let Some(last) = batch.last() else { break };
        after = last.seq;
        all.extend(batch);
    }
    let mut data: Vec<Value> = all
        .iter()
        .rev()
        .filter(|e| e.seq < before_seq)
        .filter_map(|e| {
            let (kind, message, data) = match e.data["type"].as_str()? {
                "metric" if e.data["series"] == "train/loss" => {
                    let step = e.data["x"].as_i64().unwrap_or(0);
                    let loss = e.data["value"].as_f64().unwrap_or(f64::NAN);
                    ("metrics", format!("Step {step}: training loss={loss:.4}"), json!({"step": step, "train_loss": loss}))
                }
                "metric" => return None,
                "step_started" => ("message", e.data["title"].as_str()?.to_string(), Value::Null),
                "step_finished" => ("message", e.data["summary"].as_str()?.to_string(), Value::Null),
                "log" => ("message", e.data["message"].as_str()?.to_string(), Value::Null),
                "artifact" => ("message", format!("wrote {}", e.data["kind"].as_str()?), Value::Null),
                _ => return None,
            };
            let level = if e.data["level"] == "warn" { "warn" } else { "info" };
            Some(json!({
                "object": "fine_tuning.job.event", "id": format!("ftevent-{}-{}", job.id, e.seq),
                "created_at": seconds(e.created_at), "level": level, "message": message, "data": data, "type": kind,
            }))
        })
        .collect();
    // The lifecycle's own messages, as OpenAI sends them.
    if job.state.is_finished() && before_seq == i64::MAX {
        let end = match status(&job) {
            "succeeded" => "The job has successfully completed".to_string(),
            "cancelled" => "The job was cancelled".to_string(),
            _ => format!("The job failed: {}", job.error.clone().unwrap_or_default()),
        };
        data.insert(0, json!({"object": "fine_tuning.job.event", "id": format!("ftevent-{}-end", job.id), "created_at": seconds(job.finished_at.unwrap_or(job.created_at)), "level": "info", "message": end, "data": null, "type": "message"}));
    }
    let has_more = data.len() > limit;
    data.truncate(limit);
    Ok((StatusCode::OK, Json(json!({"object": "list", "data": data, "has_more": has_more}))))
}

/// The checkpoints a training run kept, with the training loss at each.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{job_id}/checkpoints", params(("job_id" = String, Path)), responses((status = 200, description = "checkpoints, newest first")))]
async fn list_checkpoints(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let p = project(&s, &caller, &headers).await?;
    let job = fine_tune_job(&s, &p, &id).await?;
    let out = std::path::PathBuf::from(job.spec["out"].as_str().unwrap_or_default());
    let loss_at: std::collections::HashMap<i64, f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["train"]["step"].as_i64()?, v["train"]["loss"].as_f64()?)))
        .collect();
    let mut steps: Vec<i64> = std::fs::read_dir(out.join("checkpoints"))
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok()).collect())
        .unwrap_or_default();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    let model = job_object(&s, &p, &job)["model"].as_str().unwrap_or("").to_string();
    let data: Vec<Value> = steps
        .iter()
        .map(|step| {
            json!({
                "object": "fine_tuning.job.checkpoint", "id": format!("ftckpt-{}-{step}", job.id),
                "created_at": seconds(job.started_at.unwrap_or(job.created_at)),
                "fine_tuned_model_checkpoint": format!("ft:{model}:{}:{}:ckpt-step-{step}", p.name, job.id),
                "step_number": step, "metrics": {"step": step, "train_loss": loss_at.get(step)},
                "fine_tuning_job_id": job.id,
            })
        })
        .collect();
    let first = data.first().map(|c| c["id"].clone());
    let last = data.last().map(|c| c["id"].clone());
    Ok(Json(json!({"object": "list", "data": data, "has_more": false, "first_id": first, "last_id": last})))
}

/// The server's base models, the project's deploy aliases and its fine-tuned models.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, description = "models")))]
async fn list_models(State(s): State<Arc<AppState>>, caller: Caller, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let mut data: Vec<Value> = s.config.models.keys().map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "lathe"})).collect();
    if let Ok(p) = project(&s, &caller, &headers).await {
        for d in s.db.deployments(&p.id).await? {
            data.push(json!({"id": format!("{}/{}", p.name, d.name), "object": "model", "created": seconds(d.created_at), "owned_by": p.team_id}));
        }
        let mut after = None;
        loop {
            let page = s.db.jobs(&p.id, Some(FINE_TUNE), after.as_deref(), 100).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for job in page.iter().filter(|j| status(j) == "succeeded") {
                let o = job_object(&s, &p, job);
                data.push(json!({"id": o["fine_tuned_model"], "object": "model", "created": o["finished_at"], "owned_by": p.team_id}));
            }
        }
    }
    Ok(Json(json!({"object": "list", "data": data})))
}
