//! Models: every adapter the project trained, with its lineage as the training run
//! recorded it (base model and its sha256, dataset version, chat template hash, suite,
//! settings), its exports, and download links; the deploy aliases with their history,
//! deploy and rollback (the API's own `deployments::deploy` and the store's rollback); and
//! a playground that asks any servable model through the inference API's own path.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Pages, Viewer, WebResult, frame, page_ctx, render, see_other};
use crate::deployments::{NewDeploy, Servable, deploy, run_record, shown};
use crate::state::AppState;

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/projects/{project}/models", models)
        .post("/projects/{project}/deployments", deploy_form)
        .post("/projects/{project}/deployments/{name}/rollback", rollback_form)
        .post("/projects/{project}/playground", playground)
}

async fn models(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>) -> WebResult<Html<String>> {
    page(&s, &viewer, &project, None).await
}

/// Every field optional: a missing one reads as empty, and the handler says what is wrong.
#[derive(Deserialize, Default)]
#[serde(default)]
struct DeployForm {
    csrf: String,
    name: String,
    job_id: String,
    model: String,
    force: Option<String>,
}

/// Deploys through the API's own function; a refusal shows on the page, the form kept.
async fn deploy_form(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Form(f): Form<DeployForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    let p = s.project(&viewer.caller, &project).await?;
    let some = |v: String| (!v.trim().is_empty()).then(|| v.trim().to_string());
    let b = NewDeploy { name: f.name.trim().to_string(), job_id: some(f.job_id), model: some(f.model), force: f.force.is_some() };
    match deploy(&s, &viewer.caller, &p, b).await {
        Ok(_) => Ok(see_other(&format!("/projects/{}/models#deployments", p.id))),
        Err(e) => Ok((StatusCode::BAD_REQUEST, page(&s, &viewer, &project, Some(e.to_string())).await?).into_response()),
    }
}

async fn rollback_form(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, name)): Path<(String, String)>, Form(f): Form<super::CsrfForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    let p = s.project(&viewer.caller, &project).await?;
    match s.db.rollback(&p.id, &name, Some(&viewer.caller.token_id)).await {
        Ok(_) => Ok(see_other(&format!("/projects/{}/models#deployments", p.id))),
        Err(e) => Ok((StatusCode::CONFLICT, page(&s, &viewer, &project, Some(e.to_string())).await?).into_response()),
    }
}

/// Every field optional: a missing one reads as empty, and the handler says what is wrong.
#[derive(Deserialize, Default)]
#[serde(default)]
struct PlaygroundForm {
    csrf: String,
    model: String,
    system: String,
    message: String,
    /// A JSON Schema the answer must match (empty: free text).
    schema: String,
    temperature: String,
    max_tokens: String,
}

/// One chat turn through `/v1/chat/completions`' own path; answers the result fragment.
async fn playground(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Form(f): Form<PlaygroundForm>) -> WebResult<Html<String>> {
    viewer.check_csrf(&f.csrf)?;
    s.project(&viewer.caller, &project).await?;
    let number = |what: &str, text: &str, default: f64| -> Result<f64, String> {
        match text.trim() {
            "" => Ok(default),
            t => t.parse().map_err(|_| format!("{what} `{t}` is not a number")),
        }
    };
    let body = (|| -> Result<Value, String> {
        let mut messages = Vec::new();
        if !f.system.trim().is_empty() {
            messages.push(json!({"role": "system", "content": f.system}));
        }
        messages.push(json!({"role": "user", "content": f.message}));
        let mut body = json!({"model": f.model, "messages": messages,
            "temperature": number("the temperature", &f.temperature, 0.0)?, "max_tokens": number("max tokens", &f.max_tokens, 128.0)? as u64});
        if !f.schema.trim().is_empty() {
            let schema: Value = serde_json::from_str(&f.schema).map_err(|e| format!("the JSON schema is not JSON: {e}"))?;
            body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "playground", "schema": schema}});
        }
        Ok(body)
    })();
    let answer = match body {
        Ok(body) => crate::inference::chat_completion(&s, &viewer.caller, body).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let ctx = match answer {
        Ok(v) => minijinja::context! { ok => true, choice => v["choices"][0], usage => v["usage"], model => v["model"] },
        Err(e) => minijinja::context! { ok => false, error => e },
    };
    render("playground_result.html", ctx)
}

async fn page(s: &Arc<AppState>, viewer: &Viewer, project: &str, deploy_error: Option<String>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, project).await?;
    let mut trained = Vec::new();
    for kind in ["train", "demo"] {
        trained.extend(s.db.jobs(&p.id, Some(kind), None, 100).await?.into_iter().filter(|j| j.state.as_str() == "succeeded"));
    }
    trained.sort_by_key(|j| std::cmp::Reverse(j.finished_at));
    let exports: Vec<_> = s.db.jobs(&p.id, Some("export"), None, 100).await?.into_iter().filter(|j| j.state.as_str() == "succeeded").collect();
    // Adapters and merged exports by their fine-tune ids.
    let fine_tunes: Vec<String> =
        trained.iter().chain(&exports).filter_map(|j| Servable::of(s, j).map(|w| format!("ft:{}:{}:{}", w.base(), p.name, j.id))).collect();
    // The lineage each run wrote beside its adapter (`run.json`), read off the async threads.
    let adapters = tokio::task::spawn_blocking(move || {
        trained
            .into_iter()
            .map(|job| {
                let dir = job.outcome.as_ref().and_then(|o| o["adapter_dir"].as_str()).map(std::path::PathBuf::from);
                let run = dir.as_deref().map_or(Value::Null, run_record);
                let exported: Vec<Value> = exports
                    .iter()
                    .filter(|e| dir.as_ref().is_some_and(|d| e.spec["adapter"].as_str() == Some(&d.display().to_string())))
                    .map(|e| json!({"job": e.id, "format": e.spec["format"], "finished_at": e.finished_at, "servable": e.spec["format"] != "peft"}))
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
    // Each alias with its last versions, newest first.
    let mut deployments = Vec::new();
    for d in s.db.deployments(&p.id).await? {
        let history: Vec<Value> = s.db.deployment_history(&p.id, &d.name).await?.iter().take(6).map(|h| shown(&p, h)).collect();
        // An export serves as a model of its own; its format says which.
        let export_format = match &d.job_id {
            Some(j) => s.db.job(&p.id, j).await.ok().filter(|j| j.kind == "export").map(|j| j.spec["format"].clone()),
            None => None,
        };
        deployments.push(json!({"current": shown(&p, &d), "history": history, "export_format": export_format}));
    }
    // What the playground can ask: aliases, the adapters by their fine-tune id, the bases.
    let mut servable: Vec<String> = deployments.iter().filter_map(|d| d["current"]["model_id"].as_str().map(String::from)).collect();
    servable.extend(fine_tunes);
    let mut bases: Vec<String> = s.config.models.keys().cloned().collect();
    bases.sort();
    servable.extend(bases.iter().cloned());
    render(
        "models.html",
        page_ctx(frame(viewer, Some(&p), "models"), minijinja::context! { adapters => adapters, deployments => deployments, servable => servable, bases => bases, deploy_error => deploy_error }),
    )
}
