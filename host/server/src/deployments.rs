//! Deploy aliases: a project names the version it serves (`prod`, `staging`), and the
//! inference API answers to `<project>/<name>`. A version is a base model, a trained
//! adapter over its base, or a merged export of one (int8 or int4 GGUF, served as a model
//! of its own through the quantized kernels). An adapter or export is deployed only after
//! an eval run of it passed its suite's gate on the held-out set (or with `force`, which
//! the history records): a quantized variant must pass the gate itself. A rollback is one
//! call and serves the previous version again. Requests in flight finish on the version
//! they started on: each carries its adapter or scheduler.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use lathe_store::{Deployment, JobRow, NewDeployment, Project};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Jobs whose outcome is an adapter that can be served.
const TRAINED: [&str; 3] = ["train", "fine_tune", "demo"];

pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(list_deployments, create_deployment))
        .routes(routes!(get_deployment))
        .routes(routes!(rollback))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeploy {
    /// The alias: served as `<project name>/<name>`.
    pub name: String,
    /// A succeeded training job whose adapter to serve, or a succeeded export job whose
    /// merged weights to serve (`gguf-q8_0`, `gguf-q4_1`, ...); without it, `model` alone.
    #[serde(default)]
    pub job_id: Option<String>,
    /// A configured base model (only without `job_id`: an adapter runs over the base it
    /// was trained on).
    #[serde(default)]
    pub model: Option<String>,
    /// Deploy without a passing gate (recorded in the history).
    #[serde(default)]
    pub force: bool,
}

/// A deployment as the API shows it: the row, and the id the inference API answers to.
pub fn shown(p: &Project, d: &Deployment) -> Value {
    let mut v = json!(d);
    v["model_id"] = json!(format!("{}/{}", p.name, d.name));
    v
}

/// What a succeeded job left that can answer requests.
#[derive(Debug, Clone)]
pub enum Servable {
    /// A LoRA adapter, run over the base model it was trained on.
    Adapter { base: String, dir: PathBuf },
    /// An export of an adapter merged into its base (quantized or not), run as a model of
    /// its own.
    Merged { base: String, path: PathBuf, format: String },
}

impl Servable {
    /// What a succeeded training job (its adapter) or export job (its merged weights)
    /// serves, over a base model this server has; None for anything else.
    pub fn of(s: &AppState, job: &JobRow) -> Option<Self> {
        if job.state.as_str() != "succeeded" {
            return None;
        }
        let configured = |path: &str| {
            let name = s.redact(path).into_owned();
            s.config.models.contains_key(&name).then_some(name)
        };
        match job.kind.as_str() {
            "export" => {
                let format = job.spec["format"].as_str()?;
                let path = job.outcome.as_ref()?.as_str()?;
                (format != "peft").then_some(())?;
                Some(Self::Merged { base: configured(job.spec["model"].as_str()?)?, path: path.into(), format: format.into() })
            }
            kind if TRAINED.contains(&kind) => {
                let dir = job.outcome.as_ref()?["adapter_dir"].as_str()?;
                let base = match kind {
                    // The demo trains the default model.
                    "demo" => s.config.models.iter().find(|(_, p)| p.as_path() == FsPath::new(lathe_jobs::DEFAULT_MODEL)).map(|(n, _)| n.clone())?,
                    _ => configured(job.spec["model"].as_str()?)?,
                };
                Some(Self::Adapter { base, dir: dir.into() })
            }
            _ => None,
        }
    }

    /// The configured base model it was made from.
    pub fn base(&self) -> &str {
        match self {
            Self::Adapter { base, .. } | Self::Merged { base, .. } => base,
        }
    }

    /// The adapter folder whose `run.json` records the training: the adapter's own, or
    /// for an export the adapter it merged (from the export job's spec).
    fn trained_adapter(&self, job: &JobRow) -> Option<PathBuf> {
        match self {
            Self::Adapter { dir, .. } => Some(dir.clone()),
            Self::Merged { .. } => job.spec["adapter"].as_str().map(PathBuf::from),
        }
    }

