//! Eval packs: what defines "good" for one task (plugins, suites with their gates, held-out
//! items and a few-shot pool with their provenance) as one immutable, versioned file.
//!
//! - A pack's **source** is a folder with a `pack.toml` ([`Source`]) that names its
//!   plugins (components of its own or built-ins, each with the memory and time per call it
//!   asks for), its suites (JSON, as `lathe eval` reads them) and its data (JSON lines of
//!   Lathe examples). `lathe pack build` turns it into a `.lathepack`.
//! - A **`.lathepack`** is a tar in one canonical form ([`archive`]): `pack.toml` (the
//!   [`Manifest`], every member with its sha256), `README.md`, `plugins/<sha256>.wasm`,
//!   `suites/<name>.json` (each plugin reference pinned to the component's sha256 and
//!   limits), `data/<role>.jsonl`, and last `pack.toml.sha256`, the manifest's own hash. The same source always builds the same bytes; the file's sha256
//!   is the pack's identity.
//! - [`Pack::read`] refuses anything else: a changed byte anywhere, a member the manifest
//!   does not list, a suite naming a plugin the pack does not carry, few-shot examples that
//!   leak into the held-out items.
//! - [`Pack::check`] loads every plugin exactly as an upload is loaded and holds what
//!   each asks for against what the host allows its world ([`Pack::check`]); [`install`] does that and
//!   writes the data as dataset versions, for the CLI's data folder and the server's
//!   project folders alike.

pub mod archive;
mod install;
pub mod shipped;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use lathe_sandbox::{Kind, Plugin, Runtime};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{JobError, Result};
use crate::eval::judge::Verdict;
use crate::eval::{CallLimits, Item, Suite};
use archive::Member;

pub use install::{Installed, InstalledData, LocalPacks, install_data};

/// The file extension of a built pack.
pub const EXTENSION: &str = "lathepack";
/// The manifest format this host reads and writes.
pub const FORMAT: u32 = 1;
/// The last member of a pack: the sha256 of `pack.toml`, which hashes everything else.
const MANIFEST_SUM: &str = "pack.toml.sha256";

// ---- the source folder ----

/// `pack.toml` in a pack's source folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub name: String,
    pub version: String,
    pub description: String,
    pub license: String,
    /// Every plugin a suite names, by its declared name.
    #[serde(default)]
    pub plugins: Vec<SourcePlugin>,
    /// Suite files (JSON), relative to the folder.
    pub suites: Vec<PathBuf>,
    pub heldout: SourceData,
    #[serde(default)]
    pub fewshot: Option<SourceData>,
    /// Judge verdicts cached when the pack's baseline was measured (JSON lines of the
    /// judge cache): installing adds them to the judge cache, so the judged baseline
    /// reproduces without asking the judge again.
    #[serde(default)]
    pub verdicts: Option<SourceData>,
}

/// A plugin the pack carries: a component of its own (`component = "plugins/x.wasm"`) or a
/// built-in by name (`builtin = "json-schema"`, whose bytes the pack then carries), with
/// what it asks of the host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePlugin {
    #[serde(default)]
    pub component: Option<PathBuf>,
    #[serde(default)]
    pub builtin: Option<String>,
    #[serde(flatten)]
    pub asks: Asks,
}

/// What one plugin asks of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Asks {
    /// The memory of one instance, MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// The CPU time of one call, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Network access: no host grants it; a pack that asks is refused.
    #[serde(default)]
    pub network: bool,
}

fn default_memory_mb() -> u64 {
    64
}
fn default_timeout_ms() -> u64 {
    2000
}

/// A data file (JSON lines of Lathe examples) and where its items came from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceData {
    pub file: PathBuf,
    pub provenance: String,
}

// ---- the built pack ----

/// `pack.toml` inside a `.lathepack`: what the pack is, asks for and holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: String,
    pub description: String,
    pub license: String,
    /// The `lathe:plugin` WIT version its plugins implement.
    pub wit: String,
    pub readme: Option<FileEntry>,
    pub plugins: Vec<PluginEntry>,
    pub suites: Vec<SuiteEntry>,
    pub data: Vec<DataEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdicts: Option<VerdictsEntry>,
}

