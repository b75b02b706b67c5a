//! Teams and their API tokens.
//!
//! A token reads `lathe_<id>_<secret>`. The id is public (it names the token in listings
//! and is the lookup key); the secret is 40 random alphanumerics, of which only the sha256
//! is stored, compared in constant time. A stolen database therefore yields no usable token.

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{is_unique_violation, on_insert_error};
use crate::{Db, Result, StoreError, new_id, now_ms, on_pool, random_lower_alnum};

/// How stale `last_used_at` may be: a token used again within this is not written again.
pub const LAST_USED_RESOLUTION_MS: i64 = 60_000;

const TOKEN_PREFIX: &str = "lathe_";
const TOKEN_ID_LEN: usize = 12;
const TOKEN_SECRET_LEN: usize = 40;

/// A string that must not end up in logs: its `Debug` prints no part of it, and it has no
/// `Display`, so showing it takes a deliberate [`Secret::expose`].
///
/// Not `PartialEq`: comparing secrets is [`Db::authenticate`]'s job, in constant time.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

/// What may be shown about a token: everything but its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct TokenInfo {
    /// The public part, `lathe_<id>_…`.
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub admin: bool,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    /// The member it belongs to; `None` for a team token (see [`TokenInfo::manages_team`]).
    pub member_id: Option<String>,
    pub member_name: Option<String>,
    /// The member's role, `owner` or `member`.
    pub role: Option<String>,
}

impl TokenInfo {
    /// Whether this token may manage the team's members and revoke any of its tokens: an
    /// owner's token or a team token (a team's first token, made before it had members).
    pub fn manages_team(&self) -> bool {
        crate::members::manages_team(self.member_id.as_deref(), self.role.as_deref())
    }
}

#[derive(sqlx::FromRow)]
struct StoredToken {
    #[sqlx(flatten)]
    info: TokenInfo,
    secret_sha256: String,
}

/// Selects the columns of a [`TokenInfo`] (plus `extra`), from `api_tokens t` joined with
/// its member `m`.
macro_rules! token_select {
    ($($extra:literal)?) => {
        concat!(
            "SELECT t.id, t.team_id, t.name, t.admin, t.created_at, t.last_used_at, t.revoked_at, \
             t.member_id, m.name AS member_name, m.role", $(", ", $extra,)?
            " FROM api_tokens t LEFT JOIN members m ON m.id = t.member_id"
        )
    };
}

fn secret_sha256(secret: &str) -> String {
    lathe_util::hex(&Sha256::digest(secret.as_bytes()))
}

/// Splits `lathe_<id>_<secret>` into id and secret; `None` for anything else.
fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let id_ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let secret_ok = !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (id_ok && secret_ok).then_some((id, secret))
}

