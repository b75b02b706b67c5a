//! Installing a verified pack: its data as dataset versions (both shells), and, for the
//! CLI's data folder, its plugins, suites and the pack file itself ([`LocalPacks`]). The
//! server keeps plugins, suites and packs in its store instead, after the same checks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use lathe_data::{DatasetRole, Operation};
use serde::{Deserialize, Serialize};

use super::{DataRole, Pack};
use crate::env::Env;
use crate::error::{JobError, Result};
use crate::eval::Suite;
use crate::event::Sink;

/// What an install made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// `heldout`/`fewshot` → dataset version id.
    pub datasets: BTreeMap<String, String>,
    /// `heldout`/`fewshot` → the name that points at it (`packs/<name>/heldout`).
    pub refs: BTreeMap<String, String>,
    pub suites: Vec<String>,
    /// Plugin name → sha256.
    pub plugins: BTreeMap<String, String>,
}

/// `heldout`/`fewshot` → dataset version id, and → the name that points at it.
pub type InstalledData = (BTreeMap<String, String>, BTreeMap<String, String>);

impl Installed {
    /// What installing `pack` made, given the dataset versions [`install_data`] wrote.
    pub fn new(pack: &Pack, (datasets, refs): InstalledData) -> Self {
        Self {
            name: pack.manifest.name.clone(),
            version: pack.manifest.version.clone(),
            sha256: pack.sha256.clone(),
            datasets,
            refs,
            suites: pack.suites.iter().map(|s| s.name.clone()).collect(),
            plugins: pack.manifest.plugins.iter().map(|p| (p.name.clone(), p.sha256.clone())).collect(),
        }
    }
}

/// The name a pack's data version is reachable by.
pub fn data_ref(pack: &str, role: DataRole) -> String {
    format!("packs/{pack}/{}", role.name())
}

/// Writes the pack's held-out items (role `heldout`) and few-shot pool (role `train`, so
/// the baseline draws shots from it) as dataset versions named `packs/<name>/<role>`, and
/// adds its cached judge verdicts to the environment's judge cache. Versions are
/// content-addressed and verdicts keyed: installing twice makes nothing new.
pub fn install_data(env: &Env, pack: &Pack, sink: &dyn Sink) -> Result<InstalledData> {
    let store = env.datasets()?;
    let (mut ids, mut refs) = (BTreeMap::new(), BTreeMap::new());
    for entry in &pack.manifest.data {
        let role = match entry.role {
            DataRole::Heldout => DatasetRole::Heldout,
            DataRole::Fewshot => DatasetRole::Train,
        };
        let note = format!("pack {} {} ({}): {}; {}", pack.manifest.name, pack.manifest.version, &pack.sha256[..12], entry.role.name(), entry.provenance);
        let m = store.write_examples(pack.data(entry.role), None, Operation::Create { note }, role)?;
        if m.role != role {
            return Err(JobError::Invalid(format!(
                "the pack's {} data is already in this store as a {:?} version ({}); a version has one role",
                entry.role.name(),
                m.role,
                m.id
            )));
        }
        let name = data_ref(&pack.manifest.name, entry.role);
        store.set_ref(&name, &m.id)?;
        sink.info(format!("{}: {} items → version {} ({name})", entry.role.name(), m.rows, &m.id[..12]));
        ids.insert(entry.role.name().to_string(), m.id);
        refs.insert(entry.role.name().to_string(), name);
    }
    if !pack.verdicts().is_empty() {
        let mut cache = crate::eval::judge::VerdictCache::open(&env.judge_cache())?;
        let added = cache.add_all(pack.verdicts())?;
        sink.info(format!("verdicts: {added} of the pack's {} added to the judge cache", pack.verdicts().len()));
    }
    Ok((ids, refs))
}

/// The packs installed in a CLI data folder: each pack file under `packs/` by sha256, the
/// index `packs/installed.json` (name → what was installed), plugins under `plugins/` by
/// sha256 with `plugins/names.json`, suites as `suites/<name>.json`.
pub struct LocalPacks<'a> {
    env: &'a Env,
}

impl<'a> LocalPacks<'a> {
    pub fn new(env: &'a Env) -> Self {
        Self { env }
    }

