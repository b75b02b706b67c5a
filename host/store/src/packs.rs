//! Eval packs in the store: a team's catalogue of uploaded packs (bytes in the artifact
//! store by sha256) and each project's installs. A pack's name and version name one sha256
//! forever within a team.

use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;

use crate::error::on_insert_error;
use crate::{Db, Result, StoreError, now_ms, on_pool};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PackRow {
    pub team_id: String,
    pub sha256: String,
    pub name: String,
    pub version: String,
    pub bytes: i64,
    pub created_at: i64,
}

/// One install of a pack into a project.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct ProjectPack {
    pub project_id: String,
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// What the install made (dataset versions and refs, suites, plugin pins).
    #[sqlx(json)]
    pub installed: Value,
    pub created_at: i64,
}

const PACK_COLUMNS: &str = "team_id, sha256, name, version, bytes, created_at";
const INSTALL_COLUMNS: &str = "project_id, name, version, sha256, installed, created_at";

impl Db {
    /// Adds a verified pack to a team's catalogue; adding the same bytes again returns the
    /// row. `Conflict` when the team has other bytes under the same name and version.
    pub async fn add_pack(&self, team_id: &str, sha256: &str, name: &str, version: &str, bytes: i64) -> Result<PackRow> {
        if let Some(row) = self.pack_opt(team_id, sha256).await? {
            return Ok(row);
        }
        let row = PackRow { team_id: team_id.into(), sha256: sha256.into(), name: name.into(), version: version.into(), bytes, created_at: now_ms() };
        let sql = "INSERT INTO packs (team_id, sha256, name, version, bytes, created_at) VALUES ($1, $2, $3, $4, $5, $6)";
        on_pool!(self, p => sqlx::query(sql)
            .bind(&row.team_id)
            .bind(&row.sha256)
            .bind(&row.name)
            .bind(&row.version)
            .bind(row.bytes)
            .bind(row.created_at)
            .execute(p)
            .await.map(|r| r.rows_affected()))
        .map_err(|e| {
            on_insert_error(
                e,
                || format!("pack {name}@{version} exists with other contents; a version is immutable, so give the new pack a new version"),
                || StoreError::not_found("team", team_id),
            )
        })?;
        Ok(row)
    }

    /// A team's uploaded packs by name, newest first within a name.
    pub async fn packs(&self, team_id: &str) -> Result<Vec<PackRow>> {
        let sql = format!("SELECT {PACK_COLUMNS} FROM packs WHERE team_id = $1 ORDER BY name, created_at DESC");
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(team_id).fetch_all(p).await)?)
    }

    pub async fn pack_opt(&self, team_id: &str, sha256: &str) -> Result<Option<PackRow>> {
        let sql = format!("SELECT {PACK_COLUMNS} FROM packs WHERE team_id = $1 AND sha256 = $2");
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(team_id).bind(sha256).fetch_optional(p).await)?)
    }

    /// Records that a project installed a pack.
    pub async fn add_project_pack(&self, project_id: &str, name: &str, version: &str, sha256: &str, installed: &Value) -> Result<ProjectPack> {
        let row = ProjectPack {
            project_id: project_id.into(),
            name: name.into(),
            version: version.into(),
            sha256: sha256.into(),
            installed: installed.clone(),
            created_at: now_ms(),
        };
        let sql = "INSERT INTO project_packs (project_id, name, version, sha256, installed, created_at) VALUES ($1, $2, $3, $4, $5, $6)";
        on_pool!(self, p => sqlx::query(sql)
            .bind(&row.project_id)
            .bind(&row.name)
            .bind(&row.version)
            .bind(&row.sha256)
            .bind(Json(&row.installed))
            .bind(row.created_at)
            .execute(p)
            .await.map(|r| r.rows_affected()))
        .map_err(|e| on_insert_error(e, || format!("pack `{name}` conflicts"), || StoreError::not_found("project", project_id)))?;
        Ok(row)
    }

    /// The packs a project has: the newest install of each name.
    pub async fn project_packs(&self, project_id: &str) -> Result<Vec<ProjectPack>> {
        let sql = format!(
            "SELECT {INSTALL_COLUMNS} FROM project_packs pp WHERE project_id = $1 \
             AND seq = (SELECT MAX(seq) FROM project_packs WHERE project_id = pp.project_id AND name = pp.name) ORDER BY name"
        );
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(project_id).fetch_all(p).await)?)
    }
}
