//! Eval packs over HTTP: the catalogue (the packs that ship with this binary and those the
//! team uploaded), a pack's contents and what it asks for, its file, and installing it into
//! a project. Verifying, the plugin checks and the data import are the job layer's
//! (`lathe_jobs::pack`), as for `lathe pack install`; here they are stored in the project.

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use lathe_jobs::pack::{Installed, Pack, shipped::Template};
use lathe_store::{NewPlugin, PackInstall};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, blocking};

pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(catalogue, upload_pack))
        .routes(routes!(get_pack))
        .routes(routes!(pack_file))
        .routes(routes!(project_packs, install_pack))
        .routes(routes!(pack_diff))
}

/// The plugin runtime packs are checked with: the configuration jobs run plugins under, so
/// its limits are the ones a pack is held against.
fn runtime() -> ApiResult<&'static lathe_sandbox::Runtime> {
    static RUNTIME: OnceLock<Result<lathe_sandbox::Runtime, String>> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        let config = lathe_jobs::env::runtime_config(lathe_jobs::env::default_plugin_cache()).map_err(|e| e.to_string())?;
        lathe_sandbox::Runtime::new(config).map_err(|e| e.to_string())
    });
    rt.as_ref().map_err(|e| ApiError::Internal(e.clone()))
}

/// A pack this binary ships: its file and what it holds.
struct Shipped {
    bytes: Vec<u8>,
    pack: Pack,
}

/// The packs this binary ships, built and read once: the same bytes (and sha256) on every
/// server of this version.
fn shipped() -> ApiResult<&'static [Shipped]> {
    static SHIPPED: OnceLock<Result<Vec<Shipped>, String>> = OnceLock::new();
    let rt = runtime()?;
    let built = SHIPPED.get_or_init(|| {
        Template::SHIPPED
            .iter()
            .map(|t| {
                let bytes = t.build(rt).map_err(|e| format!("shipped pack {}: {e}", t.name()))?;
                let pack = Pack::read(&bytes).map_err(|e| format!("shipped pack {}: {e}", t.name()))?;
                Ok(Shipped { bytes, pack })
            })
            .collect()
    });
    built.as_deref().map_err(|e| ApiError::Internal(e.clone()))
}

/// A pack's bytes by sha256: a shipped pack, or one in the caller's team's catalogue.
async fn pack_bytes(s: &AppState, caller: &Caller, sha256: &str) -> ApiResult<(Vec<u8>, &'static str)> {
    if let Some(found) = blocking(shipped).await?.iter().find(|p| p.pack.sha256 == sha256) {
        return Ok((found.bytes.clone(), "shipped"));
    }
    if s.db.pack_opt(&caller.team_id, sha256).await?.is_none() {
        return Err(ApiError::not_found("pack", sha256));
    }
    let path = s.artifact_path(sha256).await?;
    let bytes = tokio::fs::read(&path).await.map_err(|e| ApiError::Internal(format!("pack {sha256}: {e}")))?;
    Ok((bytes, "uploaded"))
}

fn summary(pack: &Pack, origin: &str) -> Value {
    let mut d = pack.describe();
    d["origin"] = json!(origin);
    d
}

/// The catalogue: the packs that ship with Lathe, then the team's uploads.
#[utoipa::path(get, path = "/api/v1/packs", responses((status = 200, description = "packs a project can install")))]
async fn catalogue(State(s): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"data": catalogue_of(&s, &caller).await?})))
}

/// Every pack the caller's team can install, described.
pub async fn catalogue_of(s: &AppState, caller: &Caller) -> ApiResult<Vec<Value>> {
    let mut data = Vec::new();
    for p in blocking(shipped).await? {
        data.push(summary(&p.pack, "shipped"));
    }
    for row in s.db.packs(&caller.team_id).await? {
        let (bytes, origin) = pack_bytes(s, caller, &row.sha256).await?;
        data.push(summary(&Pack::read(&bytes)?, origin));
    }
    Ok(data)
}