/// The judge's cached verdicts a pack carries (`data/verdicts.jsonl`), and for which judges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictsEntry {
    pub file: String,
    pub sha256: String,
    pub rows: u64,
    pub provenance: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// The name its `info()` declares, which suites use.
    pub name: String,
    /// `scorer`, `validator`, `formatter` or `judge`.
    pub world: String,
    pub version: String,
    pub sha256: String,
    pub bytes: u64,
    /// `plugins/<sha256>.wasm`
    pub file: String,
    /// `builtin` (a built-in of the Lathe that built the pack) or `component`.
    pub origin: String,
    pub asks: Asks,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteEntry {
    pub name: String,
    pub file: String,
    pub sha256: String,
    pub gate: Option<crate::eval::Gate>,
    /// What the suite's judge needs, when it has one: its plugin, its model, and whether
    /// the model's endpoint must support structured output (`response_format`).
    pub judge: Option<Value>,
}

/// Which part of the eval a data file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataRole {
    /// The items the eval scores; never trained on.
    Heldout,
    /// Solved examples the baseline draws its shots from.
    Fewshot,
}

impl DataRole {
    pub fn name(self) -> &'static str {
        match self {
            Self::Heldout => "heldout",
            Self::Fewshot => "fewshot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataEntry {
    pub role: DataRole,
    pub file: String,
    pub sha256: String,
    pub rows: u64,
    pub provenance: String,
}

/// A verified pack: its manifest, its sha256 and the contents of each member.
#[derive(Debug, Clone)]
pub struct Pack {
    pub manifest: Manifest,
    /// sha256 of the `.lathepack` file: the pack's identity.
    pub sha256: String,
    pub size: u64,
    pub readme: Option<String>,
    /// sha256 → component bytes.
    plugins: BTreeMap<String, Vec<u8>>,
    pub suites: Vec<Suite>,
    data: BTreeMap<DataRole, Vec<lathe_data::Example>>,
    verdicts: Vec<Verdict>,
}

fn invalid(pack: &str, why: impl std::fmt::Display) -> JobError {
    JobError::Invalid(format!("pack {pack}: {why}"))
}

fn sha256(bytes: &[u8]) -> String {
    lathe_util::sha256_hex(bytes)
}

/// Names a pack may have: what a plugin or suite may be named, too.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(JobError::Invalid(format!("{what} `{name}`: use 1-64 lower-case letters, digits and `-`")))
    }
}

/// `1.0.0`: three numbers, as Cargo and npm version things.
fn check_version(version: &str) -> Result<()> {
    let parts: Vec<&str> = version.split('.').collect();
    if parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit())) {
        Ok(())
    } else {
        Err(JobError::Invalid(format!("version `{version}`: use MAJOR.MINOR.PATCH, e.g. 1.0.0")))
    }
}

fn parse_examples(label: &str, text: &str) -> Result<Vec<lathe_data::Example>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let e = lathe_data::Example::from_json_line(l).map_err(|e| JobError::Invalid(format!("{label} line {}: not a Lathe example: {e}", i + 1)))?;
            e.validate().map_err(|e| JobError::Invalid(format!("{label} line {}: {e}", i + 1)))?;
            Item::from_example(&e).map_err(|e| JobError::Invalid(format!("{label} line {}: {e}", i + 1)))?;
            Ok(e)
        })
        .collect()
}

