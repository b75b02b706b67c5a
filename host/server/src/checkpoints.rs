//! Training checkpoints kept in the artifact store, so that a job whose worker died resumes
//! on another machine from its last checkpoint even when the dead worker's disk is gone.
//!
//! After each checkpoint the worker stores the files of the job's run folder that a resume
//! needs (the checkpoints, `best/`, finished sweep runs; content-addressed, so an unchanged
//! file is not uploaded again) and a manifest naming them, then records the manifest's
//! sha256 on the job through its lease ([`Db::record_checkpoint`]): a worker that lost its
//! lease cannot point the job at its own files. A worker that claims the job again restores
//! the folders the manifest names and the run folder lacks, each whole (written aside and
//! renamed into place), before the pipeline looks for its latest checkpoint.
//!
//! Only with an object store: with the local artifact folder, the run folder and the
//! artifacts are on the same disk and a copy would protect nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lathe_store::{ArtifactStore, Db, Lease, StoreError};
use serde::{Deserialize, Serialize};

/// What a resume needs of a run folder: file (relative, `/`-separated) → sha256.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, String>,
}

/// Keeps one running job's checkpoints (see the module documentation).
pub struct Mirror {
    artifacts: Arc<dyn ArtifactStore>,
    db: Db,
    lease: Lease,
    run_dir: PathBuf,
    /// The runtime the job's worker runs on, for the fenced database write.
    runtime: tokio::runtime::Handle,
    /// Files stored already: path → (modified, size, sha256), so an unchanged file is not
    /// hashed again at every checkpoint.
    stored: Mutex<HashMap<PathBuf, (SystemTime, u64, String)>>,
}

impl Mirror {
    pub fn new(artifacts: Arc<dyn ArtifactStore>, db: Db, lease: Lease, run_dir: PathBuf) -> Mirror {
        let runtime = tokio::runtime::Handle::current();
        Mirror { artifacts, db, lease, run_dir, runtime, stored: Mutex::new(HashMap::new()) }
    }

    /// Stores the run folder's files and points the job at them. Called on the job's
    /// blocking thread, right after the trainer completed a checkpoint.
    pub fn keep(&self) -> Result<(), String> {
        let mut manifest = Manifest::default();
        for (name, path) in files_under(&self.run_dir).map_err(|e| format!("{}: {e}", self.run_dir.display()))? {
            let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let stamp = (meta.modified().map_err(|e| e.to_string())?, meta.len());
            let known = self.stored.lock().unwrap().get(&path).filter(|(m, l, _)| (*m, *l) == stamp).map(|(.., sha)| sha.clone());
            let sha256 = match known {
                Some(sha256) => sha256,
                None => {
                    let (sha256, _) = self.artifacts.put_file(&path).map_err(|e| format!("storing {name}: {e}"))?;
                    self.stored.lock().unwrap().insert(path, (stamp.0, stamp.1, sha256.clone()));
                    sha256
                }
            };
            manifest.files.insert(name, sha256);
        }
        let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        let sha256 = self.artifacts.put_bytes(&text).map_err(|e| format!("storing the checkpoint manifest: {e}"))?;
        match self.runtime.block_on(self.db.record_checkpoint(&self.lease, &sha256)) {
            Ok(()) => Ok(()),
            Err(e @ StoreError::LeaseLost { .. }) => Err(e.to_string()),
            Err(e) => {
                // The database is away (a restart): the job still points at the previous
                // checkpoint, and the next one records itself.
                eprintln!("job {}: recording its stored checkpoint: {e}", self.lease.job.id);
                Ok(())
            }
        }
    }
}

/// Puts back into `run_dir` every folder of the manifest `manifest_sha256` that the run
/// folder lacks (and its loose files), each folder whole. Returns how many files were
/// restored.
pub fn restore(artifacts: &dyn ArtifactStore, manifest_sha256: &str, run_dir: &Path) -> Result<usize, String> {
    let path = artifacts.get_path(manifest_sha256).map_err(|e| format!("the checkpoint manifest: {e}"))?;
    let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| format!("the checkpoint manifest {manifest_sha256}: {e}"))?;
    // Folder (relative) → its files; "" holds the run folder's own files.
    let mut folders: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for (name, sha256) in &manifest.files {
        if name.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return Err(format!("the checkpoint manifest {manifest_sha256} names `{name}`, outside the run folder"));
        }
        let (folder, file) = name.rsplit_once('/').unwrap_or(("", name));
        folders.entry(folder).or_default().push((file, sha256));
    }
    let copy = |sha256: &str, to: &Path| -> Result<(), String> {
        let from = artifacts.get_path(sha256).map_err(|e| format!("{}: {e}", to.display()))?;
        std::fs::copy(&from, to).map(drop).map_err(|e| format!("{}: {e}", to.display()))
    };
    let mut restored = 0;
    for (folder, files) in folders {
        if folder.is_empty() {
            for (file, sha256) in files {
                let to = run_dir.join(file);
                if !to.exists() {
                    std::fs::create_dir_all(run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
                    let from = artifacts.get_path(sha256).map_err(|e| format!("{}: {e}", to.display()))?;
                    let bytes = std::fs::read(&from).map_err(|e| format!("{}: {e}", from.display()))?;
                    lathe_util::write_atomic(&to, &bytes).map_err(|e| format!("{}: {e}", to.display()))?;
                    restored += 1;
                }
            }
            continue;
        }
        let target = run_dir.join(folder);
        if target.exists() {
            continue; // folders are written whole: one that exists is complete
        }
        let staged = lathe_util::StagedDir::new(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        for (file, sha256) in &files {
            copy(sha256, &staged.path().join(file))?;
        }
        staged.commit().map_err(|e| format!("{}: {e}", target.display()))?;
        restored += files.len();
    }
    Ok(restored)
}

/// Every file under `root` by its relative `/`-separated name, skipping hidden names: the
/// temporaries of writes in progress (see `lathe_util::temp_name`).
fn files_under(root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut pending = vec![(String::new(), root.to_path_buf())];
    while let Some((prefix, dir)) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if name.starts_with('.') {
                continue;
            }
            let relative = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push((relative, entry.path()));
            } else if kind.is_file() {
                out.push((relative, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}
