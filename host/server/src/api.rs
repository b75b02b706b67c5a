//! The REST API under `/api/v1`: what the CLI does, for teams. Every project-scoped route
//! first resolves the project through the caller's team ([`AppState::project`]), so
//! another team's ids answer 404.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use lathe_data::FieldMapping;
use lathe_jobs::eval::{PluginRef, Suite};
use lathe_jobs::pipeline::Job;
use lathe_jobs::pipeline::data::{CurateSpec, ImportSpec, SplitSpec, StatsSpec};
use lathe_jobs::pipeline::eval::{BaselineSpec, CompareSpec, EvalSpec, ForgettingSpec, RegressionSpec, ReportSpec};
use lathe_jobs::pipeline::train::{ExportFormat, ExportSpec, TrainSpec};
use lathe_jobs::settings::{Layers, TrainSettings};
use lathe_store::{JobRow, Needs, NewFile, NewJob, NewPlugin};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(list_projects, create_project))
        .routes(routes!(get_project))
        .routes(routes!(get_settings, put_settings))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(list_members, create_member))
        .routes(routes!(update_member, remove_member))
        .routes(routes!(create_team))
        .routes(routes!(list_files, upload_file))
        .routes(routes!(get_file))
        .routes(routes!(preview_file))
        .routes(routes!(list_datasets))
        .routes(routes!(get_dataset))
        .routes(routes!(dataset_examples))
        .routes(routes!(list_plugins, upload_plugin))
        .routes(routes!(get_plugin))
        .routes(routes!(try_plugin))
        .routes(routes!(list_suites))
        .routes(routes!(get_suite, put_suite))
        .routes(routes!(list_workers))
        .routes(routes!(list_jobs, submit_job))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(retry_job))
        .routes(routes!(job_events))
        .routes(routes!(job_event_stream))
        .routes(routes!(get_run))
        .routes(routes!(job_artifact))
}

/// Counts requests for `/metrics`.
pub async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    next.run(req).await
}

/// Prometheus text: requests served, jobs by state, queue wait and job durations.
pub async fn metrics(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let mut out = String::new();
    out.push_str("# HELP lathe_http_requests_total HTTP requests served.\n# TYPE lathe_http_requests_total counter\n");
    out.push_str(&format!("lathe_http_requests_total {}\n", state.requests.load(Ordering::Relaxed)));
    out.push_str("# HELP lathe_jobs Jobs by state.\n# TYPE lathe_jobs gauge\n");
    for (s, n) in state.db.job_counts().await? {
        out.push_str(&format!("lathe_jobs{{state=\"{s}\"}} {n}\n"));
    }
    let timing = state.db.job_timing().await?;
    out.push_str("# HELP lathe_job_queue_wait_seconds Time from submission to start, over started jobs.\n# TYPE lathe_job_queue_wait_seconds summary\n");
    out.push_str(&format!("lathe_job_queue_wait_seconds_sum {}\nlathe_job_queue_wait_seconds_count {}\n", timing.wait_ms_sum as f64 / 1e3, timing.started));
    out.push_str("# HELP lathe_job_duration_seconds Time from start to finish, over finished jobs.\n# TYPE lathe_job_duration_seconds summary\n");
    out.push_str(&format!("lathe_job_duration_seconds_sum {}\nlathe_job_duration_seconds_count {}\n", timing.run_ms_sum as f64 / 1e3, timing.finished));
    out.push_str(&state.serving.metrics().await);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

// ---- projects, teams, tokens ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// The caller's team's projects.
#[utoipa::path(get, path = "/api/v1/projects", responses((status = 200, description = "projects")))]
async fn list_projects(State(s): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"data": s.db.projects(&caller.team_id).await?})))
}

#[utoipa::path(post, path = "/api/v1/projects", request_body = NewProject, responses((status = 201, description = "the project")))]
async fn create_project(State(s): State<Arc<AppState>>, caller: Caller, Json(p): Json<NewProject>) -> ApiResult<(StatusCode, Json<Value>)> {
    check_name(&p.name, "project name")?;
    let project = s.db.create_project(&caller.team_id, &p.name, &p.description).await?;
    Ok((StatusCode::CREATED, Json(json!(project))))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}", params(("project" = String, Path)), responses((status = 200, description = "the project"), (status = 404, description = "no such project in the caller's team")))]
async fn get_project(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(s.project(&caller, &project).await?)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
}

/// The team's tokens: id, name, created, last used, revoked; never the secret.
#[utoipa::path(get, path = "/api/v1/tokens", responses((status = 200, description = "tokens")))]
async fn list_tokens(State(s): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"data": s.db.tokens(&caller.team_id).await?})))
}

/// A new token for the caller's team, held by the caller's member (a team token makes a
/// team token); the response is the only time its secret is shown.
#[utoipa::path(post, path = "/api/v1/tokens", request_body = NewToken, responses((status = 201, description = "the token, with its secret shown once")))]
async fn create_token(State(s): State<Arc<AppState>>, caller: Caller, Json(t): Json<NewToken>) -> ApiResult<(StatusCode, Json<Value>)> {
    let (info, secret) = new_token(&s, &caller, &t.name).await?;
    Ok((StatusCode::CREATED, Json(json!({"token": secret.expose(), "info": info}))))
}

/// A new token held by the caller's member (or the team, for a team token).
pub async fn new_token(s: &AppState, caller: &Caller, name: &str) -> ApiResult<(lathe_store::TokenInfo, lathe_store::Secret)> {
    check_name(name, "token name")?;
    Ok(s.db.create_token(&caller.team_id, caller.member_id.as_deref(), name, false).await?)
}