/// Cached verdicts, one JSON object per line, in their canonical form: sorted by key, each
/// key once.
fn parse_verdicts(label: &str, text: &str) -> Result<Vec<Verdict>> {
    let mut out: BTreeMap<String, Verdict> = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Verdict = serde_json::from_str(line).map_err(|e| JobError::Invalid(format!("{label} line {}: not a judge verdict: {e}", i + 1)))?;
        let hex = v.key.len() == 64 && v.key.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex || !(0.0..=1.0).contains(&v.score) {
            return Err(JobError::Invalid(format!("{label} line {}: a verdict needs a sha256 key and a score in [0, 1]", i + 1)));
        }
        if let Some(prev) = out.insert(v.key.clone(), v.clone())
            && prev != v
        {
            return Err(JobError::Invalid(format!("{label} line {}: key {} has two different verdicts", i + 1, v.key)));
        }
    }
    Ok(out.into_values().collect())
}

/// The plugins a suite uses: (name, pinned sha256, limits, the world it must be).
fn suite_plugins(suite: &Suite) -> Vec<(&str, Option<&str>, Option<CallLimits>, Kind)> {
    let mut out: Vec<_> = suite.scorers.iter().map(|r| (r.plugin.as_str(), r.sha256.as_deref(), r.limits, Kind::Scorer)).collect();
    if let Some(v) = &suite.validator {
        out.push((v.plugin.as_str(), v.sha256.as_deref(), v.limits, Kind::Validator));
    }
    if let Some(j) = &suite.judge {
        out.push((j.plugin.as_str(), j.sha256.as_deref(), j.limits, Kind::Judge));
    }
    out
}

impl Pack {
    /// Builds the `.lathepack` bytes of the source folder `dir`: every plugin loaded (and so
    /// checked) by `runtime`, every suite parsed with its plugins pinned, the data parsed and
    /// checked for leakage between the held-out items and the few-shot pool.
    pub fn build(dir: &Path, runtime: &Runtime) -> Result<Vec<u8>> {
        Self::build_with(&|rel: &Path| std::fs::read(dir.join(rel)), dir, runtime)
    }

