//! What every handler and worker shares: the store, the artifact folder, the data folder
//! the projects' job environments live in, and the configured base models.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use lathe_jobs::Env;
use lathe_store::{ArtifactStore, Db, LocalArtifacts, Project};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the SQLite database (by default), artifacts and project folders live.
    pub data_dir: PathBuf,
    /// Base models jobs may name: name → GGUF file or Hugging Face folder.
    pub models: BTreeMap<String, PathBuf>,
    /// `cpu`, `cuda[:N]`, `wgpu`.
    pub device: String,
    /// The largest upload accepted (files, plugins), in bytes.
    pub max_upload_bytes: usize,
    /// Files a project may hold.
    pub max_files_per_project: usize,
    /// How long a worker's claim on a job lasts without a heartbeat.
    pub lease: Duration,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let mut models = BTreeMap::new();
        models.insert("smollm2-135m-instruct".to_string(), PathBuf::from(lathe_jobs::DEFAULT_MODEL));
        Self {
            data_dir: data_dir.into(),
            models,
            device: "cpu".into(),
            max_upload_bytes: 512 << 20,
            max_files_per_project: 1000,
            lease: Duration::from_secs(30),
        }
    }
}

pub struct AppState {
    pub config: ServerConfig,
    pub db: Db,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// HTTP requests served, for `/metrics`.
    pub requests: AtomicU64,
}

impl AppState {
    /// Opens the store (`database_url`, or SQLite in the data folder) and the artifact
    /// folder, running migrations.
    pub async fn open(config: ServerConfig, database_url: Option<&str>) -> ApiResult<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir)?;
        let db = match database_url {
            Some(url) => Db::connect(url).await?,
            None => Db::open_embedded(&config.data_dir).await?,
        };
        let artifacts = Arc::new(LocalArtifacts::new(config.data_dir.join("artifacts"))?);
        Ok(Arc::new(Self { config, db, artifacts, requests: AtomicU64::new(0) }))
    }

    /// The project if the caller's team owns it; another team's project is 404, as if it
    /// did not exist.
    pub async fn project(&self, caller: &Caller, id: &str) -> ApiResult<Project> {
        Ok(self.db.project(&caller.team_id, id).await?)
    }

    /// A project's folder: its dataset versions, eval runs, training runs.
    pub fn project_dir(&self, project_id: &str) -> PathBuf {
        self.config.data_dir.join("projects").join(project_id)
    }

    /// The job environment of a project: its folder, the server's device, and the
    /// project's plugins by name (no plugin name reaches the filesystem).
    pub async fn env(&self, project_id: &str) -> ApiResult<Env> {
        let device = lathe_engine::device::parse_device(&self.config.device).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut plugins = HashMap::new();
        for p in self.db.plugins(project_id).await? {
            plugins.insert(p.name.clone(), self.artifacts.get_path(&p.sha256)?);
        }
        Ok(Env::new(self.project_dir(project_id), device).with_project_plugins(plugins))
    }

    /// The path of a configured base model.
    pub fn model(&self, name: &str) -> ApiResult<&Path> {
        self.config.models.get(name).map(PathBuf::as_path).ok_or_else(|| {
            ApiError::bad(format!(
                "unknown model `{name}`; this server has {}",
                self.config.models.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            ))
        })
    }
}