/// Revokes a token: owners and team tokens may revoke any of the team's tokens, a member
/// only their own.
#[utoipa::path(delete, path = "/api/v1/tokens/{token}", params(("token" = String, Path)), responses((status = 204, description = "revoked"), (status = 403, description = "another member's token, and the caller is not an owner")))]
async fn revoke_token(State(s): State<Arc<AppState>>, caller: Caller, Path(token): Path<String>) -> ApiResult<StatusCode> {
    revoke(&s, &caller, &token).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn revoke(s: &AppState, caller: &Caller, token_id: &str) -> ApiResult<()> {
    let token = s.db.token(&caller.team_id, token_id).await?;
    let own = token.member_id.is_some() && token.member_id == caller.member_id;
    if !own && token.id != caller.token_id {
        caller.require_team_manager()?;
    }
    s.db.revoke_token(&caller.team_id, token_id).await?;
    Ok(())
}

/// The team's members, removed ones included (with `removed_at`).
#[utoipa::path(get, path = "/api/v1/members", responses((status = 200, description = "members")))]
async fn list_members(State(s): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"data": s.db.members(&caller.team_id).await?})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    pub name: String,
    /// `owner` or `member` (the default).
    #[serde(default = "default_role")]
    pub role: String,
}

fn default_role() -> String {
    lathe_store::MEMBER.to_string()
}

/// Adds a member (owners and team tokens only) and returns their first token, shown once:
/// it is how they sign in.
#[utoipa::path(post, path = "/api/v1/members", request_body = NewMember, responses((status = 201, description = "the member and their first token"), (status = 403, description = "the caller is not an owner"), (status = 409, description = "an active member has that name")))]
async fn create_member(State(s): State<Arc<AppState>>, caller: Caller, Json(m): Json<NewMember>) -> ApiResult<(StatusCode, Json<Value>)> {
    let (member, secret) = add_member(&s, &caller, &m.name, &m.role).await?;
    Ok((StatusCode::CREATED, Json(json!({"member": member, "token": secret.expose()}))))
}

pub async fn add_member(s: &AppState, caller: &Caller, name: &str, role: &str) -> ApiResult<(lathe_store::Member, lathe_store::Secret)> {
    caller.require_team_manager()?;
    check_name(name, "member name")?;
    let member = s.db.create_member(&caller.team_id, name, role).await?;
    let (_, secret) = s.db.create_token(&caller.team_id, Some(&member.id), &format!("{name} (first)"), false).await?;
    Ok((member, secret))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberUpdate {
    /// `owner` or `member`.
    pub role: String,
}

/// Changes a member's role (owners and team tokens only); a team keeps at least one owner.
#[utoipa::path(patch, path = "/api/v1/members/{member}", params(("member" = String, Path)), request_body = MemberUpdate, responses((status = 200, description = "the member"), (status = 403, description = "the caller is not an owner"), (status = 409, description = "the team's last owner")))]
async fn update_member(State(s): State<Arc<AppState>>, caller: Caller, Path(member): Path<String>, Json(u): Json<MemberUpdate>) -> ApiResult<Json<Value>> {
    caller.require_team_manager()?;
    Ok(Json(json!(s.db.set_member_role(&caller.team_id, &member, &u.role).await?)))
}

/// Removes a member (owners and team tokens only) and revokes their tokens, which signs
/// their browsers out; a team keeps at least one owner.
#[utoipa::path(delete, path = "/api/v1/members/{member}", params(("member" = String, Path)), responses((status = 204, description = "removed"), (status = 403, description = "the caller is not an owner"), (status = 409, description = "the team's last owner")))]
async fn remove_member(State(s): State<Arc<AppState>>, caller: Caller, Path(member): Path<String>) -> ApiResult<StatusCode> {
    caller.require_team_manager()?;
    s.db.remove_member(&caller.team_id, &member).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    pub name: String,
}

/// A new team and its first token, a team token (admin tokens only).
#[utoipa::path(post, path = "/api/v1/teams", request_body = NewTeam, responses((status = 201, description = "the team and its first token")))]
async fn create_team(State(s): State<Arc<AppState>>, caller: Caller, Json(t): Json<NewTeam>) -> ApiResult<(StatusCode, Json<Value>)> {
    if !caller.admin {
        return Err(ApiError::NotFound("no such route for this token".into()));
    }
    check_name(&t.name, "team name")?;
    let team = s.db.create_team(&t.name).await?;
    let (_, secret) = s.db.create_token(&team.id, None, "first", false).await?;
    Ok((StatusCode::CREATED, Json(json!({"team": team, "token": secret.expose()}))))
}

pub(crate) fn check_name(name: &str, what: &str) -> ApiResult<()> {
    let ok = !name.is_empty() && name.len() <= 100 && name.chars().all(|c| c.is_alphanumeric() || "-_. ".contains(c));
    if ok { Ok(()) } else { Err(ApiError::bad(format!("{what} `{name}`: 1–100 letters, digits, spaces, `-`, `_` or `.`"))) }
}

// ---- files ----

#[utoipa::path(get, path = "/api/v1/projects/{project}/files", params(("project" = String, Path)), responses((status = 200, description = "files")))]
async fn list_files(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!({"data": s.db.files(&p.id).await?})))
}

/// Upload a file (multipart field `file`, optional field `purpose`), streamed to the
/// artifact store and kept by sha256.
#[utoipa::path(post, path = "/api/v1/projects/{project}/files", params(("project" = String, Path)), responses((status = 201, description = "the file"), (status = 413, description = "too large")))]
async fn upload_file(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>, multipart: Multipart) -> ApiResult<(StatusCode, Json<Value>)> {
    let p = s.project(&caller, &project).await?;
    let file = receive_file(&s, &p.id, multipart, "fine-tune").await?;
    Ok((StatusCode::CREATED, Json(json!(file))))
}

/// Reads a multipart upload (`file`, `purpose`) into the artifact store and records it.
pub async fn receive_file(s: &AppState, project_id: &str, mut multipart: Multipart, default_purpose: &str) -> ApiResult<lathe_store::FileRow> {
    check_file_count(s, project_id).await?;
    let mut purpose = default_purpose.to_string();
    let mut stored: Option<StoredUpload> = None;
    while let Some(field) = multipart.next_field().await.map_err(|e| upload_error(e, s.config.max_upload_bytes))? {
        match field.name() {
            Some("purpose") => purpose = field.text().await.map_err(|e| ApiError::bad(format!("purpose: {e}")))?,
            Some("file") => stored = Some(store_upload(s, field).await?),
            Some(other) => return Err(ApiError::bad(format!("unexpected multipart field `{other}`; send `file` and `purpose`"))),
            None => return Err(ApiError::bad("a multipart field without a name")),
        }
    }
    let upload = stored.ok_or_else(|| ApiError::bad("no `file` field in the upload"))?;
    record_upload(s, project_id, upload, purpose).await
}