    /// [`Pack::build`] over any source of files: `read` gets a path relative to the source
    /// folder; `dir` is only for messages.
    pub fn build_with(read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>, dir: &Path, runtime: &Runtime) -> Result<Vec<u8>> {
        let read_opt = |p: &Path| -> Result<Option<Vec<u8>>> {
            match read(p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(JobError::io(dir.join(p), e)),
            }
        };
        let read = |p: &Path| -> Result<Vec<u8>> { read(p).map_err(|e| JobError::io(dir.join(p), e)) };
        let toml_path = dir.join("pack.toml");
        let text = String::from_utf8(read(Path::new("pack.toml"))?).map_err(|_| JobError::Invalid(format!("{}: not UTF-8", toml_path.display())))?;
        let src: Source = toml::from_str(&text).map_err(|e| JobError::Invalid(format!("{}: {e}", toml_path.display())))?;
        check_name("pack", &src.name)?;
        check_version(&src.version)?;

        let mut members = Vec::new();
        let mut plugins: Vec<PluginEntry> = Vec::new();
        let mut wit = BTreeSet::new();
        for (i, p) in src.plugins.iter().enumerate() {
            let (bytes, origin) = match (&p.component, &p.builtin) {
                (Some(path), None) => (read(path)?, "component"),
                (None, Some(name)) => {
                    let b = lathe_sandbox::builtin(name).ok_or_else(|| {
                        JobError::Invalid(format!("pack.toml plugins[{i}]: `{name}` is not a built-in; built-ins are {}", lathe_sandbox::builtin_names().collect::<Vec<_>>().join(", ")))
                    })?;
                    (b.to_vec(), "builtin")
                }
                _ => return Err(JobError::Invalid(format!("pack.toml plugins[{i}]: give exactly one of `component` and `builtin`"))),
            };
            let plugin = runtime.load(&bytes).map_err(|e| JobError::plugin_load(&format!("pack.toml plugins[{i}]"), e))?;
            let info = plugin.info();
            if plugins.iter().any(|q| q.name == info.name) {
                return Err(JobError::Invalid(format!("pack.toml: two plugins declare the name `{}`", info.name)));
            }
            wit.insert(info.wit_version);
            let file = format!("plugins/{}.wasm", info.sha256);
            plugins.push(PluginEntry {
                name: info.name.clone(),
                world: info.kind.name().to_string(),
                version: info.version.clone(),
                sha256: info.sha256.clone(),
                bytes: bytes.len() as u64,
                file: file.clone(),
                origin: origin.into(),
                asks: p.asks,
            });
            members.push(Member { name: file, bytes });
        }
        if wit.len() > 1 {
            return Err(JobError::Invalid(format!("pack.toml: the plugins implement different WIT versions ({:?}); a pack needs one", wit)));
        }

        let mut suites = Vec::new();
        for path in &src.suites {
            let label = path.display().to_string();
            let text = String::from_utf8(read(path)?).map_err(|_| JobError::Invalid(format!("{label}: not UTF-8")))?;
            let mut suite = Suite::from_json(&text).map_err(|e| JobError::Invalid(format!("{label}: {e}")))?;
            check_name("suite", &suite.name)?;
            pin(&mut suite, &plugins).map_err(|e| JobError::Invalid(format!("{label}: {e}")))?;
            if suites.iter().any(|(s, _): &(Suite, _)| s.name == suite.name) {
                return Err(JobError::Invalid(format!("pack.toml: two suites are named `{}`", suite.name)));
            }
            let json = serde_json::to_string_pretty(&suite).expect("suites serialise") + "\n";
            suites.push((suite, json));
        }
        if suites.is_empty() {
            return Err(JobError::Invalid("pack.toml: a pack needs at least one suite".into()));
        }

        let mut data = Vec::new();
        let mut inputs = BTreeMap::new();
        for (role, d) in [(DataRole::Heldout, Some(&src.heldout)), (DataRole::Fewshot, src.fewshot.as_ref())] {
            let Some(d) = d else { continue };
            let label = d.file.display().to_string();
            let bytes = read(&d.file)?;
            let text = String::from_utf8(bytes).map_err(|_| JobError::Invalid(format!("{label}: not UTF-8")))?;
            let examples = parse_examples(&label, &text)?;
            if examples.is_empty() {
                return Err(JobError::Invalid(format!("{label}: no examples")));
            }
            // Canonical lines: what the dataset store writes, so a version id is stable.
            let canonical: String = examples.iter().map(|e| e.to_canonical() + "\n").collect();
            inputs.insert(role, examples.iter().map(|e| Item::from_example(e).map(|i| i.input)).collect::<Result<BTreeSet<_>>>()?);
            let file = format!("data/{}.jsonl", role.name());
            data.push(DataEntry { role, file: file.clone(), sha256: sha256(canonical.as_bytes()), rows: examples.len() as u64, provenance: d.provenance.clone() });
            members.push(Member { name: file, bytes: canonical.into_bytes() });
        }
        leakage(&inputs)?;

        let verdicts = match &src.verdicts {
            Some(d) => {
                let label = d.file.display().to_string();
                let text = String::from_utf8(read(&d.file)?).map_err(|_| JobError::Invalid(format!("{label}: not UTF-8")))?;
                let verdicts = parse_verdicts(&label, &text)?;
                let canonical = Verdict::jsonl(&verdicts);
                let file = "data/verdicts.jsonl".to_string();
                members.push(Member { name: file.clone(), bytes: canonical.clone().into_bytes() });
                Some(VerdictsEntry { file, sha256: sha256(canonical.as_bytes()), rows: verdicts.len() as u64, provenance: d.provenance.clone() })
            }
            None => None,
        };

        let readme = match read_opt(Path::new("README.md"))? {
            Some(bytes) => {
                let entry = FileEntry { file: "README.md".into(), sha256: sha256(&bytes) };
                members.push(Member { name: entry.file.clone(), bytes });
                Some(entry)
            }
            None => None,
        };
        let mut suite_entries = Vec::new();
        for (suite, json) in suites {
            let file = format!("suites/{}.json", suite.name);
            suite_entries.push(SuiteEntry {
                name: suite.name.clone(),
                file: file.clone(),
                sha256: sha256(json.as_bytes()),
                gate: suite.gate.clone(),
                judge: suite.judge.as_ref().map(|j| json!({"plugin": j.plugin, "model": j.model, "structured_output": j.response_format.is_some()})),
            });
            members.push(Member { name: file, bytes: json.into_bytes() });
        }
        let manifest = Manifest {
            format: FORMAT,
            name: src.name,
            version: src.version,
            description: src.description,
            license: src.license,
            wit: wit.into_iter().next().unwrap_or(lathe_sandbox::sdk::latest().wit_version).to_string(),
            readme,
            plugins,
            suites: suite_entries,
            data,
            verdicts,
        };
        let manifest_text = toml::to_string(&manifest).map_err(|e| JobError::Invalid(format!("the manifest does not serialise: {e}")))?;
        members.sort_by(|a, b| a.name.cmp(&b.name));
        // The manifest hashes every other member; this last member hashes the manifest.
        members.push(Member { name: MANIFEST_SUM.into(), bytes: format!("{}\n", sha256(manifest_text.as_bytes())).into_bytes() });
        members.insert(0, Member { name: "pack.toml".into(), bytes: manifest_text.into_bytes() });
        let bytes = archive::write(&members)?;
        // What is built must read back.
        Self::read(&bytes)?;
        Ok(bytes)
    }

