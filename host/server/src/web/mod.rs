//! The web UI: server-rendered pages over the same functions the REST API calls.
//!
//! Pages are minijinja templates from `web/templates/` (embedded in release builds, read
//! from disk in debug builds so that editing one needs no rebuild), with htmx and uPlot
//! vendored into `web/static/vendor/` and served by the binary: a page makes no request to
//! any other host. Signing in with an API token starts a session (an HTTP-only,
//! `SameSite=Strict` cookie); every page resolves the project through the session's team
//! exactly as the API does, and every form carries the session's CSRF token.
//!
//! One module per page family: `session` (sign in and out), `projects` (projects, the
//! workflow checklist, settings), `data` (datasets and plugins), `eval` (suites), `packs`
//! (the pack catalogue, installs and upgrades), `jobs` (submit, watch, cancel, artifacts;
//! the workers that run them), `models` (adapters with their lineage, deploy aliases, the
//! playground).

mod assets;
mod data;
mod eval;
mod jobs;
mod models;
mod packs;
mod projects;
mod session;

use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::routing::MethodRouter;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use minijinja::{Environment, Value as Ctx};
use serde::Serialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

pub use session::SESSION_COOKIE;

pub fn routes() -> Router<Arc<AppState>> {
    pages().router
}

/// Every page and form route, as `(method, path)`: what the cross-team test calls, so a new
/// page cannot be left out of it.
pub fn route_list() -> Vec<(&'static str, &'static str)> {
    pages().list
}

fn pages() -> Pages {
    [session::routes, projects::routes, data::routes, eval::routes, packs::routes, jobs::routes, models::routes, assets::routes]
        .into_iter()
        .fold(Pages::default(), |all, module| module(all))
}

/// The web routes being registered, and a list of them that tests can read (axum's router
/// does not tell its routes).
#[derive(Default)]
pub struct Pages {
    router: Router<Arc<AppState>>,
    list: Vec<(&'static str, &'static str)>,
}

impl Pages {
    pub fn get<H: Handler<T, Arc<AppState>>, T: 'static>(self, path: &'static str, handler: H) -> Pages {
        self.add("GET", path, axum::routing::get(handler))
    }

    pub fn post<H: Handler<T, Arc<AppState>>, T: 'static>(self, path: &'static str, handler: H) -> Pages {
        self.add("POST", path, axum::routing::post(handler))
    }

    fn add(mut self, method: &'static str, path: &'static str, route: MethodRouter<Arc<AppState>>) -> Pages {
        // A second method on a path already routed joins its method router.
        self.router = self.router.route(path, route);
        self.list.push((method, path));
        self
    }
}

/// The signed-in user of a page: the team the session's token belongs to, and the CSRF
/// token its forms carry. A request without a live session is sent to the sign-in page.
pub struct Viewer {
    pub caller: Caller,
    pub csrf: String,
}

impl FromRequestParts<Arc<AppState>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let session = match session::cookie(&parts.headers) {
            Some(secret) => state.db.session(&secret).await.map_err(|e| WebError::from(ApiError::from(e)).into_response())?,
            None => None,
        };
        match session {
            Some(s) => {
                let caller = Caller { manages_team: s.manages_team(), team_id: s.team_id, token_id: s.token_id, admin: s.admin, member_id: s.member_id };
                Ok(Viewer { caller, csrf: s.csrf })
            }
            None => {
                let next = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let target = format!("/login?next={}", urlencode(next));
                Err(if parts.method == axum::http::Method::GET { Redirect::to(&target).into_response() } else { StatusCode::UNAUTHORIZED.into_response() })
            }
        }
    }
}

impl Viewer {
    /// Refuses a form whose CSRF token is not this session's.
    pub fn check_csrf(&self, token: &str) -> Result<(), WebError> {
        use subtle::ConstantTimeEq;
        if bool::from(token.as_bytes().ct_eq(self.csrf.as_bytes())) {
            Ok(())
        } else {
            Err(WebError { status: StatusCode::FORBIDDEN, message: "the form's CSRF token is missing or stale: reload the page and submit it again".into() })
        }
    }
}

/// A form that carries nothing but its CSRF token (sign out, cancel, revoke).
#[derive(serde::Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// A form's fields in the order the browser sent them (repeated names, such as a suite's
/// scorers, stay a list).
pub type Fields = Vec<(String, String)>;