/// Reads one multipart `file` field into the artifact store and records it in the project.
pub async fn receive_field(s: &AppState, project_id: &str, field: axum::extract::multipart::Field<'_>, purpose: &str) -> ApiResult<lathe_store::FileRow> {
    check_file_count(s, project_id).await?;
    let upload = store_upload(s, field).await?;
    record_upload(s, project_id, upload, purpose.to_string()).await
}

async fn check_file_count(s: &AppState, project_id: &str) -> ApiResult<()> {
    if s.db.files(project_id).await?.len() >= s.config.max_files_per_project {
        return Err(ApiError::bad(format!("this project holds {} files, the most allowed; delete some first", s.config.max_files_per_project)));
    }
    Ok(())
}

/// An upload in the artifact store, not yet recorded in a project.
struct StoredUpload {
    filename: String,
    sha256: String,
    bytes: u64,
}

/// Streams a multipart field to a temporary file under the size limit, then into the
/// artifact store (whole or not at all).
async fn store_upload(s: &AppState, mut field: axum::extract::multipart::Field<'_>) -> ApiResult<StoredUpload> {
    // The user's name is kept as metadata only; the bytes land under their sha256.
    let filename = field.file_name().unwrap_or("upload").chars().filter(|c| !c.is_control()).take(255).collect::<String>();
    let tmp_dir = s.config.data_dir.join("tmp");
    tokio::fs::create_dir_all(&tmp_dir).await?;
    let tmp = tmp_dir.join(lathe_util::temp_name(std::path::Path::new("upload")));
    let mut out = tokio::fs::File::create(&tmp).await?;
    let mut size = 0u64;
    let result: ApiResult<()> = async {
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = field.chunk().await.map_err(|e| upload_error(e, s.config.max_upload_bytes))? {
            size += chunk.len() as u64;
            if size > s.config.max_upload_bytes as u64 {
                return Err(ApiError::TooLarge(format!("the upload is larger than {} bytes", s.config.max_upload_bytes)));
            }
            out.write_all(&chunk).await?;
        }
        out.sync_all().await?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let artifacts = s.artifacts.clone();
    let t = tmp.clone();
    let put = tokio::task::spawn_blocking(move || artifacts.put_file(&t)).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    let _ = tokio::fs::remove_file(&tmp).await;
    Ok(StoredUpload { filename, sha256: put?.0, bytes: size })
}

async fn record_upload(s: &AppState, project_id: &str, u: StoredUpload, purpose: String) -> ApiResult<lathe_store::FileRow> {
    Ok(s.db.add_file(project_id, NewFile { filename: u.filename, purpose, bytes: u.bytes as i64, sha256: u.sha256 }).await?)
}

/// A multipart error: over the size limit (the body limit cuts the stream, which the
/// parser may report as either) or malformed.
fn upload_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    let too_large = e.status() == StatusCode::PAYLOAD_TOO_LARGE || std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit"));
    if too_large {
        ApiError::TooLarge(format!("the upload is larger than the limit of {limit} bytes"))
    } else {
        ApiError::bad(format!("malformed multipart upload: {e}"))
    }
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/files/{file}", params(("project" = String, Path), ("file" = String, Path)), responses((status = 200, description = "the file")))]
async fn get_file(State(s): State<Arc<AppState>>, caller: Caller, Path((project, file)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!(s.db.file(&p.id, &file).await?)))
}

