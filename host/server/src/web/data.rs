//! Datasets (upload and import, versions with lineage, examples, curate, split, statistics)
//! and plugins (upload, what the sandbox says of them, try one on a sample).

use std::sync::Arc;

use axum::extract::{Multipart, Path, Query, State};
use axum::response::{Html, Response};
use axum::Form;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Fields, Pages, Viewer, WebError, WebResult, field, frame, page_ctx, render, see_other};
use crate::api::{self, JobRequest};
use crate::state::AppState;

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/projects/{project}/datasets", datasets)
        .post("/projects/{project}/datasets", upload_dataset)
        .get("/projects/{project}/datasets/{version}", dataset)
        .get("/projects/{project}/files/{file}/import", import_page)
        .post("/projects/{project}/files/{file}/import", import)
        .get("/projects/{project}/plugins", plugins)
        .post("/projects/{project}/plugins", upload_plugin)
        .get("/projects/{project}/plugins/{plugin}", plugin)
        .post("/projects/{project}/plugins/{plugin}/try", try_plugin)
}

async fn datasets(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let mut versions = api::dataset_versions(&s, &p.id).await?;
    let graph = lineage_graph(&versions);
    versions.reverse();
    let files = s.db.files(&p.id).await?;
    render("datasets.html", page_ctx(frame(&viewer, Some(&p), "datasets"), minijinja::context! { versions => versions, files => files, graph => graph }))
}

/// The project's versions as a graph for SVG: one row per version in the order they were
/// made, indented by how many steps separate it from its import, with an edge from each
/// parent. `versions` is oldest first, as [`api::dataset_versions`] gives it.
fn lineage_graph(versions: &[Value]) -> Value {
    const ROW: usize = 30;
    const COL: usize = 40;
    let mut at: std::collections::HashMap<&str, (usize, usize)> = std::collections::HashMap::new();
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    // Parents before children: creation times tie within a second (a curation's steps).
    let id_of = |v: &Value| v["manifest"]["id"].as_str().unwrap_or_default().to_string();
    let parent_of = |v: &Value| v["manifest"]["parent"].as_str().map(str::to_string);
    let known: std::collections::HashSet<String> = versions.iter().map(id_of).collect();
    let mut ordered: Vec<&Value> = Vec::with_capacity(versions.len());
    let mut placed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut remaining: Vec<&Value> = versions.iter().collect();
    while !remaining.is_empty() {
        let before = remaining.len();
        remaining.retain(|v| {
            let ready = parent_of(v).is_none_or(|p| !known.contains(&p) || placed.contains(&p));
            if ready {
                placed.insert(id_of(v));
                ordered.push(v);
            }
            !ready
        });
        if remaining.len() == before {
            ordered.append(&mut remaining); // a cycle cannot happen; never loop on one anyway
        }
    }
    for (row, v) in ordered.into_iter().enumerate() {
        let m = &v["manifest"];
        let id = m["id"].as_str().unwrap_or_default();
        let parent = m["parent"].as_str().and_then(|p| at.get(p).copied());
        let depth = parent.map_or(0, |(d, _)| d + 1);
        let (x, y) = (16 + depth * COL, 16 + row * ROW);
        if let Some((pd, prow)) = parent {
            edges.push(json!({"x1": 16 + pd * COL, "y1": 16 + prow * ROW, "x2": x, "y2": y}));
        }
        at.insert(id, (depth, row));
        let op = m["operation"].as_object().and_then(|o| o.keys().next().cloned()).unwrap_or_default();
        let names: Vec<&str> = v["names"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let label = if names.is_empty() { id.chars().take(12).collect() } else { names.join(", ") };
        nodes.push(json!({"id": id, "x": x, "y": y, "label": label, "op": op, "rows": m["rows"], "role": m["role"]}));
    }
    let depth = at.values().map(|(d, _)| *d).max().unwrap_or(0);
    json!({"nodes": nodes, "edges": edges, "width": 16 + depth * COL + 420, "height": 16 + versions.len().max(1) * ROW})
}

/// The first multipart field must be the form's CSRF token, so that nothing is stored for
/// a forged form.
pub(super) async fn check_multipart_csrf(viewer: &Viewer, multipart: &mut Multipart) -> WebResult<()> {
    let field = multipart.next_field().await.map_err(|e| WebError::bad(format!("malformed upload: {e}")))?;
    let token = match field {
        Some(f) if f.name() == Some("csrf") => f.text().await.map_err(|e| WebError::bad(format!("malformed upload: {e}")))?,
        _ => String::new(),
    };
    viewer.check_csrf(&token)
}

/// Upload a file; answers with its import page (what was detected, to check first).
async fn upload_dataset(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, mut multipart: Multipart) -> WebResult<Response> {
    let p = s.project(&viewer.caller, &project).await?;
    check_multipart_csrf(&viewer, &mut multipart).await?;
    let field = multipart.next_field().await.map_err(|e| WebError::bad(format!("malformed upload: {e}")))?;
    let Some(field) = field.filter(|f| f.name() == Some("file")) else { return Err(WebError::bad("choose a file to upload")) };
    let file = api::receive_field(&s, &p.id, field, "fine-tune").await?;
    Ok(see_other(&format!("/projects/{}/files/{}/import", p.id, file.id)))
}

/// An uploaded file's first records, the format detected, and the import form with the
/// column mapping filled in from the column names (editable).
async fn import_page(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, file)): Path<(String, String)>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let f = s.db.file(&p.id, &file).await?;
    let preview = api::file_preview(&s, &f).await?;
    let records: Vec<String> = preview.records.iter().map(|r| serde_json::to_string_pretty(r).unwrap_or_default()).collect();
    let suggested = f.filename.rsplit_once('.').map_or(f.filename.as_str(), |(stem, _)| stem).chars().filter(|c| c.is_alphanumeric() || "-_.".contains(*c)).collect::<String>();
    let formatters: Vec<Value> = plugin_choices(&s, &p.id).await?.into_iter().filter(|p| p["kind"] == "formatter").collect();
    let ctx = minijinja::context! { file => f, preview => preview, records => records, suggested_name => suggested, formatters => formatters };
    render("import.html", page_ctx(frame(&viewer, Some(&p), "datasets"), ctx))
}

