//! What every handler and worker shares: the store, the artifact folder, the data folder
//! the projects' job environments live in, and the configured base models.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use lathe_jobs::Env;
use lathe_store::{ArtifactStore, Db, JobRow, LocalArtifacts, Project, S3Artifacts};
use serde_json::Value;

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
    /// The memory this process's workers announce, in MiB (a GPU's, on a GPU worker);
    /// the host's total memory when not given.
    pub memory_mb: Option<i64>,
    /// What each served model's scheduler takes on (`/v1/chat/completions`).
    pub serving: lathe_serving::ServeConfig,
    /// An S3-compatible bucket for artifacts (cached in the data folder); `None`: the data
    /// folder holds them.
    pub artifacts: Option<lathe_store::S3Config>,
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
            memory_mb: None,
            serving: lathe_serving::ServeConfig::default(),
            artifacts: None,
        }
    }
}

pub struct AppState {
    pub config: ServerConfig,
    pub db: Db,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// HTTP requests served, for `/metrics`.
    pub requests: AtomicU64,
    /// The models served by the inference API, started on first use.
    pub serving: crate::inference::Serving,
    /// What [`AppState::redact`] replaces, and with what: made once, it runs on every
    /// event streamed.
    redactions: Vec<(String, String)>,
}

/// Runs blocking work (file and object-store I/O, parsing) off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

/// This machine's name, as workers announce it.
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "host".into())
}

/// The host's total memory in MiB (Linux `MemTotal`), 0 when it cannot be read.
fn host_memory_mb() -> i64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = info.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok());
    kib.map_or(0, |k| k / 1024)
}

/// The kind a `--device` value announces, one of [`crate::api::DEVICE_KINDS`] (what a job's
/// `needs.device` names); the engine's device parser is the one place that knows the names.
pub use lathe_engine::device::device_kind;

impl AppState {
    /// What this process's workers can run: the device kind ([`device_kind`]) and the
    /// memory the configuration gives, else the host's.
    pub fn capabilities(&self) -> lathe_store::Capabilities {
        let kind = device_kind(&self.config.device).to_string();
        lathe_store::Capabilities { device: kind, memory_mb: self.config.memory_mb.unwrap_or_else(host_memory_mb) }
    }

