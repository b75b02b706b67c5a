//! Projects and the metadata rows they own: uploaded files, plugins and eval suites. The
//! bytes themselves live in the artifact store; rows point at them by sha256.
//!
//! Calls that take a `project_id` trust it: the server first resolves the project with
//! [`Db::project`] for the caller's team, which is where another team's project is refused.

use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;

use crate::error::{is_unique_violation, on_insert_error};
use crate::{Db, Result, StoreError, new_id, now_ms, on_pool};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Project {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub description: String,
    pub created_at: i64,
}

/// An upload to register: the artifact `sha256` (already in the artifact store) under a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewFile {
    pub filename: String,
    /// OpenAI's `purpose` (`fine-tune`, …) or Lathe's (`dataset`).
    pub purpose: String,
    pub bytes: i64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct FileRow {
    pub id: String,
    pub project_id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: i64,
}

/// A validated plugin component to register, as its `info()` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewPlugin {
    pub name: String,
    /// The WIT world: `formatter`, `validator`, `scorer` or `judge`.
    pub kind: String,
    pub version: String,
    /// The component's bytes in the artifact store.
    pub sha256: String,
    pub size: i64,
    pub config_schema: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct PluginRow {
    pub project_id: String,
    pub name: String,
    pub kind: String,
    pub version: String,
    pub sha256: String,
    pub size: i64,
    #[sqlx(json)]
    pub config_schema: Value,
    pub created_at: i64,
}

/// One version of an eval suite; every [`Db::put_suite`] adds the next version.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct SuiteRow {
    pub project_id: String,
    pub name: String,
    pub version: i32,
    #[sqlx(json)]
    pub definition: Value,
    pub created_at: i64,
}

macro_rules! file_columns {
    () => {
        "id, project_id, filename, purpose, bytes, sha256, created_at"
    };
}
macro_rules! plugin_columns {
    () => {
        "project_id, name, kind, version, sha256, size, config_schema, created_at"
    };
}
macro_rules! suite_columns {
    () => {
        "project_id, name, version, definition, created_at"
    };
}

/// How often [`Db::put_suite`] (and a pack install) retries when a concurrent put took the
/// same version number.
pub(crate) const SUITE_PUT_TRIES: usize = 5;

/// Registers a plugin version: $1 project, $2 name, $3 kind, $4 version, $5 sha256, $6 size,
/// $7 config schema, $8 created at. The same bytes again are a no-op.
pub(crate) const PLUGIN_INSERT: &str = "INSERT INTO plugins (project_id, name, kind, version, sha256, size, config_schema, created_at) \
                                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                                        ON CONFLICT (project_id, sha256) DO NOTHING";

/// [`PLUGIN_INSERT`] with its parameters bound, on either backend's query type.
macro_rules! bind_plugin {
    ($query:expr, $project_id:expr, $plugin:expr, $created_at:expr) => {
        $query
            .bind($project_id)
            .bind(&$plugin.name)
            .bind(&$plugin.kind)
            .bind(&$plugin.version)
            .bind(&$plugin.sha256)
            .bind($plugin.size)
            .bind(sqlx::types::Json(&$plugin.config_schema))
            .bind($created_at)
    };
}
pub(crate) use bind_plugin;

/// Adds the next version of a suite: $1 project, $2 name, $3 definition, $4 created at.
pub(crate) const SUITE_INSERT: &str = "INSERT INTO eval_suites (project_id, name, version, definition, created_at) \
                                       SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4 \
                                       FROM eval_suites WHERE project_id = $1 AND name = $2";

