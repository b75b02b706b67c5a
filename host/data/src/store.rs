//! The versioned dataset store: `<root>/datasets/<sha256>/{data.jsonl, manifest.json}`.
//!
//! A version's id is the sha256 of its `data.jsonl`, the examples' canonical lines each
//! followed by `\n`. Versions are immutable: a version is written into a temporary folder
//! beside the others (`.tmp-…`), its files fsynced, and the folder renamed into place, so a
//! version is there completely or not at all; writing content that already exists returns
//! the existing version untouched. Each manifest records its parent and the operation that
//! made it, so [`Datasets::lineage`] walks back to the import. Names map to ids in `refs.json`.
//!
//! Reading is lazy: [`Examples`] streams a version line by line. [`TrainingSet`] and
//! [`HeldOut`] are handles that can only be opened on versions of that role, so training code
//! cannot be handed the held-out set by mistake.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::example::Example;
use crate::util::now_rfc3339;
use lathe_util::hex;

/// What a version is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetRole {
    /// A whole dataset (imported or curated), not yet split.
    Full,
    /// The training side of a split.
    Train,
    /// The held-out side of a split: for evaluation only.
    Heldout,
}

impl fmt::Display for DatasetRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatasetRole::Full => "full",
            DatasetRole::Train => "train",
            DatasetRole::Heldout => "heldout",
        })
    }
}

/// The operation that produced a version, with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Import {
        /// The source file's name.
        source: String,
        /// jsonl, csv or parquet.
        container: crate::import::SourceKind,
        /// The record format detected (or the formatter plugin's name).
        format: crate::import::Format,
        source_sha256: String,
    },
    Dedupe(crate::curate::DedupeParams),
    Pii { mode: crate::curate::PiiMode },
    Validate { validator: String, mode: crate::curate::ValidateMode },
    Split {
        params: crate::split::SplitParams,
        /// The ids of both sides, so that either manifest names its sibling.
        train: String,
        heldout: String,
    },
    /// Examples written directly through the API.
    Create { note: String },
}

/// A version's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub parent: Option<String>,
    pub operation: Operation,
    pub role: DatasetRole,
    pub rows: u64,
    pub created_at: String,
    /// A short summary of the operation's report (counts, not per-example lists).
    #[serde(default)]
    pub summary: serde_json::Value,
}