    /// Opens the store (`database_url`, or SQLite in the data folder) and the artifact
    /// folder, running migrations.
    pub async fn open(mut config: ServerConfig, database_url: Option<&str>) -> ApiResult<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir)?;
        // Absolute, so that the paths jobs write are recognised by `redact`.
        config.data_dir = std::fs::canonicalize(&config.data_dir)?;
        let db = match database_url {
            Some(url) => Db::connect(url).await?,
            None => Db::open_embedded(&config.data_dir).await?,
        };
        let local = LocalArtifacts::new(config.data_dir.join("artifacts"))?;
        let artifacts: Arc<dyn ArtifactStore> = match config.artifacts.clone() {
            None => Arc::new(local),
            // Opening checks the bucket, waiting while it does not answer: off the runtime.
            Some(s3) => Arc::new(blocking(move || Ok(S3Artifacts::open(&s3, local)?)).await?),
        };
        // Model paths first: a model may live in the data folder.
        let models = config.models.iter().map(|(name, path)| (path.display().to_string(), name.clone()));
        let redactions = models.chain([(format!("{}/", config.data_dir.display()), String::new())]).filter(|(from, _)| !from.is_empty()).collect();
        let serving = crate::inference::Serving::new(config.serving.clone());
        Ok(Arc::new(Self { config, db, artifacts, requests: AtomicU64::new(0), serving, redactions }))
    }

    /// The project if the caller's team owns it; another team's project is 404, as if it
    /// did not exist.
    pub async fn project(&self, caller: &Caller, id: &str) -> ApiResult<Project> {
        Ok(self.db.project(&caller.team_id, id).await?)
    }

    /// A local file with an artifact's bytes (downloaded first from an object store, off
    /// the runtime).
    pub async fn artifact_path(&self, sha256: &str) -> ApiResult<PathBuf> {
        let (artifacts, sha256) = (self.artifacts.clone(), sha256.to_owned());
        blocking(move || Ok(artifacts.get_path(&sha256)?)).await
    }

    /// A project's folder: its dataset versions, eval runs, training runs.
    pub fn project_dir(&self, project_id: &str) -> PathBuf {
        self.config.data_dir.join("projects").join(project_id)
    }

    /// The job environment of a project with its plugins as they are now (the newest
    /// upload of each name).
    pub async fn env(&self, project_id: &str) -> ApiResult<Env> {
        let pins = self.plugin_pins(project_id).await?;
        self.env_pinned(project_id, &pins).await
    }

    /// The environment a queued job runs in: the plugin hashes pinned when it was queued
    /// (jobs queued before pinning existed get the newest uploads).
    pub async fn job_env(&self, job: &JobRow) -> ApiResult<Env> {
        match job.plugins.is_empty() {
            true => self.env(&job.project_id).await,
            false => self.env_pinned(&job.project_id, &job.plugins).await,
        }
    }

    /// The project's plugins as a job pins them: name → sha256 of the newest upload.
    pub async fn plugin_pins(&self, project_id: &str) -> ApiResult<BTreeMap<String, String>> {
        let mut pins = BTreeMap::new();
        // Newest first within a name: the first of each name is kept.
        for p in self.db.plugins(project_id).await? {
            pins.entry(p.name).or_insert(p.sha256);
        }
        Ok(pins)
    }

    /// A project's folder, the server's device, the given plugins by name (no plugin name
    /// reaches the filesystem), and every version of the project's plugins by sha256, for
    /// suites that pin one (a pack's suites pin all theirs).
    async fn env_pinned(&self, project_id: &str, pins: &BTreeMap<String, String>) -> ApiResult<Env> {
        let device = lathe_engine::device::parse_device(&self.config.device).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut plugins = HashMap::new();
        for (name, sha256) in pins {
            plugins.insert(name.clone(), self.artifact_path(sha256).await?);
        }
        let mut versions = HashMap::new();
        for p in self.db.plugins(project_id).await? {
            let path = self.artifact_path(&p.sha256).await?;
            versions.insert(p.sha256, path);
        }
        Ok(Env::new(self.project_dir(project_id), device).with_project_plugins(plugins).with_plugin_versions(versions))
    }

    /// Text as a team may see it: the server's own paths are not theirs to know, so a
    /// configured model's path becomes its name and a path in the data folder becomes
    /// relative to it (`projects/<id>/runs/<job>/adapter`). Job specs, outcomes, events,
    /// runs and reports go through this on their way out.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (from, to) in &self.redactions {
            if out.contains(from.as_str()) {
                out = Cow::Owned(out.replace(from.as_str(), to));
            }
        }
        out
    }

    /// [`AppState::redact`] on every string in a JSON value.
    pub fn redact_json(&self, value: &mut Value) {
        match value {
            Value::String(s) => {
                if let Cow::Owned(r) = self.redact(s) {
                    *s = r;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            Value::Object(map) => map.values_mut().for_each(|v| self.redact_json(v)),
            _ => {}
        }
    }

    /// A job row with its spec, outcome and error redacted.
    pub fn public_job(&self, mut row: JobRow) -> JobRow {
        self.redact_json(&mut row.spec);
        if let Some(o) = row.outcome.as_mut() {
            self.redact_json(o);
        }
        if let Some(e) = row.error.take() {
            row.error = Some(self.redact(&e).into_owned());
        }
        row
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_name_announces_a_kind_a_job_can_need() {
        for (device, kind) in [("cpu", "cpu"), ("flex", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda"), ("wgpu", "wgpu"), ("vulkan", "wgpu")] {
            assert_eq!(device_kind(device), kind, "{device}");
            assert!(crate::api::DEVICE_KINDS.contains(&device_kind(device)), "{device}");
        }
    }
}