/// Queue the import of an uploaded file as the form describes it; answers with the job.
async fn import(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, file)): Path<(String, String)>, Form(f): Form<Fields>) -> WebResult<Response> {
    let field = |k: &str| field(&f, k);
    viewer.check_csrf(field("csrf").unwrap_or_default())?;
    let p = s.project(&viewer.caller, &project).await?;
    let mapping = match (field("prompt"), field("completion")) {
        (Some(prompt), Some(completion)) => Some(json!({"prompt": prompt, "completion": completion, "system": field("system"), "label": field("label")})),
        (None, None) => None,
        _ => return Err(WebError::bad("a column mapping needs both the prompt and the completion column")),
    };
    let formatter = field("formatter").map(|name| json!({"plugin": name}));
    let request = json!({"kind": "data_import", "file_id": file, "name": field("name"), "mapping": mapping, "formatter": formatter});
    let request: JobRequest = serde_json::from_value(request).map_err(|e| WebError::bad(format!("import: {e}")))?;
    let job = api::enqueue(&s, &p.id, request, Default::default(), 0).await?;
    Ok(see_other(&format!("/projects/{}/jobs/{}", p.id, job.id)))
}

#[derive(Deserialize)]
struct ExamplePage {
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    q: String,
}

const EXAMPLES_PER_PAGE: usize = 25;

