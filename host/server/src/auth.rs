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
    /// A server admin's token: may create teams.
    pub admin: bool,
    /// The team member holding the token; `None` for a team token.
    pub member_id: Option<String>,
    /// An owner's token or a team token: may manage members and revoke any team token.
    pub manages_team: bool,
}

impl Caller {
    pub fn from_token(info: &lathe_store::TokenInfo) -> Caller {
        Caller {
            team_id: info.team_id.clone(),
            token_id: info.id.clone(),
            admin: info.admin,
            member_id: info.member_id.clone(),
            manages_team: info.manages_team(),
        }
    }

    /// Refuses (403) a caller that may not manage the team's members.
    pub fn require_team_manager(&self) -> Result<(), ApiError> {
        match self.manages_team {
            true => Ok(()),
            false => Err(ApiError::Forbidden("only the team's owners manage its members and other members' tokens".into())),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or(ApiError::Unauthorized)?;
        let token = header.strip_prefix("Bearer ").ok_or(ApiError::Unauthorized)?.trim();
        let info = state.db.authenticate(token).await?.ok_or(ApiError::Unauthorized)?;
        Ok(Caller::from_token(&info))
    }
}