/// Upload a `.lathepack` (the request body) to the team's catalogue. It is verified (any
/// changed byte refuses it) and its plugins are checked as uploads are, and held against
/// this server's limits; a refusal names the plugin and the limit.
#[utoipa::path(post, path = "/api/v1/packs", responses((status = 201, description = "the pack"), (status = 400, description = "refused, and why"), (status = 409, description = "the name and version exist with other contents")))]
async fn upload_pack(State(s): State<Arc<AppState>>, caller: Caller, body: axum::body::Bytes) -> ApiResult<(StatusCode, Json<Value>)> {
    Ok((StatusCode::CREATED, Json(add_to_catalogue(&s, &caller, body.to_vec()).await?)))
}

/// Verifies and checks a pack, then adds it to the caller's team's catalogue.
pub async fn add_to_catalogue(s: &AppState, caller: &Caller, bytes: Vec<u8>) -> ApiResult<Value> {
    let (pack, bytes) = blocking(move || {
        let pack = Pack::read(&bytes)?;
        pack.check(runtime()?)?;
        Ok((pack, bytes))
    })
    .await?;
    for Shipped { pack: shipped, .. } in blocking(shipped).await? {
        if shipped.sha256 == pack.sha256 {
            return Ok(summary(shipped, "shipped"));
        }
        if shipped.id() == pack.id() {
            return Err(ApiError::Conflict(format!("{} ships with Lathe with other contents; give your pack another name or version", pack.id())));
        }
    }
    let artifacts = s.artifacts.clone();
    let sha = blocking(move || Ok(artifacts.put_bytes(&bytes)?)).await?;
    debug_assert_eq!(sha, pack.sha256);
    s.db.add_pack(&caller.team_id, &pack.sha256, &pack.manifest.name, &pack.manifest.version, pack.size as i64).await.map_err(|e| match e {
        lathe_store::StoreError::Conflict(m) => ApiError::Conflict(m),
        e => e.into(),
    })?;
    Ok(summary(&pack, "uploaded"))
}

/// What a pack holds and asks for, with its README.
#[utoipa::path(get, path = "/api/v1/packs/{sha256}", params(("sha256" = String, Path)), responses((status = 200, description = "the pack"), (status = 404, description = "neither shipped nor in the team's catalogue")))]
async fn get_pack(State(s): State<Arc<AppState>>, caller: Caller, Path(sha256): Path<String>) -> ApiResult<Json<Value>> {
    let (bytes, origin) = pack_bytes(&s, &caller, &sha256).await?;
    let pack = Pack::read(&bytes)?;
    let mut d = summary(&pack, origin);
    d["readme"] = json!(pack.readme);
    Ok(Json(d))
}