    /// Reads and verifies a `.lathepack`.
    pub fn read(bytes: &[u8]) -> Result<Self> {
        let sha = sha256(bytes);
        let short = &sha[..12];
        let members = archive::read(bytes)?;
        let Some((first, rest)) = members.split_first().filter(|(m, _)| m.name == "pack.toml") else {
            return Err(invalid(short, "the first member must be pack.toml"));
        };
        let Some((sum, rest)) = rest.split_last().filter(|(m, _)| m.name == MANIFEST_SUM) else {
            return Err(invalid(short, format!("the last member must be {MANIFEST_SUM}")));
        };
        if sum.bytes != format!("{}\n", sha256(&first.bytes)).into_bytes() {
            return Err(invalid(short, "pack.toml does not match its sha256: the pack was changed after it was built"));
        }
        let text = std::str::from_utf8(&first.bytes).map_err(|_| invalid(short, "pack.toml is not UTF-8"))?;
        let manifest: Manifest = toml::from_str(text).map_err(|e| invalid(short, format!("pack.toml: {e}")))?;
        if manifest.format != FORMAT {
            return Err(invalid(short, format!("format {} (this Lathe reads format {FORMAT})", manifest.format)));
        }
        check_name("pack", &manifest.name)?;
        check_version(&manifest.version)?;
        let label = format!("{}@{} ({short})", manifest.name, manifest.version);
        let label = label.as_str();

        // Every member listed once, with its hash; nothing else.
        let mut listed: BTreeMap<&str, &str> = BTreeMap::new();
        let entries = manifest
            .plugins
            .iter()
            .map(|p| (p.file.as_str(), p.sha256.as_str()))
            .chain(manifest.suites.iter().map(|s| (s.file.as_str(), s.sha256.as_str())))
            .chain(manifest.data.iter().map(|d| (d.file.as_str(), d.sha256.as_str())))
            .chain(manifest.verdicts.iter().map(|v| (v.file.as_str(), v.sha256.as_str())))
            .chain(manifest.readme.iter().map(|r| (r.file.as_str(), r.sha256.as_str())));
        for (file, hash) in entries {
            if listed.insert(file, hash).is_some() {
                return Err(invalid(label, format!("the manifest lists `{file}` twice")));
            }
        }
        let mut contents: BTreeMap<&str, &[u8]> = BTreeMap::new();
        for m in rest {
            let Some(expected) = listed.get(m.name.as_str()) else {
                return Err(invalid(label, format!("`{}` is in the archive but not in the manifest", m.name)));
            };
            let got = sha256(&m.bytes);
            if got != *expected {
                return Err(invalid(label, format!("`{}` has sha256 {got}, the manifest says {expected}: the pack was changed after it was built", m.name)));
            }
            contents.insert(&m.name, &m.bytes);
        }
        if let Some(missing) = listed.keys().find(|f| !contents.contains_key(*f)) {
            return Err(invalid(label, format!("the manifest lists `{missing}`, which the archive lacks")));
        }

        let mut plugins = BTreeMap::new();
        for p in &manifest.plugins {
            check_name("plugin", &p.name).map_err(|e| invalid(label, e))?;
            if p.file != format!("plugins/{}.wasm", p.sha256) {
                return Err(invalid(label, format!("plugin `{}` is stored as `{}`, not under its sha256", p.name, p.file)));
            }
            plugins.insert(p.sha256.clone(), contents[p.file.as_str()].to_vec());
        }
        let mut suites = Vec::new();
        for entry in &manifest.suites {
            let text = std::str::from_utf8(contents[entry.file.as_str()]).map_err(|_| invalid(label, format!("{}: not UTF-8", entry.file)))?;
            let suite = Suite::from_json(text).map_err(|e| invalid(label, format!("{}: {e}", entry.file)))?;
            if suite.name != entry.name || suite.gate != entry.gate {
                return Err(invalid(label, format!("{}: the manifest's name or gate is not the suite's", entry.file)));
            }
            for (name, pinned, limits, kind) in suite_plugins(&suite) {
                let carried = manifest.plugins.iter().find(|p| p.name == name && Some(p.sha256.as_str()) == pinned);
                match carried {
                    Some(p) if limits != Some(CallLimits { memory_mb: p.asks.memory_mb, timeout_ms: p.asks.timeout_ms }) => {
                        return Err(invalid(label, format!("suite `{}` runs `{name}` under other limits than the manifest asks for", suite.name)));
                    }
                    Some(p) if p.world == kind.name() => {}
                    Some(p) => return Err(invalid(label, format!("suite `{}` uses `{name}` as a {} but it is a {}", suite.name, kind.name(), p.world))),
                    None => return Err(invalid(label, format!("suite `{}` uses plugin `{name}` pinned to {}, which the pack does not carry", suite.name, pinned.unwrap_or("no hash")))),
                }
            }
            suites.push(suite);
        }
        let mut data = BTreeMap::new();
        let mut inputs = BTreeMap::new();
        for d in &manifest.data {
            let text = std::str::from_utf8(contents[d.file.as_str()]).map_err(|_| invalid(label, format!("{}: not UTF-8", d.file)))?;
            let examples = parse_examples(&d.file, text).map_err(|e| invalid(label, e))?;
            if examples.len() as u64 != d.rows {
                return Err(invalid(label, format!("{}: {} examples, the manifest says {}", d.file, examples.len(), d.rows)));
            }
            inputs.insert(d.role, examples.iter().map(|e| Item::from_example(e).map(|i| i.input)).collect::<Result<BTreeSet<_>>>()?);
            if data.insert(d.role, examples).is_some() {
                return Err(invalid(label, format!("two data files are {}", d.role.name())));
            }
        }
        if !data.contains_key(&DataRole::Heldout) {
            return Err(invalid(label, "no held-out items"));
        }
        leakage(&inputs).map_err(|e| invalid(label, e))?;
        let verdicts = match &manifest.verdicts {
            Some(v) => {
                let text = std::str::from_utf8(contents[v.file.as_str()]).map_err(|_| invalid(label, format!("{}: not UTF-8", v.file)))?;
                let verdicts = parse_verdicts(&v.file, text).map_err(|e| invalid(label, e))?;
                if verdicts.len() as u64 != v.rows {
                    return Err(invalid(label, format!("{}: {} verdicts, the manifest says {}", v.file, verdicts.len(), v.rows)));
                }
                verdicts
            }
            None => Vec::new(),
        };
        let readme = match &manifest.readme {
            Some(r) => Some(String::from_utf8(contents[r.file.as_str()].to_vec()).map_err(|_| invalid(label, "README.md is not UTF-8"))?),
            None => None,
        };
        Ok(Self { manifest, sha256: sha, size: bytes.len() as u64, readme, plugins, suites, data, verdicts })
    }