    fn dir(&self) -> PathBuf {
        self.env.root().join("packs")
    }

    fn suites_dir(&self) -> PathBuf {
        self.env.root().join("suites")
    }

    fn index_path(&self) -> PathBuf {
        self.dir().join("installed.json")
    }

    /// Name → what was installed, by name.
    pub fn list(&self) -> Result<BTreeMap<String, Installed>> {
        let path = self.index_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| JobError::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(JobError::io(&path, e)),
        }
    }

    /// Checks `pack` against the runtime's limits (every plugin loaded as an upload is), then writes
    /// its data, plugins and suites, and records it. Installing another version of a pack
    /// replaces the name's suites and refs; the old pack file and versions stay.
    pub fn install(&self, bytes: &[u8], sink: &dyn Sink) -> Result<Installed> {
        let pack = Pack::read(bytes)?;
        sink.started("pack.install", format!("install {} ({})", pack.id(), &pack.sha256[..12]));
        let checked = pack.check(self.env.runtime()?)?;
        let write = |path: PathBuf, bytes: &[u8]| lathe_util::write_atomic(&path, bytes).map_err(|e| JobError::io(&path, e));
        for dir in [self.dir(), self.suites_dir(), self.env.installed_plugins_dir()] {
            std::fs::create_dir_all(&dir).map_err(|e| JobError::io(&dir, e))?;
        }
        write(self.dir().join(format!("{}.{}", pack.sha256, super::EXTENSION)), bytes)?;
        let data = install_data(self.env, &pack, sink)?;
        let plugins_dir = self.env.installed_plugins_dir();
        let names_path = plugins_dir.join("names.json");
        let mut names: BTreeMap<String, String> =
            std::fs::read(&names_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        for (entry, _) in &checked {
            let bytes = pack.plugin_bytes(&entry.sha256).expect("a read pack carries its plugins");
            write(plugins_dir.join(format!("{}.wasm", entry.sha256)), bytes)?;
            names.insert(entry.name.clone(), entry.sha256.clone());
        }
        write(names_path, &serde_json::to_vec_pretty(&names).expect("a map of strings serialises"))?;
        for suite in &pack.suites {
            write(self.suites_dir().join(format!("{}.json", suite.name)), serde_json::to_string_pretty(suite).expect("suites serialise").as_bytes())?;
        }
        let installed = Installed::new(&pack, data);
        let mut index = self.list()?;
        index.insert(installed.name.clone(), installed.clone());
        write(self.index_path(), &serde_json::to_vec_pretty(&index).expect("the index serialises"))?;
        sink.finished("pack.install", format!("{} installed: suites {}; data {}", pack.id(), installed.suites.join(", "), installed.refs.values().cloned().collect::<Vec<_>>().join(", ")));
        Ok(installed)
    }

    /// The pack file of an installed pack, by name (its installed version) or sha256.
    pub fn file(&self, name_or_sha: &str) -> Result<PathBuf> {
        let sha = match self.list()?.get(name_or_sha) {
            Some(i) => i.sha256.clone(),
            None => name_or_sha.to_string(),
        };
        let valid = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
        let path = self.dir().join(format!("{sha}.{}", super::EXTENSION));
        if valid && path.is_file() {
            Ok(path)
        } else {
            Err(JobError::NotFound { what: "installed pack", id: name_or_sha.to_string(), hint: " (see `lathe pack list`)".into() })
        }
    }

    /// A suite by path, or by the name of an installed suite (`suites/<name>.json`).
    pub fn suite(&self, name_or_path: &str) -> Result<Suite> {
        let path = std::path::Path::new(name_or_path);
        if path.is_file() {
            return Suite::from_file(path);
        }
        let installed = self.suites_dir().join(format!("{name_or_path}.json"));
        let valid = !name_or_path.is_empty() && name_or_path.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid && installed.is_file() {
            return Suite::from_file(&installed);
        }
        Err(JobError::NotFound { what: "suite", id: name_or_path.to_string(), hint: " (a suite file, or the name of a suite installed from a pack: see `lathe pack list`)".into() })
    }
}
