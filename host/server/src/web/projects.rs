//! Projects, a project's home (the workflow as a checklist), and the team's settings.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use serde::{Deserialize, Serialize};

use super::{CsrfForm, Pages, Viewer, WebResult, frame, page_ctx, render, see_other};
use crate::api;
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/projects", list)
        .post("/projects", create)
        .get("/projects/{project}", home)
        .get("/projects/{project}/settings", project_settings)
        .post("/projects/{project}/settings", save_project_settings)
        .get("/settings", settings)
        .post("/settings/tokens", create_token)
        .post("/settings/tokens/{token}/revoke", revoke_token)
        .post("/settings/members", add_member)
        .post("/settings/members/{member}/role", set_role)
        .post("/settings/members/{member}/remove", remove_member)
}

async fn list(State(s): State<Arc<AppState>>, viewer: Viewer) -> WebResult<Html<String>> {
    let projects = s.db.projects(&viewer.caller.team_id).await?;
    render("projects.html", page_ctx(frame(&viewer, None, "projects"), minijinja::context! { projects => projects }))
}

#[derive(Deserialize)]
struct NewProjectForm {
    #[serde(default)]
    csrf: String,
    name: String,
    #[serde(default)]
    description: String,
}

async fn create(State(s): State<Arc<AppState>>, viewer: Viewer, Form(f): Form<NewProjectForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    crate::api::check_name(f.name.trim(), "project name")?;
    let p = s.db.create_project(&viewer.caller.team_id, f.name.trim(), f.description.trim()).await?;
    Ok(see_other(&format!("/projects/{}", p.id)))
}

/// One step of the workflow and whether it is done.
#[derive(Serialize)]
struct Step {
    title: &'static str,
    done: bool,
    /// Where to do it.
    href: String,
    /// Why it cannot start yet (the step before it is not done).
    blocked: Option<&'static str>,
    detail: String,
}

/// The workflow in the order Lathe enforces it, each step's state read from the project's
/// suites, dataset versions and succeeded jobs.
async fn checklist(s: &AppState, project_id: &str) -> WebResult<Vec<Step>> {
    let suites = s.db.suites(project_id).await?;
    let counts = s.db.succeeded_by_kind(project_id).await?;
    let succeeded = |kind: &str| counts.get(kind).copied().unwrap_or(0) as usize;
    // A succeeded demo job ran every step up to the verdict.
    let demo = succeeded("demo");
    let (baseline, imported, split, trained, reported, exported) = (
        succeeded("eval_baseline") + demo,
        succeeded("data_import") + demo,
        succeeded("data_split") + demo,
        succeeded("train") + demo,
        succeeded("eval_report") + demo,
        succeeded("export"),
    );
    let base = format!("/projects/{project_id}");
    let has_suite = !suites.is_empty();
    let suite_names: Vec<&str> = suites.iter().map(|r| r.name.as_str()).collect();
    let count = |n: usize, what: &str| if n == 0 { String::new() } else { format!("{n} {what}{}", if n == 1 { "" } else { "s" }) };
    Ok(vec![
        Step { title: "Define the held-out eval suite", done: has_suite, href: format!("{base}/suites"), blocked: None, detail: suite_names.join(", ") },
        Step { title: "Import data", done: imported > 0, href: format!("{base}/datasets"), blocked: None, detail: count(imported, "import") },
        Step {
            title: "Curate and split (10–20 % held out)",
            done: split > 0,
            href: format!("{base}/datasets"),
            blocked: (imported == 0).then_some("import a dataset first"),
            detail: count(split, "split"),
        },
        Step {
            title: "Measure the base model with the best prompt",
            done: baseline > 0,
            href: format!("{base}/jobs#baseline"),
            blocked: if !has_suite { Some("define an eval suite first") } else if split == 0 { Some("split a dataset first") } else { None },
            detail: count(baseline, "baseline"),
        },
        Step {
            title: "Train a LoRA adapter",
            done: trained > 0,
            href: format!("{base}/jobs#train"),
            blocked: if !has_suite { Some("define an eval suite first") } else if baseline == 0 { Some("measure the baseline first") } else { None },
            detail: count(trained, "run"),
        },
        Step {
            title: "Compare with the baseline: the verdict",
            done: reported > 0,
            href: format!("{base}/jobs#report"),
            blocked: (trained == 0).then_some("train first"),
            detail: count(reported, "report"),
        },
        Step { title: "Export", done: exported > 0, href: format!("{base}/jobs#export"), blocked: (trained == 0).then_some("train first"), detail: count(exported, "export") },
    ])
}

async fn home(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let steps = checklist(&s, &p.id).await?;
    let recent = s.db.jobs(&p.id, None, None, 10).await?;
    render("project.html", page_ctx(frame(&viewer, Some(&p), "home"), minijinja::context! { steps => steps, jobs => recent }))
}

