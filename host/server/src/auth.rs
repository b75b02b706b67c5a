//! Who is calling: an API token (`Authorization: Bearer lathe_<id>_<secret>`) resolved to
//! its team. Every handler that touches a team's data takes a [`Caller`], so a request
//! without a valid token never reaches one.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Debug, Clone)]
pub struct Caller {
    pub team_id: String,
    pub token_id: String,
    pub admin: bool,
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or(ApiError::Unauthorized)?;
        let token = header.strip_prefix("Bearer ").ok_or(ApiError::Unauthorized)?.trim();
        let info = state.db.authenticate(token).await?.ok_or(ApiError::Unauthorized)?;
        Ok(Caller { team_id: info.team_id, token_id: info.id, admin: info.admin })
    }
}
