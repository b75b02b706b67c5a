//! Signing in with an API token, and out.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::{CsrfForm, Pages, Viewer, WebError, WebResult, render, see_other};
use crate::state::AppState;

pub const SESSION_COOKIE: &str = "lathe_session";

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/", || async { see_other("/projects") })
        .get("/login", login_page)
        .post("/login", login)
        .post("/logout", logout)
}

/// The session secret in the request's cookies, if any.
pub fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

/// Only a path on this server (`/projects/…`), never `//host` or `https://…`.
fn local_path(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/projects",
    }
}

async fn login_page(Query(q): Query<Next>) -> WebResult<Response> {
    Ok(render("login.html", minijinja::context! { next => local_path(q.next.as_deref()) })?.into_response())
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: Option<String>,
}

async fn login(State(s): State<Arc<AppState>>, Form(f): Form<LoginForm>) -> WebResult<Response> {
    let Some(token) = s.db.authenticate(f.token.trim()).await? else {
        let ctx = minijinja::context! { next => local_path(f.next.as_deref()), error => "That token is not valid: check it, or ask your team for a new one." };
        return Ok((axum::http::StatusCode::UNAUTHORIZED, render("login.html", ctx)?).into_response());
    };
    let secret = s.db.create_session(&token).await?;
    let max_age = lathe_store::SESSION_TTL_MS / 1000;
    let cookie = format!("{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}", secret.expose());
    let mut response = see_other(local_path(f.next.as_deref()));
    response.headers_mut().insert(header::SET_COOKIE, cookie.parse().map_err(|_| WebError::internal("session cookie"))?);
    Ok(response)
}

async fn logout(State(s): State<Arc<AppState>>, viewer: Viewer, headers: HeaderMap, Form(f): Form<CsrfForm>) -> WebResult<Response> {
    viewer.check_csrf(&f.csrf)?;
    if let Some(secret) = cookie(&headers) {
        s.db.end_session(&secret).await?;
    }
    let mut response = see_other("/login");
    let expired = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    response.headers_mut().insert(header::SET_COOKIE, expired.parse().map_err(|_| WebError::internal("session cookie"))?);
    Ok(response)
}