impl Db {
    /// A new project of a team; `Conflict` when the team already has one of that name.
    pub async fn create_project(
        &self,
        team_id: &str,
        name: &str,
        description: &str,
    ) -> Result<Project> {
        let project = Project {
            id: new_id("proj"),
            team_id: team_id.to_owned(),
            name: name.to_owned(),
            description: description.to_owned(),
            created_at: now_ms(),
        };
        let sql = "INSERT INTO projects (id, team_id, name, description, created_at) VALUES ($1, $2, $3, $4, $5)";
        on_pool!(self, p => sqlx::query(sql)
            .bind(&project.id)
            .bind(&project.team_id)
            .bind(&project.name)
            .bind(&project.description)
            .bind(project.created_at)
            .execute(p)
            .await.map(|r| r.rows_affected()))
        .map_err(|e| {
            on_insert_error(
                e,
                || format!("team `{team_id}` already has a project named `{name}`"),
                || StoreError::not_found("team", team_id),
            )
        })?;
        Ok(project)
    }

    /// A team's projects by name.
    pub async fn projects(&self, team_id: &str) -> Result<Vec<Project>> {
        let sql = "SELECT id, team_id, name, description, created_at FROM projects WHERE team_id = $1 ORDER BY name";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(team_id).fetch_all(p).await)?)
    }

    /// The project if it belongs to `team_id`; `NotFound` both when it does not exist and
    /// when it is another team's, so the server answers 404 and leaks nothing.
    pub async fn project(&self, team_id: &str, project_id: &str) -> Result<Project> {
        let sql = "SELECT id, team_id, name, description, created_at FROM projects WHERE id = $1 AND team_id = $2";
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(project_id).bind(team_id).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("project", project_id))
    }

    pub async fn add_file(&self, project_id: &str, file: NewFile) -> Result<FileRow> {
        let row = FileRow {
            id: new_id("file"),
            project_id: project_id.to_owned(),
            filename: file.filename,
            purpose: file.purpose,
            bytes: file.bytes,
            sha256: file.sha256,
            created_at: now_ms(),
        };
        let sql = concat!(
            "INSERT INTO files (",
            file_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
        );
        on_pool!(self, p => sqlx::query(sql)
            .bind(&row.id)
            .bind(&row.project_id)
            .bind(&row.filename)
            .bind(&row.purpose)
            .bind(row.bytes)
            .bind(&row.sha256)
            .bind(row.created_at)
            .execute(p)
            .await.map(|r| r.rows_affected()))
        .map_err(|e| {
            on_insert_error(
                e,
                || format!("file id `{}` already exists", row.id),
                || StoreError::not_found("project", project_id),
            )
        })?;
        Ok(row)
    }

    /// A project's files, oldest first.
    pub async fn files(&self, project_id: &str) -> Result<Vec<FileRow>> {
        let sql = concat!(
            "SELECT ",
            file_columns!(),
            " FROM files WHERE project_id = $1 ORDER BY seq"
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(project_id).fetch_all(p).await)?)
    }

    pub async fn file(&self, project_id: &str, id: &str) -> Result<FileRow> {
        let sql = concat!(
            "SELECT ",
            file_columns!(),
            " FROM files WHERE project_id = $1 AND id = $2"
        );
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(project_id).bind(id).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("file", id))
    }

    /// Removes the row and returns it. The artifact stays: other rows may share its bytes.
    pub async fn delete_file(&self, project_id: &str, id: &str) -> Result<FileRow> {
        let sql = concat!(
            "DELETE FROM files WHERE project_id = $1 AND id = $2 RETURNING ",
            file_columns!()
        );
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(project_id).bind(id).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("file", id))
    }

    /// Registers a plugin version. Uploading the same component (same sha256) again returns
    /// the row already there instead of a duplicate.
    pub async fn add_plugin(&self, project_id: &str, plugin: NewPlugin) -> Result<PluginRow> {
        on_pool!(self, p => bind_plugin!(sqlx::query(PLUGIN_INSERT), project_id, plugin, now_ms())
            .execute(p)
            .await.map(|r| r.rows_affected()))
        .map_err(|e| {
            on_insert_error(
                e,
                || format!("plugin `{}` conflicts", plugin.name),
                || StoreError::not_found("project", project_id),
            )
        })?;
        let select = concat!(
            "SELECT ",
            plugin_columns!(),
            " FROM plugins WHERE project_id = $1 AND sha256 = $2"
        );
        let row = on_pool!(self, p => sqlx::query_as(select).bind(project_id).bind(&plugin.sha256).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("plugin", &plugin.sha256))
    }

    /// Every plugin version of a project, by name, newest version first within a name.
    pub async fn plugins(&self, project_id: &str) -> Result<Vec<PluginRow>> {
        let sql = concat!(
            "SELECT ",
            plugin_columns!(),
            " FROM plugins WHERE project_id = $1 ORDER BY name, seq DESC"
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(project_id).fetch_all(p).await)?)
    }

    /// The plugin with this sha256, or else the newest version with this name.
    pub async fn plugin(&self, project_id: &str, name_or_sha: &str) -> Result<PluginRow> {
        let sql = concat!(
            "SELECT ",
            plugin_columns!(),
            " FROM plugins WHERE project_id = $1 AND (sha256 = $2 OR name = $2) \
             ORDER BY CASE WHEN sha256 = $2 THEN 0 ELSE 1 END, seq DESC LIMIT 1"
        );
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(project_id).bind(name_or_sha).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("plugin", name_or_sha))
    }

    /// Stores `definition` as the next version of the suite `name` (1 for a new suite).
    pub async fn put_suite(
        &self,
        project_id: &str,
        name: &str,
        definition: Value,
    ) -> Result<SuiteRow> {
        let sql = format!("{SUITE_INSERT} RETURNING {}", suite_columns!());
        // Two concurrent puts on PostgreSQL can read the same MAX(version); the primary key
        // refuses the second, which then reads again.
        let mut tries = 0;
        loop {
            tries += 1;
            let inserted = on_pool!(self, p => sqlx::query_as(&sql)
                .bind(project_id)
                .bind(name)
                .bind(Json(&definition))
                .bind(now_ms())
                .fetch_one(p)
                .await);
            match inserted {
                Ok(row) => return Ok(row),
                Err(e) if is_unique_violation(&e) && tries < SUITE_PUT_TRIES => continue,
                Err(e) => {
                    return Err(on_insert_error(
                        e,
                        || {
                            format!(
                                "eval suite `{name}`: {SUITE_PUT_TRIES} concurrent puts raced for one version"
                            )
                        },
                        || StoreError::not_found("project", project_id),
                    ));
                }
            }
        }
    }

    /// The newest version of each of a project's suites, by name.
    pub async fn suites(&self, project_id: &str) -> Result<Vec<SuiteRow>> {
        let sql = concat!(
            "SELECT ",
            suite_columns!(),
            " FROM eval_suites s WHERE project_id = $1 \
             AND version = (SELECT MAX(version) FROM eval_suites WHERE project_id = s.project_id AND name = s.name) \
             ORDER BY name"
        );
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(project_id).fetch_all(p).await)?)
    }

    /// The newest version of a suite.
    pub async fn suite(&self, project_id: &str, name: &str) -> Result<SuiteRow> {
        let sql = concat!(
            "SELECT ",
            suite_columns!(),
            " FROM eval_suites WHERE project_id = $1 AND name = $2 ORDER BY version DESC LIMIT 1"
        );
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(project_id).bind(name).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("eval suite", name))
    }

    /// One exact version of a suite, as a run that used it recorded it.
    pub async fn suite_version(
        &self,
        project_id: &str,
        name: &str,
        version: i32,
    ) -> Result<SuiteRow> {
        let sql = concat!(
            "SELECT ",
            suite_columns!(),
            " FROM eval_suites WHERE project_id = $1 AND name = $2 AND version = $3"
        );
        let row = on_pool!(self, p => sqlx::query_as(sql).bind(project_id).bind(name).bind(version).fetch_optional(p).await)?;
        row.ok_or_else(|| {
            StoreError::not_found("eval suite version", &format!("{name} v{version}"))
        })
    }
}