/// The first records of an uploaded file and what an import would detect: the format, or
/// for CSV/Parquet the columns and a suggested mapping.
#[utoipa::path(get, path = "/api/v1/projects/{project}/files/{file}/preview", params(("project" = String, Path), ("file" = String, Path)), responses((status = 200, description = "format, columns, suggested mapping, first records")))]
async fn preview_file(State(s): State<Arc<AppState>>, caller: Caller, Path((project, file)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let f = s.db.file(&p.id, &file).await?;
    Ok(Json(json!(file_preview(&s, &f).await?)))
}

/// Reads the first records of an uploaded file (by its name's extension).
pub async fn file_preview(s: &AppState, f: &lathe_store::FileRow) -> ApiResult<lathe_data::Preview> {
    let path = s.artifact_path(&f.sha256).await?;
    let name = f.filename.clone();
    tokio::task::spawn_blocking(move || {
        let kind = lathe_data::SourceKind::from_path(std::path::Path::new(&name));
        lathe_data::preview(&path, &name, Some(kind), 5).map_err(|e| ApiError::bad(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

// ---- datasets ----

#[utoipa::path(get, path = "/api/v1/projects/{project}/datasets", params(("project" = String, Path)), responses((status = 200, description = "dataset versions and their names")))]
async fn list_datasets(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!({"data": dataset_versions(&s, &p.id).await?})))
}

/// A project's dataset versions, oldest first, each with its manifest and the names that
/// point at it.
pub async fn dataset_versions(s: &AppState, project_id: &str) -> ApiResult<Vec<Value>> {
    let store = s.env(project_id).await?.datasets()?;
    let refs = store.refs().map_err(lathe_jobs::JobError::from)?;
    let versions = store.versions().map_err(lathe_jobs::JobError::from)?;
    let data: Vec<Value> = versions
        .iter()
        .map(|m| {
            let names: Vec<&String> = refs.iter().filter(|(_, v)| **v == m.id).map(|(k, _)| k).collect();
            json!({"manifest": m, "names": names})
        })
        .collect();
    Ok(data)
}

/// A version's manifest and lineage (by id or name).
#[utoipa::path(get, path = "/api/v1/projects/{project}/datasets/{version}", params(("project" = String, Path), ("version" = String, Path)), responses((status = 200, description = "manifest and lineage")))]
async fn get_dataset(State(s): State<Arc<AppState>>, caller: Caller, Path((project, version)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let store = s.env(&p.id).await?.datasets()?;
    let id = store.resolve(&version).map_err(lathe_jobs::JobError::from)?;
    let lineage = store.lineage(&id).map_err(lathe_jobs::JobError::from)?;
    Ok(Json(json!({"manifest": store.manifest(&id).map_err(lathe_jobs::JobError::from)?, "lineage": lineage})))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct Page {
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    20
}

/// Examples of a version, `offset`/`limit` (at most 200).
#[utoipa::path(get, path = "/api/v1/projects/{project}/datasets/{version}/examples", params(("project" = String, Path), ("version" = String, Path), Page), responses((status = 200, description = "examples")))]
async fn dataset_examples(State(s): State<Arc<AppState>>, caller: Caller, Path((project, version)): Path<(String, String)>, Query(page): Query<Page>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let store = s.env(&p.id).await?.datasets()?;
    let id = store.resolve(&version).map_err(lathe_jobs::JobError::from)?;
    let examples = store.examples(&id).map_err(lathe_jobs::JobError::from)?;
    let data = examples
        .skip(page.offset)
        .take(page.limit.min(200))
        .map(|e| e.map(|e| serde_json::from_str::<Value>(&e.to_canonical()).unwrap_or(Value::Null)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(lathe_jobs::JobError::from)?;
    Ok(Json(json!({"version": id, "offset": page.offset, "data": data})))
}

// ---- plugins ----

#[utoipa::path(get, path = "/api/v1/projects/{project}/plugins", params(("project" = String, Path)), responses((status = 200, description = "the project's plugins")))]
async fn list_plugins(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!({"data": s.db.plugins(&p.id).await?})))
}

/// Upload a plugin component (the request body is the `.wasm`). It goes through exactly
/// the checks `lathe plugin inspect` runs; a refusal says why, as the sandbox does.
#[utoipa::path(post, path = "/api/v1/projects/{project}/plugins", params(("project" = String, Path)), responses((status = 201, description = "the plugin"), (status = 400, description = "refused, with the sandbox's reason")))]
async fn upload_plugin(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>, body: axum::body::Bytes) -> ApiResult<(StatusCode, Json<Value>)> {
    let p = s.project(&caller, &project).await?;
    let (row, info) = store_plugin(&s, &p.id, body).await?;
    Ok((StatusCode::CREATED, Json(json!({"plugin": row, "info": info}))))
}

/// Checks a plugin component exactly as `lathe plugin inspect` does and, once accepted,
/// stores it by sha256 and records it in the project. Returns the row and the description
/// `lathe plugin inspect` prints.
pub async fn store_plugin(s: &AppState, project_id: &str, body: axum::body::Bytes) -> ApiResult<(lathe_store::PluginRow, Value)> {
    let env = s.env(project_id).await?;
    let artifacts = s.artifacts.clone();
    // Checked first, stored only once accepted; the artifact store names it by sha256.
    let (info, sha) = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        let plugin = env.runtime()?.load(&body).map_err(|e| ApiError::bad(format!("plugin refused: {e}")))?;
        Ok((plugin.info().clone(), artifacts.put_bytes(&body)?))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let row = s
        .db
        .add_plugin(
            project_id,
            NewPlugin {
                name: info.name.clone(),
                kind: info.kind.name().to_string(),
                version: info.version.clone(),
                sha256: sha,
                size: info.size_bytes as i64,
                config_schema: info.config_schema.clone(),
            },
        )
        .await?;
    Ok((row, lathe_jobs::plugins::describe(&info)))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/plugins/{plugin}", params(("project" = String, Path), ("plugin" = String, Path)), responses((status = 200, description = "the plugin")))]
async fn get_plugin(State(s): State<Arc<AppState>>, caller: Caller, Path((project, plugin)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!(s.db.plugin(&p.id, &plugin).await?)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrySample {
    #[serde(default = "empty_object")]
    pub config: Value,
    pub input: Value,
}

fn empty_object() -> Value {
    json!({})
}

/// Runs a plugin (the project's or a built-in) on a sample.
#[utoipa::path(post, path = "/api/v1/projects/{project}/plugins/{plugin}/try", params(("project" = String, Path), ("plugin" = String, Path)), request_body = TrySample, responses((status = 200, description = "what the plugin returned")))]
async fn try_plugin(State(s): State<Arc<AppState>>, caller: Caller, Path((project, plugin)): Path<(String, String)>, Json(t): Json<TrySample>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let env = s.env(&p.id).await?;
    let out = tokio::task::spawn_blocking(move || -> ApiResult<Value> {
        let pl = env.load_plugin(&plugin)?;
        Ok(lathe_jobs::plugins::try_on(&pl, &t.config.to_string(), &t.input)?)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(out))
}

// ---- eval suites ----

#[utoipa::path(get, path = "/api/v1/projects/{project}/suites", params(("project" = String, Path)), responses((status = 200, description = "the project's suites (latest versions)")))]
async fn list_suites(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!({"data": s.db.suites(&p.id).await?})))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/suites/{suite}", params(("project" = String, Path), ("suite" = String, Path)), responses((status = 200, description = "the suite")))]
async fn get_suite(State(s): State<Arc<AppState>>, caller: Caller, Path((project, suite)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!(s.db.suite(&p.id, &suite).await?)))
}

/// Saves a new version of a suite, checked against the project's plugins: kinds, and a
/// gate on a metric they produce.
#[utoipa::path(put, path = "/api/v1/projects/{project}/suites/{suite}", params(("project" = String, Path), ("suite" = String, Path)), responses((status = 200, description = "the saved suite"), (status = 400, description = "what is wrong with it")))]
async fn put_suite(State(s): State<Arc<AppState>>, caller: Caller, Path((project, name)): Path<(String, String)>, Json(body): Json<Value>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!(save_suite(&s, &p.id, &name, body).await?)))
}

/// Saves a new version of a suite after the checks a run would make: it parses, its name
/// matches, its plugins load with the right kinds, and its gate names a metric they produce.
pub async fn save_suite(s: &AppState, project_id: &str, name: &str, body: Value) -> ApiResult<lathe_store::SuiteRow> {
    let suite = Suite::from_json(&body.to_string())?;
    if suite.name != name {
        return Err(ApiError::bad(format!("the suite's name is `{}` but the URL names `{name}`", suite.name)));
    }
    check_suite_for_server(&suite)?;
    let env = s.env(project_id).await?;
    let checked = suite.clone();
    tokio::task::spawn_blocking(move || lathe_jobs::eval::Plugins::load(&env, &checked))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(s.db.put_suite(project_id, name, body).await?)
}

/// What the server refuses that the CLI allows: a judge model named by a path.
pub(crate) fn check_suite_for_server(suite: &Suite) -> ApiResult<()> {
    if let Some(j) = &suite.judge
        && matches!(j.model, lathe_jobs::eval::judge::JudgeModel::Local { .. })
    {
        return Err(ApiError::bad("a judge on a local model path is not accepted by the server; use an OpenAI-compatible endpoint"));
    }
    Ok(())
}

async fn load_suite(s: &AppState, project_id: &str, name: &str) -> ApiResult<Suite> {
    let row = s.db.suite(project_id, name).await.map_err(|_| ApiError::bad(format!("the project has no eval suite `{name}`; create it first (PUT /api/v1/projects/{project_id}/suites/{name})")))?;
    Ok(Suite::from_json(&row.definition.to_string())?)
}

// ---- jobs ----

/// What a client may ask for: the pipelines, with ids where the CLI takes paths (files,
/// models by name, training jobs), so that nothing a user sends reaches the filesystem.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobRequest {
    DataImport {
        file_id: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        mapping: Option<FieldMapping>,
        #[serde(default)]
        formatter: Option<PluginRef>,
    },
    DataCurate(CurateSpec),
    DataSplit(SplitSpec),
    DataStats {
        version: String,
        #[serde(default)]
        model: Option<String>,
    },
    EvalBaseline {
        model: String,
        suite: String,
        data: String,
        train: String,
        #[serde(default)]
        limit: Option<usize>,
    },
    EvalRun {
        /// A configured base model (with `adapter_job`, the one it was trained on).
        #[serde(default)]
        model: Option<String>,
        /// A succeeded training job whose adapter to evaluate.
        #[serde(default)]
        adapter_job: Option<String>,
        /// A succeeded export job whose merged weights (int8 `gguf-q8_0`, int4
        /// `gguf-q4_1`, ...) to evaluate, instead of `model`: the gate a quantized variant
        /// must pass before it is deployed.
        #[serde(default)]
        export_job: Option<String>,
        suite: String,
        data: String,
        #[serde(default)]
        template: Option<String>,
        #[serde(default)]
        shots: usize,
        #[serde(default)]
        train: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
    EvalCompare {
        baseline: String,
        candidate: String,
        #[serde(default)]
        metric: Option<String>,
        #[serde(default)]
        margin: f64,
    },
    EvalReport {
        baseline: String,
        candidate: String,
        #[serde(default)]
        margin: f64,
        /// Also run the regression pack on the candidate's model and adapter (`{}` for its
        /// defaults): the report then carries the forgetting verdict.
        #[serde(default)]
        forgetting: Option<ForgettingSpec>,
        /// Runs of the candidate's exports (its int8 and int4 variants) on the same items:
        /// the report shows what each step costs.
        #[serde(default)]
        variants: Vec<String>,
    },
    /// The regression pack (general ability) on the base model and a trained adapter: did
    /// the fine-tune forget?
    EvalRegression {
        model: String,
        adapter_job: String,
        #[serde(default)]
        arithmetic: Option<usize>,
        #[serde(default)]
        margin: f64,
    },
    Train {
        model: String,
        suite: String,
        data: String,
        #[serde(default)]
        template: Option<String>,
        /// Overrides of the project's training settings (`rank`, `learning_rate`, …).
        #[serde(default)]
        settings: serde_json::Map<String, Value>,
    },
    Export {
        train_job: String,
        format: ExportFormat,
    },
}

/// A run id: hex, as the harness makes them (never a path).
fn run_id(id: &str) -> ApiResult<String> {
    if !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id.to_string())
    } else {
        Err(ApiError::bad(format!("`{id}` is not an eval run id")))
    }
}

/// The adapter folder a succeeded training job wrote.
async fn trained_adapter(s: &AppState, project_id: &str, job_id: &str) -> ApiResult<std::path::PathBuf> {
    let job = s.db.job(project_id, job_id).await?;
    if job.kind != "train" || job.state.as_str() != "succeeded" {
        return Err(ApiError::bad(format!("job `{job_id}` is not a succeeded training job")));
    }
    let dir = job.outcome.as_ref().and_then(|o| o["adapter_dir"].as_str()).ok_or_else(|| ApiError::Internal(format!("job {job_id} has no adapter_dir")))?;
    Ok(dir.into())
}

/// The merged weights a succeeded export job wrote (not a `peft` copy of the adapter).
async fn merged_export(s: &AppState, project_id: &str, job_id: &str) -> ApiResult<std::path::PathBuf> {
    let job = s.db.job(project_id, job_id).await?;
    match crate::deployments::Servable::of(s, &job) {
        Some(crate::deployments::Servable::Merged { path, .. }) => Ok(path),
        _ => Err(ApiError::bad(format!("job `{job_id}` is not a succeeded export job of a merged model (format gguf-q8_0, gguf-q4_1, gguf-q4_k_m, gguf-f16 or hf)"))),
    }
}

impl JobRequest {
    /// The pipeline job this request asks for; `job_id` names its output folders.
    pub async fn into_job(self, s: &AppState, project_id: &str, job_id: &str) -> ApiResult<Job> {
        let model = |name: &str| s.model(name).map(|p| p.to_path_buf());
        Ok(match self {
            JobRequest::DataImport { file_id, name, mapping, formatter } => {
                let f = s.db.file(project_id, &file_id).await?;
                Job::DataImport(ImportSpec { file: s.artifact_path(&f.sha256).await?, source_name: Some(f.filename), name, mapping, formatter })
            }
            JobRequest::DataCurate(spec) => Job::DataCurate(spec),
            JobRequest::DataSplit(spec) => Job::DataSplit(spec),
            JobRequest::DataStats { version, model: m } => Job::DataStats(StatsSpec { version, model: m.as_deref().map(model).transpose()? }),
            JobRequest::EvalBaseline { model: m, suite, data, train, limit } => {
                Job::EvalBaseline(BaselineSpec { model: model(&m)?, suite: load_suite(s, project_id, &suite).await?, data, train, limit })
            }
            JobRequest::EvalRun { model: m, adapter_job, export_job, suite, data, template, shots, train, limit } => {
                let (model, adapter) = match (m, adapter_job, export_job) {
                    (Some(m), None, None) => (model(&m)?, None),
                    (Some(m), Some(j), None) => (model(&m)?, Some(trained_adapter(s, project_id, &j).await?)),
                    (None, None, Some(j)) => (merged_export(s, project_id, &j).await?, None),
                    _ => return Err(ApiError::bad("give `model` (with `adapter_job` for a trained adapter) or `export_job` (a merged export) alone")),
                };
                Job::EvalRun(EvalSpec { model, adapter, suite: load_suite(s, project_id, &suite).await?, data, template, shots, train, limit })
            }
            JobRequest::EvalCompare { baseline, candidate, metric, margin } => {
                Job::EvalCompare(CompareSpec { baseline: run_id(&baseline)?, candidate: run_id(&candidate)?, metric, margin })
            }
            JobRequest::EvalReport { baseline, candidate, margin, forgetting, variants } => Job::EvalReport(ReportSpec {
                baseline: run_id(&baseline)?,
                candidate: run_id(&candidate)?,
                margin,
                out: None,
                forgetting,
                variants: variants.iter().map(|v| run_id(v)).collect::<ApiResult<_>>()?,
            }),
            JobRequest::EvalRegression { model: m, adapter_job, arithmetic, margin } => Job::EvalRegression(RegressionSpec {
                model: model(&m)?,
                adapter: trained_adapter(s, project_id, &adapter_job).await?,
                arithmetic: arithmetic.unwrap_or(20),
                margin,
            }),
            JobRequest::Train { model: m, suite, data, template, settings } => Job::Train(TrainSpec {
                model: model(&m)?,
                suite: load_suite(s, project_id, &suite).await?,
                data,
                template,
                out: Some(s.project_dir(project_id).join("runs").join(job_id)),
                settings: train_settings(s, project_id, settings)?,
                // A job claimed again after its worker died continues from its checkpoint.
                resume: true,
            }),
            JobRequest::Export { train_job, format } => {
                let job = s.db.job(project_id, &train_job).await?;
                let spec: TrainSpec = serde_json::from_value(job.spec.clone()).map_err(|e| ApiError::Internal(e.to_string()))?;
                let ext = if matches!(format, ExportFormat::Peft | ExportFormat::Hf) { "" } else { ".gguf" };
                Job::Export(ExportSpec {
                    model: spec.model,
                    adapter: trained_adapter(s, project_id, &train_job).await?,
                    format,
                    out: s.project_dir(project_id).join("exports").join(format!("{job_id}{ext}")),
                })
            }
        })
    }
}

/// The project's training settings: defaults, the project's `lathe.toml` ([`put_settings`]),
/// `LATHE_TRAIN_*` of the server's environment, then the request's fields.
pub fn train_settings(s: &AppState, project_id: &str, overrides: serde_json::Map<String, Value>) -> ApiResult<TrainSettings> {
    Ok(Layers::from_process(Some(&project_settings_path(s, project_id)))?.with_overrides(overrides).resolve("train")?)
}

fn project_settings_path(s: &AppState, project_id: &str) -> std::path::PathBuf {
    s.project_dir(project_id).join("lathe.toml")
}

/// The project's settings file (TOML, `[train]`) and the training settings it resolves to.
#[utoipa::path(get, path = "/api/v1/projects/{project}/settings", params(("project" = String, Path)), responses((status = 200, description = "the TOML and the resolved training settings")))]
async fn get_settings(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let toml = project_settings(&s, &p.id).await;
    Ok(Json(json!({"toml": toml, "train": train_settings(&s, &p.id, serde_json::Map::new())?})))
}

/// Replaces the project's settings file (the request body is TOML with a `[train]` table):
/// the defaults every training job of the project starts from, below the server's
/// environment and the job's own fields. Checked before it is written: an unknown key or a
/// wrong type is refused with its name.
#[utoipa::path(put, path = "/api/v1/projects/{project}/settings", params(("project" = String, Path)), responses((status = 200, description = "the resolved training settings"), (status = 400, description = "what is wrong with the TOML")))]
async fn put_settings(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>, body: String) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let train = save_project_settings(&s, &p.id, body).await?;
    Ok(Json(json!({"train": train})))
}

/// The project's settings file as written (empty when there is none).
pub async fn project_settings(s: &AppState, project_id: &str) -> String {
    tokio::fs::read_to_string(project_settings_path(s, project_id)).await.unwrap_or_default()
}

/// Checks a settings file and, if it resolves, writes it; returns the training settings
/// it resolves to.
pub async fn save_project_settings(s: &AppState, project_id: &str, toml: String) -> ApiResult<TrainSettings> {
    let checked = Layers { toml: Some(("lathe.toml".into(), toml.clone())), ..Layers::default() };
    checked.resolve::<TrainSettings>("train")?;
    let path = project_settings_path(s, project_id);
    let dir = s.project_dir(project_id);
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        lathe_util::write_atomic(&path, toml.as_bytes())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    train_settings(s, project_id, serde_json::Map::new())
}

/// Queues a pipeline job in a project; its id is chosen first so that output folders can
/// be named after it.
pub async fn enqueue(s: &AppState, project_id: &str, request: JobRequest, needs: Needs, priority: i32) -> ApiResult<JobRow> {
    let job_id = lathe_store::new_job_id();
    let job = request.into_job(s, project_id, &job_id).await?;
    enqueue_job(s, project_id, job_id, &job, needs, priority, 3).await
}

/// Queues a pipeline job as the store keeps it: its kind, its spec as JSON, and what it
/// needs of the worker that runs it.
pub async fn enqueue_job(s: &AppState, project_id: &str, job_id: String, job: &Job, needs: Needs, priority: i32, max_attempts: i32) -> ApiResult<JobRow> {
    let spec = serde_json::to_value(job).map_err(|e| ApiError::Internal(e.to_string()))?;
    // The plugins it will run with are the ones there are now, whatever is uploaded later.
    let plugins = s.plugin_pins(project_id).await?;
    let new = NewJob { id: Some(job_id), project_id: project_id.into(), kind: job.kind().into(), spec: spec["spec"].clone(), priority, max_attempts, plugins, needs };
    Ok(s.db.enqueue(new).await?)
}

/// How long after its last announcement a worker is still listed: it announces with every
/// heartbeat (a quarter of the lease) and every look for work (at most 2 s apart).
fn worker_listed_for(lease: std::time::Duration) -> i64 {
    (lease.as_millis() as i64).max(10_000) * 2
}

/// The workers sharing this server's database, as each last announced itself (device kind,
/// memory, the job kinds it claims), with the caller's team's jobs each one runs; another
/// team's jobs are only counted.
#[utoipa::path(get, path = "/api/v1/workers", responses((status = 200, description = "the workers seen lately")))]
async fn list_workers(State(s): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"data": workers(&s, &caller).await?})))
}