    /// Reads and verifies a `.lathepack` file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| JobError::io(path, e))?;
        Self::read(&bytes).map_err(|e| JobError::Invalid(format!("{}: {e}", path.display())))
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }

    /// A component's bytes by sha256.
    pub fn plugin_bytes(&self, sha256: &str) -> Option<&[u8]> {
        self.plugins.get(sha256).map(Vec::as_slice)
    }

    /// The examples of one part of the data.
    pub fn data(&self, role: DataRole) -> &[lathe_data::Example] {
        self.data.get(&role).map_or(&[], Vec::as_slice)
    }

    /// The judge verdicts the pack carries.
    pub fn verdicts(&self) -> &[Verdict] {
        &self.verdicts
    }

    /// Holds every plugin's request against what `runtime` allows its world (memory per
    /// instance, time per call; network and files never), then loads it exactly as an
    /// upload is loaded, and requires it to be what the manifest says. The first refusal
    /// names the plugin and the limit.
    pub fn check(&self, runtime: &Runtime) -> Result<Vec<(PluginEntry, Plugin)>> {
        let id = self.id();
        let refuse = |p: &PluginEntry, why: String| Err(JobError::Invalid(format!("pack {id}: plugin `{}` {why}", p.name)));
        let mut out = Vec::new();
        for p in &self.manifest.plugins {
            if p.asks.network {
                return refuse(p, "asks for network access, which Lathe never grants to plugins".into());
            }
            let Some(kind) = Kind::ALL.into_iter().find(|k| k.name() == p.world) else {
                return refuse(p, format!("is a `{}`, a world this host does not know", p.world));
            };
            let allowed = runtime.config().limits_for(kind);
            let (memory_mb, timeout_ms) = (allowed.memory_bytes as u64 >> 20, allowed.timeout.as_millis() as u64);
            if p.asks.memory_mb > memory_mb {
                return refuse(p, format!("asks for {} MiB of memory per instance; this server allows {kind} plugins at most {memory_mb} MiB", p.asks.memory_mb));
            }
            if p.asks.timeout_ms > timeout_ms {
                return refuse(p, format!("asks for {} ms per call; this server allows {kind} plugins at most {timeout_ms} ms", p.asks.timeout_ms));
            }
            let plugin = runtime.load(&self.plugins[&p.sha256]).map_err(|e| JobError::plugin_load(&p.name, e))?;
            let info = plugin.info();
            if info.name != p.name || info.kind.name() != p.world || info.version != p.version {
                return refuse(
                    p,
                    format!("is declared as {} {} {} but the component says {} {} {}", p.world, p.name, p.version, info.kind.name(), info.name, info.version),
                );
            }
            out.push((p.clone(), plugin));
        }
        Ok(out)
    }

    /// What `lathe pack inspect` prints and the API shows: identity, what it asks for, what it
    /// holds.
    pub fn describe(&self) -> Value {
        let m = &self.manifest;
        let worlds: BTreeSet<&str> = m.plugins.iter().map(|p| p.world.as_str()).collect();
        json!({
            "name": m.name,
            "version": m.version,
            "sha256": self.sha256,
            "bytes": self.size,
            "description": m.description,
            "license": m.license,
            "wit": m.wit,
            "asks": {
                "worlds": worlds,
                "memory_mb": m.plugins.iter().map(|p| p.asks.memory_mb).max().unwrap_or(0),
                "timeout_ms": m.plugins.iter().map(|p| p.asks.timeout_ms).max().unwrap_or(0),
                "network": m.plugins.iter().any(|p| p.asks.network),
            },
            "plugins": m.plugins,
            "suites": m.suites,
            "data": m.data,
            "verdicts": m.verdicts,
        })
    }

    /// What changes when `self` replaces `old` in a project: plugins, suites and data, each
    /// added, removed or changed (by sha256).
    pub fn diff(&self, old: &Pack) -> Value {
        fn compare(old: BTreeMap<&str, &str>, new: BTreeMap<&str, &str>) -> Value {
            let added: Vec<&str> = new.keys().filter(|k| !old.contains_key(*k)).copied().collect();
            let removed: Vec<&str> = old.keys().filter(|k| !new.contains_key(*k)).copied().collect();
            let changed: Vec<Value> = new
                .iter()
                .filter_map(|(k, v)| old.get(k).filter(|o| *o != v).map(|o| json!({"name": k, "from": o, "to": v})))
                .collect();
            json!({"added": added, "removed": removed, "changed": changed})
        }
        fn plugins(m: &Manifest) -> BTreeMap<&str, &str> {
            m.plugins.iter().map(|p| (p.name.as_str(), p.sha256.as_str())).collect()
        }
        let (o, n) = (&old.manifest, &self.manifest);
        json!({
            "from": {"version": o.version, "sha256": old.sha256},
            "to": {"version": n.version, "sha256": self.sha256},
            "plugins": compare(plugins(o), plugins(n)),
            "suites": compare(o.suites.iter().map(|s| (s.name.as_str(), s.sha256.as_str())).collect(), n.suites.iter().map(|s| (s.name.as_str(), s.sha256.as_str())).collect()),
            "data": compare(
                o.data.iter().map(|d| (d.role.name(), d.sha256.as_str())).chain(o.verdicts.iter().map(|v| ("verdicts", v.sha256.as_str()))).collect(),
                n.data.iter().map(|d| (d.role.name(), d.sha256.as_str())).chain(n.verdicts.iter().map(|v| ("verdicts", v.sha256.as_str()))).collect(),
            ),
        })
    }
}