/// The project's `lathe.toml`: the training defaults of its jobs, edited in the page and
/// checked before it is saved; beside it, what it resolves to.
async fn project_settings(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let toml = api::project_settings(&s, &p.id).await;
    settings_editor(&s, &viewer, &p, toml, None, None).await
}

#[derive(Deserialize)]
struct SettingsForm {
    #[serde(default)]
    csrf: String,
    toml: String,
}

async fn save_project_settings(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Form(f): Form<SettingsForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    let p = s.project(&viewer.caller, &project).await?;
    // Browsers send CRLF line ends; the file keeps LF.
    let toml = f.toml.replace("\r\n", "\n");
    match api::save_project_settings(&s, &p.id, toml.clone()).await {
        Ok(_) => Ok(settings_editor(&s, &viewer, &p, toml, None, Some("Saved: new training jobs start from these settings.")).await?.into_response()),
        // Refused: the text stays in the editor, with what is wrong.
        Err(ApiError::BadRequest(e)) => Ok((StatusCode::BAD_REQUEST, settings_editor(&s, &viewer, &p, toml, Some(e), None).await?).into_response()),
        Err(e) => Err(e.into()),
    }
}

async fn settings_editor(s: &AppState, viewer: &Viewer, p: &lathe_store::Project, toml: String, error: Option<String>, saved: Option<&str>) -> WebResult<Html<String>> {
    let resolved = serde_json::to_string_pretty(&api::train_settings(s, &p.id, serde_json::Map::new())?).unwrap_or_default();
    let ctx = minijinja::context! { toml => toml, resolved => resolved, error => error, saved => saved };
    render("project_settings.html", page_ctx(frame(viewer, Some(p), "settings"), ctx))
}

async fn settings(State(s): State<Arc<AppState>>, viewer: Viewer) -> WebResult<Html<String>> {
    settings_page(&s, &viewer, minijinja::context! {}).await
}

/// The settings page; `extra` carries a secret shown once (`created`, `secret`, `for_member`).
async fn settings_page(s: &AppState, viewer: &Viewer, extra: minijinja::Value) -> WebResult<Html<String>> {
    let team = &viewer.caller.team_id;
    let (tokens, members) = (s.db.tokens(team).await?, s.db.members(team).await?);
    let ctx = minijinja::context! {
        tokens => tokens, members => members, roles => lathe_store::ROLES,
        current => viewer.caller.token_id, me => viewer.caller.member_id, manages => viewer.caller.manages_team,
        ..extra
    };
    render("settings.html", page_ctx(frame(viewer, None, "settings"), ctx))
}

#[derive(Deserialize)]
struct NewTokenForm {
    #[serde(default)]
    csrf: String,
    name: String,
}

/// A new token, shown once on the page that answers the form.
async fn create_token(State(s): State<Arc<AppState>>, viewer: Viewer, Form(f): Form<NewTokenForm>) -> WebResult<Html<String>> {
    viewer.check_csrf(&f.csrf)?;
    let (info, secret) = api::new_token(&s, &viewer.caller, f.name.trim()).await?;
    settings_page(&s, &viewer, minijinja::context! { created => info.name, secret => secret.expose() }).await
}

async fn revoke_token(State(s): State<Arc<AppState>>, viewer: Viewer, Path(token): Path<String>, Form(f): Form<CsrfForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    api::revoke(&s, &viewer.caller, &token).await?;
    Ok(see_other("/settings"))
}

#[derive(Deserialize)]
struct MemberForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    role: String,
}

/// A new member; their first token is shown once, to be handed to them.
async fn add_member(State(s): State<Arc<AppState>>, viewer: Viewer, Form(f): Form<MemberForm>) -> WebResult<Html<String>> {
    viewer.check_csrf(&f.csrf)?;
    let (member, secret) = api::add_member(&s, &viewer.caller, f.name.trim(), &f.role).await?;
    let created = format!("{} (first)", member.name);
    settings_page(&s, &viewer, minijinja::context! { created => created, secret => secret.expose(), for_member => member.name }).await
}

async fn set_role(State(s): State<Arc<AppState>>, viewer: Viewer, Path(member): Path<String>, Form(f): Form<MemberForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    viewer.caller.require_team_manager()?;
    s.db.set_member_role(&viewer.caller.team_id, &member, &f.role).await?;
    Ok(see_other("/settings"))
}

async fn remove_member(State(s): State<Arc<AppState>>, viewer: Viewer, Path(member): Path<String>, Form(f): Form<CsrfForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    viewer.caller.require_team_manager()?;
    s.db.remove_member(&viewer.caller.team_id, &member).await?;
    Ok(see_other("/settings"))
}
