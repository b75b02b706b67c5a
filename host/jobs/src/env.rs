//! What every pipeline runs in: a data folder (datasets, eval runs, reports, the judge's
//! verdict cache), a compute device, the plugin runtime, and loaded models shared between
//! the steps of one job. The CLI makes one per command over `--data-dir`; the server makes
//! one per project folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use lathe_engine::{Device, LoadedModel};
use lathe_sandbox::{Kind, Plugin, Runtime, RuntimeConfig};

use crate::error::{JobError, Result};

pub struct Env {
    root: PathBuf,
    device: Device,
    plugin_cache: Option<PathBuf>,
    /// A project's own plugins by declared name, looked up before the built-ins.
    project_plugins: HashMap<String, PathBuf>,
    /// Every version of the project's plugins by sha256, for pinned references.
    plugin_versions: HashMap<String, PathBuf>,
    /// Whether a plugin name may be a `.wasm` path (the CLI: yes; the server, whose
    /// names come from users: never).
    plugin_paths: bool,
    runtime: OnceLock<Runtime>,
    models: Mutex<HashMap<PathBuf, Arc<LoadedModel>>>,
}

impl Env {
    /// An environment over the data folder `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>, device: Device) -> Self {
        Self {
            root: root.into(),
            device,
            plugin_cache: default_plugin_cache(),
            project_plugins: HashMap::new(),
            plugin_versions: HashMap::new(),
            plugin_paths: true,
            runtime: OnceLock::new(),
            models: Mutex::new(HashMap::new()),
        }
    }

    /// A project's uploaded plugins (name → `.wasm` file), which suites and specs name
    /// like built-ins; a project's plugin shadows a built-in of the same name.
    /// Plugins are only the project's and the built-ins: names never reach the filesystem.
    pub fn with_project_plugins(mut self, plugins: HashMap<String, PathBuf>) -> Self {
        self.project_plugins = plugins;
        self.plugin_paths = false;
        self
    }

    /// Every version of the project's plugins (sha256 → `.wasm` file), so that a reference
    /// pinned to an older upload still finds its bytes.
    pub fn with_plugin_versions(mut self, versions: HashMap<String, PathBuf>) -> Self {
        self.plugin_versions = versions;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dataset versions under the data folder.
    pub fn datasets(&self) -> Result<lathe_data::Datasets> {
        Ok(lathe_data::Datasets::open(&self.root)?)
    }

    /// Where eval runs are kept, one JSON file per run id.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("evals")
    }

    /// Where training runs write their checkpoints and adapters.
    pub fn train_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// The judge's verdict cache (JSON lines), shared by every run in this folder.
    pub fn judge_cache(&self) -> PathBuf {
        self.root.join("judge-cache.jsonl")
    }

    /// The plugin runtime, started on first use.
    pub fn runtime(&self) -> Result<&Runtime> {
        if let Some(r) = self.runtime.get() {
            return Ok(r);
        }
        let r = Runtime::new(runtime_config(self.plugin_cache.clone())?)
            .map_err(|e| JobError::PluginLoad { plugin: "(runtime)".into(), message: e.to_string() })?;
        Ok(self.runtime.get_or_init(|| r))
    }

    /// Loads a plugin by name (the project's, one installed from a pack into this data
    /// folder, else a built-in such as `json-field-match`) or `.wasm` path, and checks that
    /// it is the kind the caller needs. A reference `pinned` to a sha256 loads those bytes
    /// (an older upload's, a pack's), and a plugin of that name with other bytes is refused
    /// with both hashes named. `limits` holds its calls below the host's.
    pub fn plugin_ref(&self, name: &str, pinned: Option<&str>, limits: Option<crate::eval::CallLimits>, expected: Kind) -> Result<Plugin> {
        let plugin = match pinned.and_then(|sha| self.plugin_by_sha(sha)) {
            Some(path) => {
                let bytes = std::fs::read(&path).map_err(|e| JobError::io(&path, e))?;
                self.runtime()?.load(&bytes).map_err(|e| JobError::plugin_load(name, e))?
            }
            None => self.load_plugin(name)?,
        };
        if let Some(sha) = pinned
            && plugin.info().sha256 != sha
        {
            return Err(JobError::PluginLoad {
                plugin: name.to_string(),
                message: format!("the suite pins sha256 {sha}, but the plugin found under this name is {}", plugin.info().sha256),
            });
        }
        if pinned.is_some() && plugin.info().name != name {
            return Err(JobError::PluginLoad {
                plugin: name.to_string(),
                message: format!("the component pinned here declares the name `{}`", plugin.info().name),
            });
        }
        if plugin.kind() != expected {
            return Err(JobError::PluginLoad {
                plugin: name.to_string(),
                message: format!("it is a {}, but a {} is needed here", plugin.kind().name(), expected.name()),
            });
        }
        Ok(match limits {
            Some(l) => plugin.with_limits((l.memory_mb as usize) << 20, std::time::Duration::from_millis(l.timeout_ms)),
            None => plugin,
        })
    }

    /// Where plugins installed from packs into this data folder are kept, by sha256.
    pub fn installed_plugins_dir(&self) -> PathBuf {
        self.root.join("plugins")
    }

    /// Installed plugins by name → sha256 (the CLI's data folder).
    fn installed_names(&self) -> HashMap<String, String> {
        let path = self.installed_plugins_dir().join("names.json");
        std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn plugin_by_sha(&self, sha: &str) -> Option<PathBuf> {
        if let Some(p) = self.plugin_versions.get(sha) {
            return Some(p.clone());
        }
        let valid = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
        let path = self.installed_plugins_dir().join(format!("{sha}.wasm"));
        (self.plugin_paths && valid && path.is_file()).then_some(path)
    }

    /// Loads a plugin of any kind, found as [`Env::plugin_ref`] finds it.
    pub fn load_plugin(&self, name: &str) -> Result<Plugin> {
        let installed = || self.plugin_paths.then(|| self.installed_names().get(name).and_then(|sha| self.plugin_by_sha(sha))).flatten();
        let bytes: std::borrow::Cow<'static, [u8]> = match (self.project_plugins.get(name).cloned().or_else(installed), lathe_sandbox::builtin(name)) {
            (Some(path), _) => std::fs::read(&path).map_err(|e| JobError::io(&path, e))?.into(),
            (None, Some(b)) => b.into(),
            (None, None) if !self.plugin_paths => {
                return Err(JobError::Invalid(format!("`{name}` is neither a plugin of this project nor a built-in")));
            }
            (None, None) => std::fs::read(name)
                .map_err(|_| JobError::Invalid(format!("`{name}` is neither a plugin of this project, a built-in (see `lathe plugin list`), nor a readable .wasm file")))?
                .into(),
        };
        self.runtime()?.load(&bytes).map_err(|e| JobError::plugin_load(name, e))
    }

    /// The model at `path` (GGUF file or Hugging Face folder), loaded once per
    /// environment and shared.
    pub fn model(&self, path: &Path) -> Result<Arc<LoadedModel>> {
        let mut models = self.models.lock().expect("model cache lock");
        if let Some(m) = models.get(path) {
            return Ok(m.clone());
        }
        let m = Arc::new(self.load_model(path)?);
        models.insert(path.to_path_buf(), m.clone());
        Ok(m)
    }

    /// A model of this job's own, not shared (QLoRA quantizes its copy in place).
    pub fn load_model(&self, path: &Path) -> Result<LoadedModel> {
        self.load_model_by(path, lathe_engine::load)
    }

    /// [`Env::load_model`] by another of the engine's loaders (a training run's:
    /// `lathe_engine::training_loader`).
    pub(crate) fn load_model_by(&self, path: &Path, load: fn(&Path, &lathe_engine::Device) -> lathe_engine::Result<LoadedModel>) -> Result<LoadedModel> {
        if !path.exists() {
            return Err(JobError::NotFound {
                what: "model",
                id: path.display().to_string(),
                hint: " (scripts/setup.sh fetches the SmolLM2 fixture into models/)".into(),
            });
        }
        Ok(load(path, &self.device)?)
    }
}

