//! Eval packs: the catalogue (shipped and uploaded), what each holds and may do, installing
//! one into the project, upgrading with the diff of what changes, and uploading a
//! `.lathepack` to the team's catalogue. The same functions as the API's.

use std::sync::Arc;

use axum::extract::{Multipart, Path, State};
use axum::response::{Html, Response};
use axum::Form;
use serde_json::Value;

use super::data::check_multipart_csrf;
use super::{Fields, Pages, Viewer, WebError, WebResult, field, frame, page_ctx, render, see_other};
use crate::packs;
use crate::state::AppState;

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/projects/{project}/packs", page)
        .post("/projects/{project}/packs", install)
        .post("/projects/{project}/packs/upload", upload)
}

async fn page(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let installed = s.db.project_packs(&p.id).await?;
    let mut catalogue = packs::catalogue_of(&s, &viewer.caller).await?;
    // Each catalogue pack: already installed, an upgrade (with its diff), or new here.
    for c in catalogue.iter_mut() {
        let name = c["name"].as_str().unwrap_or_default().to_string();
        let sha = c["sha256"].as_str().unwrap_or_default().to_string();
        match installed.iter().find(|i| i.name == name) {
            Some(i) if i.sha256 == sha => c["state"] = "installed".into(),
            Some(_) => {
                c["state"] = "upgrade".into();
                c["diff"] = packs::diff(&s, &viewer.caller, &p, &name, &sha).await?;
            }
            None => c["state"] = "new".into(),
        }
    }
    let ctx = minijinja::context! { installed => installed, catalogue => catalogue };
    render("packs.html", page_ctx(frame(&viewer, Some(&p), "packs"), ctx))
}

async fn install(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, Form(f): Form<Fields>) -> WebResult<Response> {
    viewer.check_csrf(field(&f, "csrf").unwrap_or_default())?;
    let p = s.project(&viewer.caller, &project).await?;
    let sha = field(&f, "sha256").ok_or_else(|| WebError::bad("choose a pack to install"))?;
    let out: Value = packs::install(&s, &viewer.caller, &p, sha).await?;
    let name = out["installed"]["name"].as_str().unwrap_or_default();
    Ok(see_other(&format!("/projects/{}/packs#installed-{name}", p.id)))
}

/// A `.lathepack` into the team's catalogue: verified and checked as the API does.
async fn upload(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, mut multipart: Multipart) -> WebResult<Response> {
    let p = s.project(&viewer.caller, &project).await?;
    check_multipart_csrf(&viewer, &mut multipart).await?;
    let field = multipart.next_field().await.map_err(|e| WebError::bad(format!("malformed upload: {e}")))?;
    let Some(field) = field.filter(|f| f.name() == Some("file")) else { return Err(WebError::bad("choose a .lathepack file to upload")) };
    let bytes = field.bytes().await.map_err(|e| WebError::bad(format!("the upload failed: {e}")))?;
    let d = packs::add_to_catalogue(&s, &viewer.caller, bytes.to_vec()).await?;
    Ok(see_other(&format!("/projects/{}/packs#pack-{}", p.id, d["sha256"].as_str().unwrap_or_default())))
}