async fn dataset(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, version)): Path<(String, String)>, Query(page): Query<ExamplePage>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let env = s.env(&p.id).await?;
    let q = page.q.trim().to_lowercase();
    let (manifest, lineage, examples, more) = tokio::task::spawn_blocking(move || -> WebResult<_> {
        let store = env.datasets()?;
        let id = store.resolve(&version).map_err(lathe_jobs::JobError::from)?;
        let manifest = store.manifest(&id).map_err(lathe_jobs::JobError::from)?;
        let lineage = store.lineage(&id).map_err(lathe_jobs::JobError::from)?;
        // Filtering reads the version once, keeping a page of matches.
        let mut matched = store
            .examples(&id)
            .map_err(lathe_jobs::JobError::from)?
            .filter_map(|e| e.ok())
            .map(|e| e.to_canonical())
            .filter(|text| q.is_empty() || text.to_lowercase().contains(&q))
            .skip(page.offset)
            .take(EXAMPLES_PER_PAGE + 1)
            .map(|text| serde_json::from_str::<Value>(&text).unwrap_or(Value::Null))
            .collect::<Vec<_>>();
        let more = matched.len() > EXAMPLES_PER_PAGE;
        matched.truncate(EXAMPLES_PER_PAGE);
        Ok((manifest, lineage, matched, more))
    })
    .await
    .map_err(|e| WebError::internal(&e.to_string()))??;
    let suites = s.db.suites(&p.id).await?;
    let ctx = minijinja::context! {
        manifest => manifest, lineage => lineage, examples => examples, offset => page.offset, q => page.q,
        next_offset => more.then_some(page.offset + EXAMPLES_PER_PAGE), prev_offset => (page.offset > 0).then(|| page.offset.saturating_sub(EXAMPLES_PER_PAGE)),
        suites => suites, plugins => plugin_choices(&s, &p.id).await?, models => s.config.models.keys().collect::<Vec<_>>(),
    };
    render("dataset.html", page_ctx(frame(&viewer, Some(&p), "datasets"), ctx))
}

/// The plugins a form may name: the project's (newest version of each name) and the
/// built-ins.
pub async fn plugin_choices(s: &AppState, project_id: &str) -> WebResult<Vec<Value>> {
    let mut out: Vec<Value> = Vec::new();
    for row in s.db.plugins(project_id).await?.into_iter().rev() {
        if !out.iter().any(|p| p["name"] == row.name.as_str()) {
            out.push(json!({"name": row.name, "kind": row.kind, "source": "project", "version": row.version}));
        }
    }
    for b in builtins(s, project_id).await? {
        if !out.iter().any(|p| p["name"] == b["name"]) {
            out.push(b);
        }
    }
    Ok(out)
}

/// The built-in plugins with their kinds, read from the components once per process.
pub async fn builtins(s: &AppState, project_id: &str) -> WebResult<Vec<Value>> {
    static BUILTINS: tokio::sync::OnceCell<Vec<Value>> = tokio::sync::OnceCell::const_new();
    let list = BUILTINS
        .get_or_try_init(|| async move {
            let env = s.env(project_id).await?;
            tokio::task::spawn_blocking(move || -> Result<Vec<Value>, lathe_jobs::JobError> {
                lathe_sandbox::builtin_names()
                    .map(|n| Ok(json!({"name": n, "kind": env.load_plugin(n)?.kind().name(), "source": "built-in"})))
                    .collect()
            })
            .await
            .map_err(|e| WebError::internal(&e.to_string()))?
            .map_err(WebError::from)
        })
        .await?;
    Ok(list.clone())
}

async fn plugins(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let uploaded = s.db.plugins(&p.id).await?;
    let ctx = minijinja::context! { uploaded => uploaded, builtins => builtins(&s, &p.id).await? };
    render("plugins.html", page_ctx(frame(&viewer, Some(&p), "plugins"), ctx))
}