    /// Whether an eval job's spec evaluated this: the adapter, or the export as a model.
    fn evaluated_by(&self, spec: &Value) -> bool {
        let path = |key: &str| spec[key].as_str().map(FsPath::new);
        match self {
            Self::Adapter { dir, .. } => path("adapter") == Some(dir),
            Self::Merged { path: file, .. } => path("model") == Some(file) && spec["adapter"].is_null(),
        }
    }
}

/// The newest succeeded eval run of `what` over a whole held-out set whose gate passed.
async fn passing_eval(s: &AppState, project_id: &str, what: &Servable) -> ApiResult<Option<String>> {
    let mut after = None;
    loop {
        let page = s.db.jobs(project_id, Some("eval_run"), after.as_deref(), 100).await?;
        let Some(last) = page.last() else { return Ok(None) };
        after = Some(last.id.clone());
        let passed = page.iter().find(|j| {
            j.state.as_str() == "succeeded"
                && what.evaluated_by(&j.spec)
                && j.spec["limit"].is_null()
                && j.outcome.as_ref().is_some_and(|o| o["run"]["passed_gate"] == true)
        });
        if let Some(j) = passed {
            return Ok(Some(j.id.clone()));
        }
    }
}

/// The training job (of the project) whose adapter is `dir`.
async fn training_job(s: &AppState, project_id: &str, dir: &FsPath) -> ApiResult<Option<JobRow>> {
    for kind in TRAINED {
        let mut after = None;
        loop {
            let page = s.db.jobs(project_id, Some(kind), after.as_deref(), 100).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            if let Some(j) = page.into_iter().find(|j| j.outcome.as_ref().and_then(|o| o["adapter_dir"].as_str()).map(FsPath::new) == Some(dir)) {
                return Ok(Some(j));
            }
        }
    }
    Ok(None)
}

/// What each alias of the project serves now.
#[utoipa::path(get, path = "/api/v1/projects/{project}/deployments", params(("project" = String, Path)), responses((status = 200, description = "each alias and what it serves")))]
async fn list_deployments(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let data: Vec<Value> = s.db.deployments(&p.id).await?.iter().map(|d| shown(&p, d)).collect();
    Ok(Json(json!({"data": data})))
}

/// Points an alias at a version: a trained adapter that passed its gate, or a base model.
#[utoipa::path(post, path = "/api/v1/projects/{project}/deployments", params(("project" = String, Path)), request_body = NewDeploy, responses((status = 201, description = "the new current version"), (status = 400, description = "not deployable: no passing gate, not a trained adapter, an unknown model")))]
async fn create_deployment(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>, Json(b): Json<NewDeploy>) -> ApiResult<(StatusCode, Json<Value>)> {
    let p = s.project(&caller, &project).await?;
    let d = deploy(&s, &caller, &p, b).await?;
    Ok((StatusCode::CREATED, Json(shown(&p, &d))))
}

/// Points an alias at a version, as the API and the web UI ask: a base model, or a
/// trained adapter with a passing gate (or `force`).
pub async fn deploy(s: &AppState, caller: &Caller, p: &Project, b: NewDeploy) -> ApiResult<Deployment> {
    let (model, job_id, eval_job_id) = match (&b.job_id, &b.model) {
        (Some(_), Some(_)) => return Err(ApiError::bad("give `job_id` or `model`, not both: an adapter runs over the base it was trained on")),
        (None, None) => return Err(ApiError::bad("give `job_id` (a trained adapter) or `model` (a base model)")),
        (None, Some(m)) => {
            s.model(m)?;
            (m.clone(), None, None)
        }
        (Some(j), None) => {
            let job = s.db.job(&p.id, j).await?;
            let what = Servable::of(s, &job)
                .ok_or_else(|| ApiError::bad(format!("job `{j}` is not a succeeded training or export job (of a merged model) whose base model this server has")))?;
            let eval = passing_eval(s, &p.id, &what).await?;
            if eval.is_none() && !b.force {
                let key = if matches!(what, Servable::Merged { .. }) { "export_job" } else { "adapter_job" };
                return Err(ApiError::bad(format!(
                    "job `{j}` has not passed its suite's gate on the held-out set: run an `eval_run` job with `{key}: {j}` over the whole held-out version (its gate must pass), or deploy with `force: true`"
                )));
            }
            (what.base().to_string(), Some(j.clone()), eval)
        }
    };
    let forced = b.force && eval_job_id.is_none() && job_id.is_some();
    Ok(s.db
        .deploy(&NewDeployment { project_id: p.id.clone(), name: b.name, model, job_id, eval_job_id, forced, created_by: Some(caller.token_id.clone()) })
        .await?)
}