/// The `.lathepack` file itself (`lathe pack inspect` and `install` read it).
#[utoipa::path(get, path = "/api/v1/packs/{sha256}/file", params(("sha256" = String, Path)), responses((status = 200, description = "application/octet-stream")))]
async fn pack_file(State(s): State<Arc<AppState>>, caller: Caller, Path(sha256): Path<String>) -> ApiResult<Response> {
    let (bytes, _) = pack_bytes(&s, &caller, &sha256).await?;
    let pack = Pack::read(&bytes)?;
    let disposition = format!("attachment; filename=\"{}-{}.lathepack\"", pack.manifest.name, pack.manifest.version);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_DISPOSITION, disposition)], bytes).into_response())
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/packs", params(("project" = String, Path)), responses((status = 200, description = "the packs the project has installed")))]
async fn project_packs(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    Ok(Json(json!({"data": s.db.project_packs(&p.id).await?})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallPack {
    /// A pack of the catalogue.
    pub sha256: String,
}

/// Installs a pack of the catalogue into a project: its plugins (checked as uploads are,
/// within this server's limits), its suites (plugin references pinned to the pack's
/// hashes), and its held-out items and few-shot pool as dataset versions named
/// `packs/<name>/heldout` and `packs/<name>/fewshot`. Installing another version of a
/// pack replaces its suites and data names; the answer says what changed. The plugins,
/// suites and install record are written in one transaction: a failed or interrupted
/// install lists none of them, and installing again succeeds.
#[utoipa::path(post, path = "/api/v1/projects/{project}/packs", params(("project" = String, Path)), request_body = InstallPack, responses((status = 201, description = "what was installed, and the diff against the version it replaced"), (status = 400, description = "refused, and why")))]
async fn install_pack(State(s): State<Arc<AppState>>, caller: Caller, Path(project): Path<String>, Json(req): Json<InstallPack>) -> ApiResult<(StatusCode, Json<Value>)> {
    let p = s.project(&caller, &project).await?;
    Ok((StatusCode::CREATED, Json(install(&s, &caller, &p, &req.sha256).await?)))
}

/// Installs a catalogue pack into a project (see [`install_pack`]).
pub async fn install(s: &AppState, caller: &Caller, p: &lathe_store::Project, sha256: &str) -> ApiResult<Value> {
    let (bytes, _) = pack_bytes(s, caller, sha256).await?;
    let previous = s.db.project_packs(&p.id).await?;
    let env = s.env(&p.id).await?;
    let artifacts = s.artifacts.clone();
    // The checks, the plugins' bytes (content-addressed: unlisted until a row names them)
    // and the data versions first; then every row in one transaction.
    let (pack, plugins, data) = blocking(move || {
        let pack = Pack::read(&bytes)?;
        for suite in &pack.suites {
            crate::api::check_suite_for_server(suite)?;
        }
        let mut plugins = Vec::new();
        for (entry, plugin) in pack.check(env.runtime()?)? {
            let sha256 = artifacts.put_bytes(pack.plugin_bytes(&entry.sha256).expect("a read pack carries its plugins"))?;
            let info = plugin.info();
            plugins.push(NewPlugin { name: info.name.clone(), kind: info.kind.name().into(), version: info.version.clone(), sha256, size: info.size_bytes as i64, config_schema: info.config_schema.clone() });
        }
        let data = lathe_jobs::pack::install_data(&env, &pack, &lathe_jobs::NullSink)?;
        Ok((pack, plugins, data))
    })
    .await?;
    let installed = Installed::new(&pack, data);
    let suites = pack.suites.iter().map(|suite| (suite.name.clone(), serde_json::to_value(suite).expect("suites serialise"))).collect();
    let install = PackInstall { name: installed.name.clone(), version: installed.version.clone(), sha256: installed.sha256.clone(), plugins, suites, installed: json!(installed) };
    let row = s.db.install_pack(&p.id, &install).await?;
    let diff = match previous.iter().find(|r| r.name == pack.manifest.name && r.sha256 != pack.sha256) {
        Some(old) => Some(pack.diff(&Pack::read(&pack_bytes(s, caller, &old.sha256).await?.0)?)),
        None => None,
    };
    Ok(json!({"installed": row, "diff": diff}))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct DiffTo {
    /// The catalogue pack (sha256) that would replace the installed one.
    #[serde(default)]
    pub to: Option<String>,
}

/// What installing `to` over the project's installed version of the pack would change.
#[utoipa::path(get, path = "/api/v1/projects/{project}/packs/{name}/diff", params(("project" = String, Path), ("name" = String, Path), DiffTo), responses((status = 200, description = "plugins, suites and data added, removed or changed")))]
async fn pack_diff(State(s): State<Arc<AppState>>, caller: Caller, Path((project, name)): Path<(String, String)>, Query(q): Query<DiffTo>) -> ApiResult<Json<Value>> {
    let p = s.project(&caller, &project).await?;
    let to = q.to.ok_or_else(|| ApiError::bad("name the pack to compare with: ?to=<sha256>"))?;
    Ok(Json(diff(&s, &caller, &p, &name, &to).await?))
}

/// What installing the catalogue pack `to` over the project's `name` would change.
pub async fn diff(s: &AppState, caller: &Caller, p: &lathe_store::Project, name: &str, to: &str) -> ApiResult<Value> {
    let installed = s.db.project_packs(&p.id).await?.into_iter().find(|r| r.name == name).ok_or_else(|| ApiError::not_found("installed pack", name))?;
    let old = Pack::read(&pack_bytes(s, caller, &installed.sha256).await?.0)?;
    let new = Pack::read(&pack_bytes(s, caller, to).await?.0)?;
    if new.manifest.name != name {
        return Err(ApiError::bad(format!("{} is not a version of `{name}`", new.id())));
    }
    Ok(new.diff(&old))
}