/// Upload a `.wasm`: checked exactly as the API and `lathe plugin inspect` check it; a
/// refusal is shown as the sandbox words it.
async fn upload_plugin(State(s): State<Arc<AppState>>, viewer: Viewer, Path(project): Path<String>, mut multipart: Multipart) -> WebResult<Response> {
    let p = s.project(&viewer.caller, &project).await?;
    check_multipart_csrf(&viewer, &mut multipart).await?;
    let field = multipart.next_field().await.map_err(|e| WebError::bad(format!("malformed upload: {e}")))?;
    let Some(field) = field.filter(|f| f.name() == Some("file")) else { return Err(WebError::bad("choose a .wasm file to upload")) };
    let bytes = field.bytes().await.map_err(|e| WebError::bad(format!("the upload failed: {e}")))?;
    let (row, _) = api::store_plugin(&s, &p.id, bytes).await?;
    Ok(see_other(&format!("/projects/{}/plugins/{}", p.id, row.sha256)))
}

async fn plugin(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, plugin)): Path<(String, String)>) -> WebResult<Html<String>> {
    let p = s.project(&viewer.caller, &project).await?;
    let row = s.db.plugin(&p.id, &plugin).await?;
    // Suites name plugins; a job pins the hash each name had when it was queued.
    let quoted = format!("\"{}\"", row.name);
    let suites: Vec<String> = s.db.suites(&p.id).await?.into_iter().filter(|r| r.definition.to_string().contains(&quoted)).map(|r| r.name).collect();
    let versions: Vec<_> = s.db.plugins(&p.id).await?.into_iter().filter(|v| v.name == row.name).collect();
    let used_by: Vec<_> = s
        .db
        .jobs(&p.id, None, None, 500)
        .await?
        .into_iter()
        .filter(|j| j.plugins.get(&row.name) == Some(&row.sha256) && j.spec.to_string().contains(&quoted))
        .map(|j| json!({"id": j.id, "kind": j.kind, "state": j.state.as_str(), "created_at": j.created_at}))
        .collect();
    let sample = match row.kind.as_str() {
        "scorer" => json!({"prediction": "{\"total\": 12.5}", "reference": "{\"total\": 12.5}"}),
        "validator" => json!({"output": "{\"total\": 12.5}"}),
        "judge" => json!({"input": "What is 2+2?", "output": "4", "reference": "4"}),
        _ => json!({"text": "an example record"}),
    };
    let ctx = minijinja::context! { plugin => row, suites => suites, versions => versions, used_by => used_by, sample => serde_json::to_string_pretty(&sample).unwrap_or_default() };
    render("plugin.html", page_ctx(frame(&viewer, Some(&p), "plugins"), ctx))
}

#[derive(Deserialize)]
struct TryForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    config: String,
    input: String,
}

/// Runs the plugin on the form's sample; answers the result fragment (htmx swaps it in).
async fn try_plugin(State(s): State<Arc<AppState>>, viewer: Viewer, Path((project, plugin)): Path<(String, String)>, Form(f): Form<TryForm>) -> WebResult<Html<String>> {
    viewer.check_csrf(&f.csrf)?;
    let p = s.project(&viewer.caller, &project).await?;
    let row = s.db.plugin(&p.id, &plugin).await?;
    let parse = |what: &str, text: &str| -> WebResult<Value> {
        if text.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(text).map_err(|e| WebError::bad(format!("{what} is not JSON: {e}")))
    };
    let (config, input) = (parse("the configuration", &f.config)?, parse("the sample", &f.input)?);
    let env = s.env(&p.id).await?;
    let out = tokio::task::spawn_blocking(move || -> Result<Value, lathe_jobs::JobError> {
        let plugin = env.load_plugin(&row.name)?;
        lathe_jobs::plugins::try_on(&plugin, &config.to_string(), &input)
    })
    .await
    .map_err(|e| WebError::internal(&e.to_string()))?;
    let ctx = match out {
        Ok(v) => minijinja::context! { ok => true, result => serde_json::to_string_pretty(&v).unwrap_or_default() },
        Err(e) => minijinja::context! { ok => false, result => e.to_string() },
    };
    render("try_result.html", ctx)
}
