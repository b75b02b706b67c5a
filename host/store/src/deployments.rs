//! Deploy aliases and their history. A project names a served version (`invoices/prod`):
//! a base model, and the training job whose adapter runs over it. Every deploy and every
//! rollback appends a row, so the history is complete; the newest row of a name is what
//! it serves. A rollback serves again what the current row replaced, in one call.

use serde::Serialize;

use crate::error::on_insert_error;
use crate::{Db, Result, StoreError, new_id, now_ms, on_pool};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Deployment {
    pub id: String,
    pub project_id: String,
    pub name: String,
    /// 1 for a name's first row, then one more per deploy or rollback.
    pub seq: i64,
    /// The base model's configured name.
    pub model: String,
    /// The training job whose adapter runs over the base; None for the base alone.
    pub job_id: Option<String>,
    /// The eval run whose gate this version passed; None when deployed with `forced`.
    pub eval_job_id: Option<String>,
    pub forced: bool,
    /// `deploy` or `rollback`.
    pub action: String,
    /// The row this one took over from: what a rollback returns to.
    pub replaces: Option<String>,
    pub created_at: i64,
    /// The token that made the change.
    pub created_by: Option<String>,
}

/// What a deploy points a name at.
#[derive(Clone, Debug, Default)]
pub struct NewDeployment {
    pub project_id: String,
    pub name: String,
    pub model: String,
    pub job_id: Option<String>,
    pub eval_job_id: Option<String>,
    pub forced: bool,
    pub created_by: Option<String>,
}

const COLUMNS: &str = "id, project_id, name, seq, model, job_id, eval_job_id, forced, action, replaces, created_at, created_by";

/// A deploy name: lower-case letters, digits, `.`, `_` and `-`, 1 to 64 of them, starting
/// with a letter or digit (it appears in model ids as `project/name`).
pub fn check_deploy_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    match ok {
        true => Ok(()),
        false => Err(StoreError::Invalid(format!(
            "deploy name `{name}`: use 1-64 lower-case letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        ))),
    }
}

impl Db {
    /// Points `name` at a new version; the row it replaces is what a rollback returns to.
    /// `Conflict` when another change to the name landed at the same moment.
    pub async fn deploy(&self, d: &NewDeployment) -> Result<Deployment> {
        check_deploy_name(&d.name)?;
        let current = self.deployment_opt(&d.project_id, &d.name).await?;
        self.append(d, "deploy", current.as_ref().map_or(1, |c| c.seq + 1), current.map(|c| c.id)).await
    }

    /// Serves again what the current version replaced. `Conflict` when there is nothing
    /// before it.
    pub async fn rollback(&self, project_id: &str, name: &str, created_by: Option<&str>) -> Result<Deployment> {
        let current = self.deployment(project_id, name).await?;
        let Some(prev_id) = &current.replaces else {
            return Err(StoreError::Conflict(format!("`{name}` has no earlier version to roll back to")));
        };
        let prev = self.deployment_row(project_id, prev_id).await?;
        let d = NewDeployment {
            project_id: project_id.into(),
            name: name.into(),
            model: prev.model,
            job_id: prev.job_id,
            eval_job_id: prev.eval_job_id,
            forced: prev.forced,
            created_by: created_by.map(str::to_string),
        };
        self.append(&d, "rollback", current.seq + 1, prev.replaces).await
    }

    async fn append(&self, d: &NewDeployment, action: &str, seq: i64, replaces: Option<String>) -> Result<Deployment> {
        let row = Deployment {
            id: new_id("deploy"),
            project_id: d.project_id.clone(),
            name: d.name.clone(),
            seq,
            model: d.model.clone(),
            job_id: d.job_id.clone(),
            eval_job_id: d.eval_job_id.clone(),
            forced: d.forced,
            action: action.into(),
            replaces,
            created_at: now_ms(),
            created_by: d.created_by.clone(),
        };
        let sql = format!("INSERT INTO deployments ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)");
        on_pool!(self, p => sqlx::query(&sql)
            .bind(&row.id)
            .bind(&row.project_id)
            .bind(&row.name)
            .bind(row.seq)
            .bind(&row.model)
            .bind(&row.job_id)
            .bind(&row.eval_job_id)
            .bind(row.forced)
            .bind(&row.action)
            .bind(&row.replaces)
            .bind(row.created_at)
            .bind(&row.created_by)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(|e| {
            on_insert_error(
                e,
                || format!("`{}` changed at the same moment; look at it again and retry", d.name),
                || StoreError::not_found("project or job", &d.project_id),
            )
        })?;
        Ok(row)
    }

    /// What `name` serves now; `NotFound` when it was never deployed.
    pub async fn deployment(&self, project_id: &str, name: &str) -> Result<Deployment> {
        self.deployment_opt(project_id, name).await?.ok_or_else(|| StoreError::not_found("deployment", name))
    }

    async fn deployment_opt(&self, project_id: &str, name: &str) -> Result<Option<Deployment>> {
        let sql = format!("SELECT {COLUMNS} FROM deployments WHERE project_id = $1 AND name = $2 ORDER BY seq DESC LIMIT 1");
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(project_id).bind(name).fetch_optional(p).await)?)
    }

    async fn deployment_row(&self, project_id: &str, id: &str) -> Result<Deployment> {
        let sql = format!("SELECT {COLUMNS} FROM deployments WHERE project_id = $1 AND id = $2");
        let row: Option<Deployment> = on_pool!(self, p => sqlx::query_as(&sql).bind(project_id).bind(id).fetch_optional(p).await)?;
        row.ok_or_else(|| StoreError::not_found("deployment", id))
    }

    /// Every name of a project with what it serves now, by name.
    pub async fn deployments(&self, project_id: &str) -> Result<Vec<Deployment>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM deployments d WHERE project_id = $1 \
             AND seq = (SELECT MAX(seq) FROM deployments e WHERE e.project_id = d.project_id AND e.name = d.name) ORDER BY name"
        );
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(project_id).fetch_all(p).await)?)
    }

    /// A name's rows, newest first.
    pub async fn deployment_history(&self, project_id: &str, name: &str) -> Result<Vec<Deployment>> {
        let sql = format!("SELECT {COLUMNS} FROM deployments WHERE project_id = $1 AND name = $2 ORDER BY seq DESC");
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(project_id).bind(name).fetch_all(p).await)?)
    }
}