/// The workers seen lately, each with the caller's team's jobs it runs.
pub async fn workers(s: &AppState, caller: &Caller) -> ApiResult<Vec<Value>> {
    let since = lathe_store::now_ms() - worker_listed_for(s.config.lease);
    let ours: std::collections::HashSet<String> = s.db.projects(&caller.team_id).await?.into_iter().map(|p| p.id).collect();
    let mut out = Vec::new();
    for w in s.db.workers(since).await? {
        let mut running = Vec::new();
        let mut others = 0;
        for id in &w.running {
            match s.db.job_any(id).await {
                Ok(job) if ours.contains(&job.project_id) => running.push(json!({"id": job.id, "project_id": job.project_id, "kind": job.kind, "started_at": job.started_at})),
                _ => others += 1,
            }
        }
        out.push(json!({
            "id": w.id, "host": w.host, "device": w.device, "memory_mb": w.memory_mb, "kinds": w.kinds,
            "started_at": w.started_at, "seen_at": w.seen_at, "running": running, "running_for_other_teams": others,
        }));
    }
    Ok(out)
}

/// A request's `needs` field (absent or null: none), read and checked.
pub fn needs_from(value: Option<Value>) -> ApiResult<Needs> {
    let needs: Needs = match value.unwrap_or(Value::Null) {
        Value::Null => Needs::default(),
        v => serde_json::from_value(v).map_err(|e| ApiError::bad(format!("job request: needs: {e}")))?,
    };
    check_needs(&needs)?;
    Ok(needs)
}