/// Pins every plugin reference of `suite` to the sha256 of the pack's plugin of that name.
fn pin(suite: &mut Suite, plugins: &[PluginEntry]) -> Result<()> {
    let names: Vec<&str> = plugins.iter().map(|p| p.name.as_str()).collect();
    type Ref<'a> = (&'a String, &'a mut Option<String>, &'a mut Option<CallLimits>);
    let mut refs: Vec<Ref> = suite.scorers.iter_mut().map(|r| (&r.plugin, &mut r.sha256, &mut r.limits)).collect();
    refs.extend(suite.validator.as_mut().map(|r| (&r.plugin, &mut r.sha256, &mut r.limits)));
    refs.extend(suite.judge.as_mut().map(|j| (&j.plugin, &mut j.sha256, &mut j.limits)));
    for (name, sha, limits) in refs {
        let p = plugins.iter().find(|p| p.name == *name).ok_or_else(|| {
            JobError::Invalid(format!("the suite uses plugin `{name}`, which pack.toml does not list (it lists {})", names.join(", ")))
        })?;
        if let Some(pinned) = sha.as_ref()
            && *pinned != p.sha256
        {
            return Err(JobError::Invalid(format!("the suite pins `{name}` to {pinned}, but the pack's `{name}` is {}", p.sha256)));
        }
        *sha = Some(p.sha256.clone());
        *limits = Some(CallLimits { memory_mb: p.asks.memory_mb, timeout_ms: p.asks.timeout_ms });
    }
    Ok(())
}

/// No few-shot example may be a held-out item.
fn leakage(inputs: &BTreeMap<DataRole, BTreeSet<String>>) -> Result<()> {
    if let (Some(h), Some(f)) = (inputs.get(&DataRole::Heldout), inputs.get(&DataRole::Fewshot)) {
        let shared: Vec<&String> = h.intersection(f).collect();
        if let Some(first) = shared.first() {
            let preview: String = first.chars().take(60).collect();
            return Err(JobError::Invalid(format!(
                "{} held-out item(s) are also in the few-shot pool (leakage), e.g. {preview:?}",
                shared.len()
            )));
        }
    }
    Ok(())
}