impl Db {
    /// A new team; team names are unique (`Conflict` otherwise).
    pub async fn create_team(&self, name: &str) -> Result<Team> {
        let team = Team {
            id: new_id("team"),
            name: name.to_owned(),
            created_at: now_ms(),
        };
        on_pool!(self, p => sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&team.id)
            .bind(&team.name)
            .bind(team.created_at)
            .execute(p)
            .await.map(|r| r.rows_affected()))
        .map_err(|e| match is_unique_violation(&e) {
            true => StoreError::Conflict(format!("a team named `{name}` already exists")),
            false => StoreError::Database(e),
        })?;
        Ok(team)
    }

    pub async fn teams(&self) -> Result<Vec<Team>> {
        let sql = "SELECT id, name, created_at FROM teams ORDER BY created_at, id";
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?)
    }

    /// Creates a token for a team, held by one of its members or (with `member_id` `None`)
    /// by the team itself, and returns it whole, the only time it is ever available: the
    /// database keeps the hash of its secret. `NotFound` for a member that is not an active
    /// member of the team.
    pub async fn create_token(
        &self,
        team_id: &str,
        member_id: Option<&str>,
        name: &str,
        admin: bool,
    ) -> Result<(TokenInfo, Secret)> {
        let member = match member_id {
            Some(id) => Some(self.member(team_id, id).await?),
            None => None,
        };
        if let Some(m) = member.as_ref().filter(|m| m.removed_at.is_some()) {
            return Err(StoreError::not_found("member", &m.id));
        }
        let id = random_lower_alnum(TOKEN_ID_LEN);
        let secret: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(TOKEN_SECRET_LEN)
            .map(char::from)
            .collect();
        let info = TokenInfo {
            id,
            team_id: team_id.to_owned(),
            name: name.to_owned(),
            admin,
            created_at: now_ms(),
            last_used_at: None,
            revoked_at: None,
            member_id: member.as_ref().map(|m| m.id.clone()),
            member_name: member.as_ref().map(|m| m.name.clone()),
            role: member.map(|m| m.role),
        };
        let sql = "INSERT INTO api_tokens (id, team_id, name, secret_sha256, admin, created_at, member_id) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7)";
        on_pool!(self, p => sqlx::query(sql)
            .bind(&info.id)
            .bind(&info.team_id)
            .bind(&info.name)
            .bind(secret_sha256(&secret))
            .bind(info.admin)
            .bind(info.created_at)
            .bind(&info.member_id)
            .execute(p)
            .await.map(|r| r.rows_affected()))
        .map_err(|e| {
            on_insert_error(
                e,
                || {
                    format!(
                        "token id `{}` already exists (a random collision; try again)",
                        info.id
                    )
                },
                || StoreError::not_found("team", team_id),
            )
        })?;
        let token = Secret(format!("{TOKEN_PREFIX}{}_{secret}", info.id));
        Ok((info, token))
    }

    /// The token's owner if `token` is a well-formed, known, unrevoked token whose secret
    /// matches; `None` otherwise (the caller answers 401 without saying which). Records the
    /// use in `last_used_at`, at most once per [`LAST_USED_RESOLUTION_MS`].
    pub async fn authenticate(&self, token: &str) -> Result<Option<TokenInfo>> {
        let Some((id, secret)) = parse_token(token) else {
            return Ok(None);
        };
        let sql = concat!(token_select!("t.secret_sha256"), " WHERE t.id = $1");
        let stored: Option<StoredToken> =
            on_pool!(self, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await)?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let matches: bool = secret_sha256(secret)
            .as_bytes()
            .ct_eq(stored.secret_sha256.as_bytes())
            .into();
        if !matches || stored.info.revoked_at.is_some() {
            return Ok(None);
        }
        let now = now_ms();
        if stored.info.last_used_at.is_some_and(|t| now - t < LAST_USED_RESOLUTION_MS) {
            // Used a moment ago: a read endpoint under load should not write on every
            // request, and `last_used_at` is only ever shown to the minute.
            return Ok(Some(stored.info));
        }
        // Re-checks revocation, so a token revoked a moment ago is refused.
        let used = on_pool!(self, p => sqlx::query(
            "UPDATE api_tokens SET last_used_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .bind(now)
            .execute(p)
            .await.map(|r| r.rows_affected()))?;
        if used == 0 {
            return Ok(None);
        }
        Ok(Some(TokenInfo {
            last_used_at: Some(now),
            ..stored.info
        }))
    }

    /// A team's tokens, oldest first, revoked ones included (with `revoked_at`).
    pub async fn tokens(&self, team_id: &str) -> Result<Vec<TokenInfo>> {
        let sql = concat!(
            token_select!(),
            " WHERE t.team_id = $1 ORDER BY t.created_at, t.id"
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(team_id).fetch_all(p).await)?)
    }

    /// Revokes a token of this team for good; revoking it again keeps the first time.
    /// `NotFound` when the team has no such token.
    pub async fn revoke_token(&self, team_id: &str, token_id: &str) -> Result<TokenInfo> {
        let sql = "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $3) WHERE id = $1 AND team_id = $2";
        let revoked = on_pool!(self, p => sqlx::query(sql).bind(token_id).bind(team_id).bind(now_ms()).execute(p).await.map(|r| r.rows_affected()))?;
        if revoked == 0 {
            return Err(StoreError::not_found("token", token_id));
        }
        self.token(team_id, token_id).await
    }

    /// One of the team's tokens; `NotFound` when it has no such token.
    pub async fn token(&self, team_id: &str, token_id: &str) -> Result<TokenInfo> {
        let sql = concat!(token_select!(), " WHERE t.id = $1 AND t.team_id = $2");
        let row: Option<TokenInfo> = on_pool!(self, p => sqlx::query_as(sql).bind(token_id).bind(team_id).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("token", token_id))
    }

    /// First start: on a database without any team, creates the team `admin` and an admin
    /// token, and returns the token (to be printed once). `None` once any team exists, also
    /// when another process won the race to create it.
    pub async fn ensure_admin(&self) -> Result<Option<Secret>> {
        let any: Option<String> = on_pool!(self, p => sqlx::query_scalar("SELECT id FROM teams LIMIT 1").fetch_optional(p).await)?;
        if any.is_some() {
            return Ok(None);
        }
        let team = match self.create_team("admin").await {
            Ok(team) => team,
            Err(StoreError::Conflict(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (_, token) = self
            .create_token(&team.id, None, "admin (first start)", true)
            .await?;
        Ok(Some(token))
    }
}