/// A job's needs as a worker could meet them: a device kind Lathe knows, memory ≥ 0.
fn check_needs(needs: &Needs) -> ApiResult<()> {
    if let Some(d) = &needs.device
        && !DEVICE_KINDS.contains(&d.as_str())
    {
        return Err(ApiError::bad(format!("job request: needs.device `{d}`: expected one of {}", DEVICE_KINDS.join(", "))));
    }
    if needs.memory_mb < 0 {
        return Err(ApiError::bad(format!("job request: needs.memory_mb is {}; give 0 (or leave it out) for any", needs.memory_mb)));
    }
    Ok(())
}

/// The device kinds a worker can announce (`--device cuda:1` is kind `cuda`).
pub const DEVICE_KINDS: [&str; 3] = ["cpu", "cuda", "wgpu"];

#[derive(Deserialize, utoipa::IntoParams)]
struct JobPage {
    /// Only jobs of this kind (`train`, `eval_baseline`, …).
    kind: Option<String>,
    after: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/jobs", params(("project" = String, Path), JobPage), responses((status = 200, description = "jobs, newest first")))]
async fn list_jobs(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>, Query(page): Query<JobPage>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let limit = page.limit.clamp(1, 100) as i64;
    let rows = s.db.jobs(&p.id, page.kind.as_deref(), page.after.as_deref(), limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    let rows: Vec<JobRow> = rows.into_iter().take(limit as usize).map(|r| s.public_job(r)).collect();
    Ok(Json(json!({"data": rows, "has_more": has_more})))
}

/// Queue a pipeline: `{"kind": "train", "model": …, "suite": …, "data": …, "settings": {…}}`,
/// with `"needs": {"device": "cuda", "memory_mb": 40000}` to have it run only by a worker
/// with that device kind and at least that much memory (it waits in the queue until one
/// announces itself; `GET /api/v1/workers` lists them).
#[utoipa::path(post, path = "/api/v1/projects/{project}/jobs", params(("project" = String, Path)), responses((status = 202, description = "the queued job"), (status = 400, description = "what is wrong with the request")))]
async fn submit_job(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>, Json(mut body): Json<Value>) -> ApiResult<(StatusCode, Json<Value>)> {
    let p = s.project(&caller, &project).await?;
    let needs = needs_from(body.as_object_mut().and_then(|o| o.remove("needs")))?;
    let request: JobRequest = serde_json::from_value(body).map_err(|e| ApiError::bad(format!("job request: {e}")))?;
    let row = enqueue(&s, &p.id, request, needs, 0).await?;
    Ok((StatusCode::ACCEPTED, Json(json!(s.public_job(row)))))
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/jobs/{job}", params(("project" = String, Path), ("job" = String, Path)), responses((status = 200, description = "the job")))]
async fn get_job(State(s): State<Arc<AppState>>, caller: Caller, Path((project, job)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!(s.public_job(s.db.job(&p.id, &job).await?))))
}

/// A queued job is cancelled at once; a running one stops at its next check (a training
/// job keeps its last checkpoint).
#[utoipa::path(post, path = "/api/v1/projects/{project}/jobs/{job}/cancel", params(("project" = String, Path), ("job" = String, Path)), responses((status = 200, description = "the job")))]
async fn cancel_job(State(s): State<Arc<AppState>>, caller: Caller, Path((project, job)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let row = s.db.cancel(&p.id, &job).await?;
    Ok(Json(json!(s.public_job(row))))
}

/// Queues a failed or cancelled job again with one more attempt: same id, spec and
/// folders, so a training job resumes from its last checkpoint; its events continue.
#[utoipa::path(post, path = "/api/v1/projects/{project}/jobs/{job}/retry", params(("project" = String, Path), ("job" = String, Path)), responses((status = 200, description = "the job, queued"), (status = 409, description = "the job is queued, running or succeeded")))]
async fn retry_job(State(s): State<Arc<AppState>>, caller: Caller, Path((project, job)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!(s.public_job(s.db.retry(&p.id, &job).await?))))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct EventPage {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_event_limit")]
    limit: i64,
}

fn default_event_limit() -> i64 {
    500
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/jobs/{job}/events", params(("project" = String, Path), ("job" = String, Path), EventPage), responses((status = 200, description = "events after `after`")))]
async fn job_events(State(s): State<Arc<AppState>>, caller: Caller, Path((project, job)): Path<(String, String)>, Query(page): Query<EventPage>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let job = s.db.job(&p.id, &job).await?;
    let mut events = s.db.events(&job.id, page.after, page.limit.clamp(1, 1000)).await?;
    events.iter_mut().for_each(|e| s.redact_json(&mut e.data));
    Ok(Json(json!({"data": events})))
}

/// The job's events as server-sent events, each with its sequence number as the id; a
/// client reconnecting with `Last-Event-ID` continues after it. Ends once the job has
/// finished and every event was sent.
#[utoipa::path(get, path = "/api/v1/projects/{project}/jobs/{job}/events/stream", params(("project" = String, Path), ("job" = String, Path)), responses((status = 200, description = "text/event-stream")))]
async fn job_event_stream(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path((project, job)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let p = s.project(&caller, &project).await?;
    let job = s.db.job(&p.id, &job).await?;
    Ok(event_stream(s, job.id, &headers))
}

/// A job's events as server-sent events after the client's `Last-Event-ID`, ending once
/// the job has finished and every event was sent (with an `end` event).
pub fn event_stream(s: Arc<AppState>, job_id: String, headers: &HeaderMap) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>> + use<>> {
    let after = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let stream = futures_util::stream::unfold((s, job_id, after, false), |(s, id, mut after, done)| async move {
        if done {
            return None;
        }
        loop {
            let finished = s.db.job_any(&id).await.map(|j| j.state.is_finished()).unwrap_or(true);
            let events = s.db.events(&id, after, 100).await.unwrap_or_default();
            if !events.is_empty() {
                let batch: Vec<Result<SseEvent, Infallible>> = events
                    .iter()
                    .map(|e| Ok(SseEvent::default().id(e.seq.to_string()).event(e.kind.clone()).data(s.redact(&e.data.to_string()))))
                    .collect();
                after = events.last().map_or(after, |e| e.seq);
                return Some((futures_util::stream::iter(batch), (s, id, after, false)));
            }
            if finished {
                let end = vec![Ok(SseEvent::default().event("end").data("{}"))];
                return Some((futures_util::stream::iter(end), (s, id, after, true)));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    use futures_util::StreamExt;
    Sse::new(stream.flatten()).keep_alive(KeepAlive::default())
}

// ---- runs, reports, adapters ----

/// An eval run with every item's prompt, output and scores.
#[utoipa::path(get, path = "/api/v1/projects/{project}/runs/{run}", params(("project" = String, Path), ("run" = String, Path)), responses((status = 200, description = "the run")))]
async fn get_run(State(s): State<Arc<AppState>>, caller: Caller, Path((project, run)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let env = s.env(&p.id).await?;
    let run = lathe_jobs::pipeline::eval::load_run(&env, &run_id(&run)?)?;
    let mut run = json!(run);
    s.redact_json(&mut run);
    Ok(Json(run))
}

/// A file a job wrote: `adapter_config.json` / `adapter_model.safetensors` of a training
/// job, `report.html` / `report.json` of a report job, `export` of an export job.
#[utoipa::path(get, path = "/api/v1/projects/{project}/jobs/{job}/artifacts/{name}", params(("project" = String, Path), ("job" = String, Path), ("name" = String, Path)), responses((status = 200, description = "the file")))]
async fn job_artifact(State(s): State<Arc<AppState>>, caller: Caller, Path((project, job, name)): Path<(String, String, String)>) -> ApiResult<Response> {
    let p = s.project(&caller, &project).await?;
    artifact_response(&s, &p.id, &job, &name).await
}

/// A file a job wrote, streamed with its content type; `NotFound` for any other name.
pub async fn artifact_response(s: &AppState, project_id: &str, job_id: &str, name: &str) -> ApiResult<Response> {
    let name = name.to_string();
    let job = s.db.job(project_id, job_id).await?;
    let outcome = job.outcome.clone().unwrap_or(Value::Null);
    let str_at = |k: &str| outcome[k].as_str().map(std::path::PathBuf::from);
    let path = match (job.kind.as_str(), name.as_str()) {
        ("train", "adapter_config.json" | "adapter_model.safetensors") => str_at("adapter_dir").map(|d| d.join(&name)),
        ("demo", "adapter_config.json" | "adapter_model.safetensors") => str_at("adapter_dir").map(|d| d.join(&name)),
        ("demo", "report.html") => outcome["report"]["html"].as_str().map(std::path::PathBuf::from),
        ("demo", "report.json") => outcome["report"]["json"].as_str().map(std::path::PathBuf::from),
        ("eval_report", "report.html") => str_at("html"),
        ("eval_report", "report.json") => str_at("json"),
        ("export", "export") => outcome.as_str().map(std::path::PathBuf::from).filter(|p| p.is_file()),
        _ => None,
    };
    let path = path.ok_or_else(|| ApiError::NotFound(format!("job `{}` has no artifact `{name}`", job.id)))?;
    if name.starts_with("report.") {
        // A report names the runs' models and adapters: by name, not by server path.
        let text = tokio::fs::read_to_string(&path).await.map_err(|_| ApiError::NotFound(format!("artifact `{name}` is gone")))?;
        let content_type = if name.ends_with(".html") { "text/html; charset=utf-8" } else { "application/json" };
        return Ok(([(header::CONTENT_TYPE, content_type)], s.redact(&text).into_owned()).into_response());
    }
    let file = tokio::fs::File::open(&path).await.map_err(|_| ApiError::NotFound(format!("artifact `{name}` is gone")))?;
    let content_type = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    let body = Body::from_stream(tokio_util_stream(file));
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

fn tokio_util_stream(file: tokio::fs::File) -> impl Stream<Item = std::io::Result<Vec<u8>>> {
    futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 16];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}