/// The record a training run wrote beside its adapter (`run.json`: base model and its
/// sha256, dataset version, chat-template hashes, settings); null when there is none.
pub fn run_record(adapter_dir: &std::path::Path) -> Value {
    std::fs::read_to_string(adapter_dir.join("run.json")).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null)
}

/// What a deployed version is made of, from the immutable records behind it: the base
/// model and its sha256, the adapter (and for an export, its file and format), the dataset
/// version and chat-template hashes its training wrote beside it (`run.json`), the eval run
/// whose gate it passed, and the plugin hashes the training and the eval pinned.
async fn version(s: &AppState, p: &Project, d: &Deployment) -> ApiResult<Value> {
    let mut v = json!({"base_model": d.model, "adapter_job": d.job_id, "eval_job": d.eval_job_id, "forced": d.forced});
    if let Some(j) = &d.job_id {
        let job = s.db.job(&p.id, j).await?;
        let what = Servable::of(s, &job);
        let adapter = what.as_ref().and_then(|w| w.trained_adapter(&job));
        let mut trained = Some(job);
        if let Some(Servable::Merged { path, format, .. }) = &what {
            v["export_job"] = json!(j);
            v["export_format"] = json!(format);
            v["export"] = json!(s.redact(&path.display().to_string()));
            // The lineage is the training's: the job whose adapter the export merged.
            trained = match &adapter {
                Some(dir) => training_job(s, &p.id, dir).await?,
                None => None,
            };
            v["adapter_job"] = json!(trained.as_ref().map(|t| &t.id));
        }
        v["training_plugins"] = json!(trained.map(|t| t.plugins));
        if let Some(dir) = adapter {
            let record_dir = dir.clone();
            let run = tokio::task::spawn_blocking(move || run_record(&record_dir)).await.unwrap_or(Value::Null);
            for key in ["base_model_sha256", "dataset", "chat_template_sha256", "tokenizer_template_sha256"] {
                v[key] = run[key].clone();
            }
            v["adapter"] = json!(s.redact(&dir.display().to_string()));
        }
    }
    if let Some(e) = &d.eval_job_id {
        let eval = s.db.job(&p.id, e).await?;
        v["eval_plugins"] = json!(eval.plugins);
        v["eval_data"] = eval.spec["data"].clone();
        v["eval_suite"] = eval.spec["suite"]["name"].clone();
        if let Some(run) = eval.outcome.as_ref().map(|o| &o["run"]) {
            v["passed_gate"] = run["passed_gate"].clone();
        }
    }
    Ok(v)
}

/// What an alias serves (with what that version is made of) and its history, newest first.
#[utoipa::path(get, path = "/api/v1/projects/{project}/deployments/{name}", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, description = "current version with its lineage, and history")))]
async fn get_deployment(State(s): State<Arc<AppState>>, caller: Caller, Path((project, name)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let current = s.db.deployment(&p.id, &name).await?;
    let history: Vec<Value> = s.db.deployment_history(&p.id, &name).await?.iter().map(|d| shown(&p, d)).collect();
    let mut current_v = shown(&p, &current);
    current_v["version"] = version(&s, &p, &current).await?;
    Ok(Json(json!({"current": current_v, "history": history})))
}

/// Serves the previous version again. Requests already running finish on the version
/// they started with.
#[utoipa::path(post, path = "/api/v1/projects/{project}/deployments/{name}/rollback", params(("project" = String, Path), ("name" = String, Path)), responses((status = 200, description = "the new current version"), (status = 409, description = "nothing earlier to roll back to")))]
async fn rollback(State(s): State<Arc<AppState>>, caller: Caller, Path((project, name)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let d = s.db.rollback(&p.id, &name, Some(&caller.token_id)).await?;
    Ok(Json(shown(&p, &d)))
}
