//! Eval suites: a form (prompt template with a live preview on a real example, scorers and
//! validator from the project's plugins, gate, shots), checked on save exactly as the API
//! checks a suite.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{Html, Response};
use axum::Form;
use lathe_jobs::eval::{Item, PromptTemplate, render_messages};
use serde::Deserialize;
use serde_json::{Value, json};

use super::data::plugin_choices;
use super::{Fields, Pages, Viewer, WebError, WebResult, field, frame, page_ctx, render, see_other};
use crate::api;
use crate::state::AppState;

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/projects/{project}/suites", suites)
        .post("/projects/{project}/suites", save)
        .post("/projects/{project}/suites/preview", preview)
}

async fn suites(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let rows = s.db.suites(&p.id).await?;
    let versions = api::dataset_versions(&s, &p.id).await?;
    let ctx = minijinja::context! { suites => rows, plugins => plugin_choices(&s, &p.id).await?, versions => versions };
    render("suites.html", page_ctx(frame(&viewer, Some(&p), "suites"), ctx))
}

/// The suite a form describes, as the JSON the API takes.
fn suite_json(f: &Fields) -> WebResult<Value> {
    let name = field(f, "name").ok_or_else(|| WebError::bad("the suite needs a name"))?;
    let user = field(f, "user").ok_or_else(|| WebError::bad("the prompt template is empty"))?;
    let scorers: Vec<Value> = f.iter().filter(|(k, v)| k == "scorer" && !v.is_empty()).map(|(_, v)| json!({"plugin": v})).collect();
    let mut suite = json!({
        "name": name,
        "templates": [{"name": field(f, "template_name").unwrap_or("default"), "system": field(f, "system"), "user": user}],
        "scorers": scorers,
    });
    if let Some(v) = field(f, "validator") {
        suite["validator"] = json!({"plugin": v});
    }
    if let Some(metric) = field(f, "gate_metric") {
        let min: f64 = field(f, "gate_min").unwrap_or("0").parse().map_err(|_| WebError::bad("the gate's minimum must be a number"))?;
        suite["gate"] = json!({"metric": metric, "min": min});
    }
    if let Some(shots) = field(f, "shots") {
        let shots: Result<Vec<usize>, _> = shots.split(',').map(|s| s.trim().parse::<usize>()).collect();
        suite["shots"] = json!(shots.map_err(|_| WebError::bad("shots: a comma-separated list of counts such as `0, 3`"))?);
    }
    if let Some(n) = field(f, "max_tokens") {
        suite["max_tokens"] = json!(n.parse::<usize>().map_err(|_| WebError::bad("max tokens must be a whole number"))?);
    }
    Ok(suite)
}

async fn save(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Form(f): Form<Fields>) -> WebResult<Response> {
    viewer.check_csrf(field(&f, "csrf").unwrap_or_default())?;
    let p = s.project(&viewer.caller, &project).await?;
    let suite = suite_json(&f)?;
    let name = suite["name"].as_str().unwrap_or_default().to_string();
    api::save_suite(&s, &p.id, &name, suite).await?;
    Ok(see_other(&format!("/projects/{}/suites#suite-{name}", p.id)))
}

#[derive(Deserialize)]
struct PreviewForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    system: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    version: String,
}

/// The prompt the model would see for the first example of a dataset version (htmx swaps
/// it in while the template is typed).
async fn preview(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Form(f): Form<PreviewForm>) -> WebResult<Html<String>> {
    viewer.check_csrf(&f.csrf)?;
    let p = s.project(&viewer.caller, &project).await?;
    if f.version.is_empty() {
        return Ok(Html("<p class=muted>Import a dataset to preview the prompt on one of its examples.</p>".into()));
    }
    let env = s.env(&p.id).await?;
    let template = PromptTemplate { name: "preview".into(), system: (!f.system.trim().is_empty()).then(|| f.system.clone()), user: f.user.clone() };
    let out = tokio::task::spawn_blocking(move || -> Result<_, lathe_jobs::JobError> {
        let store = env.datasets()?;
        let id = store.resolve(&f.version)?;
        let first = store.examples(&id)?.next().ok_or_else(|| lathe_jobs::JobError::Invalid("the version has no examples".into()))??;
        render_messages(&template, &[], &Item::from_example(&first)?)
    })
    .await
    .map_err(|e| WebError::internal(&e.to_string()))?;
    let ctx = match out {
        Ok(messages) => minijinja::context! { ok => true, messages => messages },
        Err(e) => minijinja::context! { ok => false, error => e.to_string() },
    };
    render("suite_preview.html", ctx)
}