/// The plugin runtime's configuration on this host: each world's limits from the
/// operator's `LATHE_PLUGIN_<WORLD>_*` environment ([`crate::settings::PluginLimits`]),
/// compiled plugins cached in `cache_dir`.
pub fn runtime_config(cache_dir: Option<PathBuf>) -> Result<RuntimeConfig> {
    crate::settings::plugin_runtime_config(&crate::settings::Layers::from_process(None)?, cache_dir)
}

/// Where compiled plugins are cached by default: `$XDG_CACHE_HOME/lathe/plugins`, else
/// `~/.cache/lathe/plugins`.
pub fn default_plugin_cache() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("lathe/plugins"))
}

/// sha256 of a GGUF file, or of a folder's safetensors and config.json: what a run
/// records as the base model's identity.
pub fn model_sha256(path: &Path) -> Result<String> {
    if path.is_file() {
        return lathe_util::sha256_file(path).map_err(|e| JobError::io(path, e));
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| JobError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") || p.file_name().is_some_and(|n| n == "config.json"))
        .collect();
    entries.sort();
    let parts = entries
        .iter()
        .map(|p| lathe_util::sha256_file(p).map_err(|e| JobError::io(p, e)))
        .collect::<Result<Vec<_>>>()?;
    Ok(lathe_util::sha256_hex(parts.join("\n").as_bytes()))
}
