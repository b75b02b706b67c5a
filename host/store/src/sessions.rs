//! Browser sessions of the web UI.
//!
//! Signing in with an API token makes a session; the browser holds its random secret in an
//! HTTP-only cookie and the database keeps only the secret's sha256. Each session has its
//! own CSRF token, which every form and every scripted write must echo. A session lasts
//! [`SESSION_TTL_MS`] and ends early when its token is revoked or the user signs out.

use sha2::{Digest, Sha256};

use crate::auth::{Secret, TokenInfo};
use crate::{Db, Result, now_ms, on_pool, random_lower_alnum};

/// How long a session lasts: a working week.
pub const SESSION_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// A live session: whose it is and the CSRF token its forms carry.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct WebSession {
    pub token_id: String,
    pub team_id: String,
    pub admin: bool,
    pub member_id: Option<String>,
    pub role: Option<String>,
    pub csrf: String,
    pub expires_at: i64,
}

impl WebSession {
    /// Whether the signed-in token may manage the team (see [`crate::TokenInfo::manages_team`]).
    pub fn manages_team(&self) -> bool {
        crate::members::manages_team(self.member_id.as_deref(), self.role.as_deref())
    }
}

fn digest(secret: &str) -> String {
    lathe_util::hex(&Sha256::digest(secret.as_bytes()))
}

impl Db {
    /// Starts a session for a token that [`Db::authenticate`] accepted; returns the cookie
    /// secret (shown to the browser only).
    pub async fn create_session(&self, token: &TokenInfo) -> Result<Secret> {
        let secret = random_lower_alnum(40);
        let now = now_ms();
        on_pool!(self, p => sqlx::query(
            "INSERT INTO web_sessions (secret_sha256, token_id, csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(digest(&secret))
            .bind(&token.id)
            .bind(random_lower_alnum(32))
            .bind(now)
            .bind(now + SESSION_TTL_MS)
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(Secret::new(secret))
    }

    /// The session a cookie names, if it exists, has not expired and its token is not
    /// revoked.
    pub async fn session(&self, secret: &str) -> Result<Option<WebSession>> {
        let sql = "SELECT s.token_id, t.team_id, t.admin, t.member_id, m.role, s.csrf, s.expires_at \
                   FROM web_sessions s JOIN api_tokens t ON t.id = s.token_id \
                   LEFT JOIN members m ON m.id = t.member_id \
                   WHERE s.secret_sha256 = $1 AND s.expires_at > $2 AND t.revoked_at IS NULL";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(digest(secret)).bind(now_ms()).fetch_optional(p).await)?)
    }

    /// Signs a session out; also removes every expired session.
    pub async fn end_session(&self, secret: &str) -> Result<()> {
        on_pool!(self, p => sqlx::query("DELETE FROM web_sessions WHERE secret_sha256 = $1 OR expires_at <= $2")
            .bind(digest(secret))
            .bind(now_ms())
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}
