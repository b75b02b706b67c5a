//! The people of a team and their roles.
//!
//! An `owner` manages the team's members and may revoke any of its tokens; a `member` works
//! in the team's projects and manages only their own tokens. A team always keeps at least
//! one owner: demoting or removing the last one is refused. Removing a member keeps the row
//! (so the tokens and jobs they made still name them) and revokes their tokens, which ends
//! their browser sessions.

use serde::Serialize;

use crate::error::on_insert_error;
use crate::{Db, Result, StoreError, new_id, now_ms, on_pool};

pub const OWNER: &str = "owner";
pub const MEMBER: &str = "member";

/// The roles a member may have.
pub const ROLES: [&str; 2] = [OWNER, MEMBER];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Member {
    pub id: String,
    pub team_id: String,
    pub name: String,
    /// `owner` or `member`.
    pub role: String,
    pub created_at: i64,
    pub removed_at: Option<i64>,
}

/// Whether a token held by `member_id` with `role` may manage the team: an owner's token, or
/// a team token (no member).
pub(crate) fn manages_team(member_id: Option<&str>, role: Option<&str>) -> bool {
    match member_id {
        None => true,
        Some(_) => role == Some(OWNER),
    }
}

const MEMBER_COLUMNS: &str = "id, team_id, name, role, created_at, removed_at";

fn check_role(role: &str) -> Result<()> {
    match ROLES.contains(&role) {
        true => Ok(()),
        false => Err(StoreError::Invalid(format!(
            "role `{role}`: a member is an `owner` or a `member`"
        ))),
    }
}

impl Db {
    /// Adds a member to a team. `Conflict` when an active member already has the name,
    /// `NotFound` for a team that does not exist, `Invalid` for a role that is not one.
    pub async fn create_member(&self, team_id: &str, name: &str, role: &str) -> Result<Member> {
        check_role(role)?;
        let member = Member {
            id: new_id("member"),
            team_id: team_id.to_owned(),
            name: name.to_owned(),
            role: role.to_owned(),
            created_at: now_ms(),
            removed_at: None,
        };
        let sql = "INSERT INTO members (id, team_id, name, role, created_at) VALUES ($1, $2, $3, $4, $5)";
        on_pool!(self, p => sqlx::query(sql)
            .bind(&member.id)
            .bind(&member.team_id)
            .bind(&member.name)
            .bind(&member.role)
            .bind(member.created_at)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(|e| {
            on_insert_error(
                e,
                || format!("the team already has a member named `{name}`"),
                || StoreError::not_found("team", team_id),
            )
        })?;
        Ok(member)
    }

    /// A team's members, removed ones included (with `removed_at`), oldest first.
    pub async fn members(&self, team_id: &str) -> Result<Vec<Member>> {
        let sql = format!(
            "SELECT {MEMBER_COLUMNS} FROM members WHERE team_id = $1 ORDER BY created_at, id"
        );
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(team_id).fetch_all(p).await)?)
    }

    /// One member of a team, removed or not; `NotFound` when the team has no such member.
    pub async fn member(&self, team_id: &str, member_id: &str) -> Result<Member> {
        let sql = format!("SELECT {MEMBER_COLUMNS} FROM members WHERE id = $1 AND team_id = $2");
        let row: Option<Member> = on_pool!(self, p => sqlx::query_as(&sql).bind(member_id).bind(team_id).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("member", member_id))
    }

    /// Gives an active member another role. `Conflict` when that would leave the team
    /// without an owner.
    pub async fn set_member_role(&self, team_id: &str, member_id: &str, role: &str) -> Result<Member> {
        check_role(role)?;
        self.change_member(team_id, member_id, Change::Role(role)).await
    }

    /// Removes an active member and revokes every token they hold. `Conflict` when they are
    /// the team's last owner.
    pub async fn remove_member(&self, team_id: &str, member_id: &str) -> Result<Member> {
        self.change_member(team_id, member_id, Change::Remove).await
    }

    /// Makes one change to an active member in a transaction that first locks the team row,
    /// so that two owners demoting each other at once cannot leave the team without one.
    async fn change_member(&self, team_id: &str, member_id: &str, change: Change<'_>) -> Result<Member> {
        let now = now_ms();
        let select = format!(
            "SELECT {MEMBER_COLUMNS} FROM members WHERE id = $1 AND team_id = $2 AND removed_at IS NULL"
        );
        let owners = "SELECT COUNT(*) FROM members WHERE team_id = $1 AND role = 'owner' AND removed_at IS NULL";
        on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            // Writes first: takes SQLite's write lock and PostgreSQL's row lock on the team.
            sqlx::query("UPDATE teams SET name = name WHERE id = $1").bind(team_id).execute(&mut *tx).await?;
            let member: Option<Member> = sqlx::query_as(&select).bind(member_id).bind(team_id).fetch_optional(&mut *tx).await?;
            let member = member.ok_or_else(|| StoreError::not_found("member", member_id))?;
            let loses_owner = member.role == OWNER && !matches!(change, Change::Role(OWNER));
            if loses_owner {
                let count: i64 = sqlx::query_scalar(owners).bind(team_id).fetch_one(&mut *tx).await?;
                if count <= 1 {
                    return Err(StoreError::Conflict(format!(
                        "`{}` is the team's last owner; make another member an owner first",
                        member.name
                    )));
                }
            }
            match change {
                Change::Role(role) => {
                    sqlx::query("UPDATE members SET role = $2 WHERE id = $1").bind(member_id).bind(role).execute(&mut *tx).await?;
                }
                Change::Remove => {
                    sqlx::query("UPDATE members SET removed_at = $2 WHERE id = $1").bind(member_id).bind(now).execute(&mut *tx).await?;
                    sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE member_id = $1")
                        .bind(member_id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok::<_, StoreError>(())
        }.await)?;
        self.member(team_id, member_id).await
    }
}

enum Change<'a> {
    Role(&'a str),
    Remove,
}
