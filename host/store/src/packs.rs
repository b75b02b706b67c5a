//! Eval packs in the store: a team's catalogue of uploaded packs (bytes in the artifact
//! store by sha256) and each project's installs. A pack's name and version name one sha256
//! forever within a team.

use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;

use crate::error::{is_unique_violation, on_insert_error};
use crate::projects::{PLUGIN_INSERT, SUITE_INSERT, SUITE_PUT_TRIES, bind_plugin};
use crate::{Db, NewPlugin, Result, StoreError, now_ms, on_pool};

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
const INSTALL_INSERT: &str = "INSERT INTO project_packs (project_id, name, version, sha256, installed, created_at) VALUES ($1, $2, $3, $4, $5, $6)";

/// What installing a pack writes into a project: its plugins, a new version of each of its
/// suites, and the install record.
#[derive(Clone, Debug)]
pub struct PackInstall {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub plugins: Vec<NewPlugin>,
    /// Each suite's name and definition.
    pub suites: Vec<(String, Value)>,
    /// What the install made (see [`ProjectPack::installed`]).
    pub installed: Value,
}

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

    /// Installs a pack into a project in one transaction: its plugins (the same bytes again
    /// are kept once), the next version of each of its suites, and the install record. An
    /// error, or a crash, leaves none of them, so a project never lists half a pack and a
    /// retry starts clean.
    pub async fn install_pack(&self, project_id: &str, pack: &PackInstall) -> Result<ProjectPack> {
        let row = ProjectPack {
            project_id: project_id.into(),
            name: pack.name.clone(),
            version: pack.version.clone(),
            sha256: pack.sha256.clone(),
            installed: pack.installed.clone(),
            created_at: now_ms(),
        };
        let mut tries = 0;
        loop {
            tries += 1;
            let attempt = on_pool!(self, p => async {
                let mut tx = p.begin().await?;
                // A write first: takes SQLite's write lock at once, and PostgreSQL's row lock
                // on the project, so two installs into one project run one after the other.
                let project = sqlx::query("UPDATE projects SET name = name WHERE id = $1").bind(project_id).execute(&mut *tx).await?;
                if project.rows_affected() == 0 {
                    return Ok(false);
                }
                for plugin in &pack.plugins {
                    bind_plugin!(sqlx::query(PLUGIN_INSERT), project_id, plugin, row.created_at).execute(&mut *tx).await?;
                }
                for (name, definition) in &pack.suites {
                    sqlx::query(SUITE_INSERT).bind(project_id).bind(name).bind(Json(definition)).bind(row.created_at).execute(&mut *tx).await?;
                }
                sqlx::query(INSTALL_INSERT)
                    .bind(&row.project_id)
                    .bind(&row.name)
                    .bind(&row.version)
                    .bind(&row.sha256)
                    .bind(Json(&row.installed))
                    .bind(row.created_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            }.await);
            match attempt {
                Ok(true) => return Ok(row),
                Ok(false) => return Err(StoreError::not_found("project", project_id)),
                // A suite put outside the project lock took the same version number.
                Err(e) if is_unique_violation(&e) && tries < SUITE_PUT_TRIES => continue,
                Err(e) => {
                    return Err(on_insert_error(
                        e,
                        || format!("pack {}@{}: {SUITE_PUT_TRIES} concurrent suite puts raced the install for one version", pack.name, pack.version),
                        || StoreError::not_found("project", project_id),
                    ));
                }
            }
        }
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