/// A folder of dataset versions.
#[derive(Debug, Clone)]
pub struct Datasets {
    datasets: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Is `s` a version id (64 lower-case hex digits)?
pub fn is_version_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Datasets {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Datasets> {
        let datasets = root.as_ref().join("datasets");
        fs::create_dir_all(&datasets).map_err(|e| DataError::io(&datasets, e))?;
        Ok(Datasets { datasets })
    }

    /// `<root>/datasets`.
    pub fn dir(&self) -> &Path {
        &self.datasets
    }

    pub fn version_dir(&self, id: &str) -> PathBuf {
        self.datasets.join(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        is_version_id(id) && self.version_dir(id).join("manifest.json").is_file()
    }

    /// Starts writing a new version.
    pub fn writer(&self) -> Result<VersionWriter> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = self.datasets.join(format!(".tmp-{}-{nanos}-{n}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
        let guard = TempDir(dir.clone());
        let path = dir.join("data.jsonl");
        let file = File::create(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(VersionWriter {
            dir: guard,
            path,
            out: BufWriter::with_capacity(1 << 16, file),
            hasher: Sha256::new(),
            rows: 0,
            line: Vec::with_capacity(256),
        })
    }

    /// Writes `examples` as a new version in one call.
    pub fn write_examples<'a>(
        &self,
        examples: impl IntoIterator<Item = &'a Example>,
        parent: Option<String>,
        operation: Operation,
        role: DatasetRole,
    ) -> Result<Manifest> {
        let mut w = self.writer()?;
        for ex in examples {
            w.push(ex)?;
        }
        w.seal()?.commit(self, parent, operation, role, serde_json::Value::Null)
    }

    /// The manifest of version `id`.
    pub fn manifest(&self, id: &str) -> Result<Manifest> {
        if !is_version_id(id) {
            return Err(DataError::VersionNotFound { id: id.to_string() });
        }
        let path = self.version_dir(id).join("manifest.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::VersionNotFound { id: id.to_string() });
            }
            Err(e) => return Err(DataError::io(path, e)),
        };
        serde_json::from_str(&text).map_err(|e| DataError::CorruptVersion { path, line: None, message: e.to_string() })
    }

    /// Streams the examples of version `id`.
    pub fn examples(&self, id: &str) -> Result<Examples> {
        let m = self.manifest(id)?;
        Examples::open(&self.version_dir(&m.id).join("data.jsonl"))
    }

    /// Opens version `id` whatever its role.
    pub fn version(&self, id: &str) -> Result<Version> {
        let manifest = self.manifest(id)?;
        Ok(Version { data: self.version_dir(id).join("data.jsonl"), manifest })
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.datasets).map_err(|e| DataError::io(&self.datasets, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| DataError::io(&self.datasets, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if is_version_id(name) {
                out.push(self.manifest(name)?);
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Version `id` and its ancestors, newest first, ending at a version without a parent.
    pub fn lineage(&self, id: &str) -> Result<Vec<Manifest>> {
        let mut out: Vec<Manifest> = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(id) = next {
            if out.iter().any(|m| m.id == id) {
                break;
            }
            let m = self.manifest(&id)?;
            next = m.parent.clone();
            out.push(m);
        }
        Ok(out)
    }

    /// Removes temporary folders and files left by writers that died (a crash between
    /// creating and renaming), if older than `older_than`; returns how many were removed.
    /// Live writers' folders are younger than any sensible `older_than` (e.g. a day).
    pub fn remove_stale_temporaries(&self, older_than: std::time::Duration) -> Result<usize> {
        let mut removed = 0;
        let rd = fs::read_dir(&self.datasets).map_err(|e| DataError::io(&self.datasets, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| DataError::io(&self.datasets, e))?;
            if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
                continue;
            }
            let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a >= older_than) {
                let path = entry.path();
                let r = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                r.map_err(|e| DataError::io(&path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn refs_path(&self) -> PathBuf {
        self.datasets.join("refs.json")
    }

    /// Every name → version id.
    pub fn refs(&self) -> Result<BTreeMap<String, String>> {
        let path = self.refs_path();
        match fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| DataError::CorruptVersion { path, line: None, message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(DataError::io(path, e)),
        }
    }

    /// Points `name` (e.g. `project/support-tickets`) at version `id`. Not safe against
    /// concurrent writers of refs: the caller serialises (the job queue does).
    pub fn set_ref(&self, name: &str, id: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.len() <= 200
            && !name.starts_with(['.', '/'])
            && !name.contains("..")
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !ok || is_version_id(name) {
            return Err(DataError::InvalidRefName { name: name.to_string() });
        }
        if !self.contains(id) {
            return Err(DataError::VersionNotFound { id: id.to_string() });
        }
        let mut refs = self.refs()?;
        refs.insert(name.to_string(), id.to_string());
        let text = serde_json::to_vec_pretty(&refs).expect("a map of strings serialises");
        atomic_write(&self.refs_path(), &text)
    }

    /// A name or a version id → the version id.
    pub fn resolve(&self, name_or_id: &str) -> Result<String> {
        if self.contains(name_or_id) {
            return Ok(name_or_id.to_string());
        }
        self.refs()?
            .get(name_or_id)
            .cloned()
            .ok_or_else(|| DataError::UnknownRef { name: name_or_id.to_string() })
    }
}

/// Writes `bytes` to `path` atomically ([`lathe_util::write_atomic`]).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    lathe_util::write_atomic(path, bytes).map_err(|e| DataError::io(path, e))
}

/// Removes its folder when dropped, unless disarmed.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

impl TempDir {
    fn disarm(mut self) {
        self.0 = PathBuf::new();
    }
}

/// Writes one new version. Dropping it without [`Sealed::commit`] leaves nothing behind.
pub struct VersionWriter {
    dir: TempDir,
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Sha256,
    rows: u64,
    line: Vec<u8>,
}

impl VersionWriter {
    /// Appends one example's canonical line.
    pub fn push(&mut self, ex: &Example) -> Result<()> {
        self.line.clear();
        ex.write_canonical(&mut self.line);
        self.line.push(b'\n');
        self.hasher.update(&self.line);
        self.out.write_all(&self.line).map_err(|e| DataError::io(&self.path, e))?;
        self.rows += 1;
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Flushes and fsyncs the data; the id is now known.
    pub fn seal(self) -> Result<Sealed> {
        let VersionWriter { dir, path, out, hasher, rows, .. } = self;
        let file = out.into_inner().map_err(|e| DataError::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| DataError::io(&path, e))?;
        Ok(Sealed { dir, id: hex(&hasher.finalize()), rows })
    }
}

/// A fully written, not yet visible version.
pub struct Sealed {
    dir: TempDir,
    id: String,
    rows: u64,
}

impl Sealed {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the manifest and renames the folder into place. If a version with this content
    /// exists already, it is returned as it is and this copy is discarded.
    pub fn commit(
        self,
        store: &Datasets,
        parent: Option<String>,
        operation: Operation,
        role: DatasetRole,
        summary: serde_json::Value,
    ) -> Result<Manifest> {
        if store.contains(&self.id) {
            return store.manifest(&self.id);
        }
        let manifest =
            Manifest { id: self.id.clone(), parent, operation, role, rows: self.rows, created_at: now_rfc3339(), summary };
        let mpath = self.dir.0.join("manifest.json");
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifests serialise");
        (|| {
            let mut f = File::create(&mpath)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            lathe_util::sync_dir(&self.dir.0)
        })()
        .map_err(|e| DataError::io(&mpath, e))?;
        let target = store.version_dir(&self.id);
        match fs::rename(&self.dir.0, &target) {
            Ok(()) => {
                self.dir.disarm();
                lathe_util::sync_dir(store.dir()).map_err(|e| DataError::io(store.dir(), e))?;
                Ok(manifest)
            }
            // Someone else committed the same content meanwhile.
            Err(_) if store.contains(&self.id) => store.manifest(&self.id),
            Err(e) => Err(DataError::io(target, e)),
        }
    }
}

/// Streams the examples of a version, one line at a time.
pub struct Examples {
    path: PathBuf,
    reader: BufReader<File>,
    line: u64,
    buf: String,
}

impl Examples {
    pub fn open(path: &Path) -> Result<Examples> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(Examples { path: path.to_path_buf(), reader: BufReader::with_capacity(1 << 16, f), line: 0, buf: String::new() })
    }
}

impl Iterator for Examples {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Result<Example>> {
        self.buf.clear();
        match self.reader.read_line(&mut self.buf) {
            Ok(0) => None,
            Ok(_) => {
                self.line += 1;
                Some(Example::from_json_line(self.buf.trim_end_matches('\n')).map_err(|e| DataError::CorruptVersion {
                    path: self.path.clone(),
                    line: Some(self.line),
                    message: e.to_string(),
                }))
            }
            Err(e) => Some(Err(DataError::io(&self.path, e))),
        }
    }
}

/// A version opened for reading, whatever its role.
#[derive(Debug, Clone)]
pub struct Version {
    data: PathBuf,
    manifest: Manifest,
}

impl Version {
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn examples(&self) -> Result<Examples> {
        Examples::open(&self.data)
    }

    fn with_role(store: &Datasets, id: &str, role: DatasetRole) -> Result<Version> {
        let v = store.version(id)?;
        if v.manifest.role != role {
            return Err(DataError::WrongRole { id: id.to_string(), expected: role, found: v.manifest.role });
        }
        Ok(v)
    }
}

/// The training side of a split. Only a version whose role is `train` opens as one.
#[derive(Debug, Clone)]
pub struct TrainingSet(Version);

impl TrainingSet {
    pub fn open(store: &Datasets, id: &str) -> Result<TrainingSet> {
        Version::with_role(store, id, DatasetRole::Train).map(TrainingSet)
    }

    pub fn id(&self) -> &str {
        self.0.id()
    }

    pub fn manifest(&self) -> &Manifest {
        self.0.manifest()
    }

    pub fn examples(&self) -> Result<Examples> {
        self.0.examples()
    }
}

/// The held-out side of a split, for evaluation code. Only a version whose role is
/// `heldout` opens as one.
#[derive(Debug, Clone)]
pub struct HeldOut(Version);

impl HeldOut {
    pub fn open(store: &Datasets, id: &str) -> Result<HeldOut> {
        Version::with_role(store, id, DatasetRole::Heldout).map(HeldOut)
    }

    pub fn id(&self) -> &str {
        self.0.id()
    }

    pub fn manifest(&self) -> &Manifest {
        self.0.manifest()
    }

    pub fn examples(&self) -> Result<Examples> {
        self.0.examples()
    }
}