/// The first value of a form field, trimmed; `None` when absent or blank.
pub fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim()).filter(|v| !v.is_empty())
}

/// An error page: the status and the message the API would give.
#[derive(Debug)]
pub struct WebError {
    pub status: StatusCode,
    pub message: String,
}

impl WebError {
    pub fn internal(what: &str) -> Self {
        WebError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("internal error: {what}") }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        WebError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        WebError { status: StatusCode::NOT_FOUND, message: message.into() }
    }
}

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        let status = e.status();
        WebError { status, message: e.to_string() }
    }
}

impl From<lathe_store::StoreError> for WebError {
    fn from(e: lathe_store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<lathe_jobs::JobError> for WebError {
    fn from(e: lathe_jobs::JobError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let ctx = minijinja::context! { status => self.status.as_u16(), reason => self.status.canonical_reason().unwrap_or(""), message => self.message };
        match render("error.html", ctx) {
            Ok(html) => (self.status, html).into_response(),
            Err(e) => (self.status, e.message).into_response(),
        }
    }
}

pub type WebResult<T> = Result<T, WebError>;

/// Renders a template; `ctx` is whatever the page needs.
pub fn render(name: &str, ctx: Ctx) -> WebResult<Html<String>> {
    let render = |env: &Environment<'_>| env.get_template(name).and_then(|t| t.render(ctx.clone()));
    let out = if cfg!(debug_assertions) { render(&environment()) } else { render(embedded()) };
    out.map(Html).map_err(|e| WebError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("rendering {name}: {e:#}") })
}

/// A page's frame: who is signed in, the CSRF token, the project (if any) and which tab.
pub fn frame(viewer: &Viewer, project: Option<&lathe_store::Project>, tab: &str) -> Ctx {
    minijinja::context! { csrf => viewer.csrf, team_id => viewer.caller.team_id, admin => viewer.caller.admin, project => project, tab => tab }
}

/// `frame` merged with a page's own values.
pub fn page_ctx(frame: Ctx, page: impl Serialize) -> Ctx {
    minijinja::context! { ..frame, ..Ctx::from_serialize(page) }
}

macro_rules! templates {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../../../web/templates/", $name)))),*]
    };
}

/// Every template, for release builds.
const TEMPLATES: &[(&str, &str)] = templates!(
    "base.html", "error.html", "login.html", "projects.html", "project.html", "settings.html", "datasets.html",
    "dataset.html", "import.html", "plugins.html", "plugin.html", "try_result.html", "suites.html", "suite_preview.html", "jobs.html",
    "jobs_table.html", "job.html", "models.html", "playground_result.html", "report.html", "project_settings.html", "packs.html",
    "workers.html",
);

fn embedded() -> &'static Environment<'static> {
    static ENV: std::sync::OnceLock<Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(environment)
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    if cfg!(debug_assertions) {
        env.set_loader(minijinja::path_loader(concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/templates")));
    } else {
        for (name, source) in TEMPLATES {
            env.add_template(name, source).expect("the embedded templates parse");
        }
    }
    env.add_filter("when", |ms: i64| {
        let secs = ms.div_euclid(1000);
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
    });
    env.add_filter("bytes", |n: f64| {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"];
        let i = if n < 1.0 { 0 } else { ((n.log2() / 10.0).floor() as usize).min(units.len() - 1) };
        if i == 0 { format!("{n} B") } else { format!("{:.1} {}", n / f64::powi(1024.0, i as i32), units[i]) }
    });
    env.add_filter("urlencode", |s: String| urlencode(&s));
    env.add_filter("short", |s: String| s.chars().take(12).collect::<String>());
    env.add_filter("pretty", |v: Ctx| serde_json::to_string_pretty(&v).unwrap_or_default());
    env
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// After a successful form: go to `to` (with htmx, by its redirect header).
pub fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

#[cfg(test)]
mod tests {
    /// A template added to `web/templates/` but not to the embedded list would work in
    /// debug builds and be missing from the release binary.
    #[test]
    fn every_template_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/templates");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        let mut embedded: Vec<String> = super::TEMPLATES.iter().map(|(name, _)| name.to_string()).collect();
        on_disk.sort();
        embedded.sort();
        assert_eq!(embedded, on_disk);
    }
}
