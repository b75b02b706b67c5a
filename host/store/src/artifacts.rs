//! Content-addressed artifacts: datasets, checkpoints, adapters, plugin components, named by
//! the sha256 of their bytes. The same bytes are stored once however often they are put,
//! and an artifact never changes once it exists.
//!
//! The interface is blocking, like the file reads of the code that uses it (training,
//! dataset import); async callers run it under `spawn_blocking` (with
//! `tokio_util::io::SyncIoBridge` to stream a request body into it).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::{Result, StoreError};

mod s3;
pub use s3::{MULTIPART_THRESHOLD, S3Artifacts, S3Config};

/// Folder under the root that holds writes in progress. It is on the same filesystem as the
/// artifacts, so moving a finished write into place is an atomic rename.
const TEMP_DIR: &str = ".tmp";
const COPY_BUFFER: usize = 1 << 20;

/// Where artifacts live. Object-safe, so the server holds an `Arc<dyn ArtifactStore>` and an
/// S3-compatible store can stand in for the local folder.
pub trait ArtifactStore: Send + Sync {
    /// Streams `reader` into the store; returns the sha256 (lower-case hex) and size.
    fn put_reader(&self, reader: &mut dyn Read) -> Result<(String, u64)>;

    /// Like [`put_reader`](Self::put_reader) for bytes announced as `sha256` (an upload with
    /// its checksum, a copy from another store): `Integrity` and nothing stored if they do
    /// not hash to it. Returns the size. If the artifact exists already, `reader` is not read.
    fn put_verified(&self, reader: &mut dyn Read, sha256: &str) -> Result<u64>;

    fn exists(&self, sha256: &str) -> Result<bool>;

    /// A local file with the artifact's bytes, for readers that need a path (memory-mapped
    /// weights). `NotFound` if there is no such artifact.
    fn get_path(&self, sha256: &str) -> Result<PathBuf>;

    /// The sha256 of every artifact, sorted.
    fn list(&self) -> Result<Vec<String>>;

    fn put_file(&self, path: &Path) -> Result<(String, u64)> {
        let mut file = File::open(path).map_err(StoreError::io(path))?;
        self.put_reader(&mut file)
    }

    fn put_bytes(&self, bytes: &[u8]) -> Result<String> {
        let mut reader = bytes;
        Ok(self.put_reader(&mut reader)?.0)
    }

    fn open(&self, sha256: &str) -> Result<Box<dyn Read + Send>> {
        let path = self.get_path(sha256)?;
        let file = File::open(&path).map_err(StoreError::io(&path))?;
        Ok(Box::new(file))
    }
}

/// Artifacts as files `<root>/<first two hex digits>/<sha256>`. A put writes into
/// `<root>/.tmp/`, fsyncs, makes the file read-only, renames it into place and fsyncs the
/// folder: an artifact is there whole or not at all, even across a crash, and a crash only
/// ever leaves debris in `.tmp/`, which no lookup looks at.
#[derive(Clone, Debug)]
pub struct LocalArtifacts {
    root: PathBuf,
}

impl LocalArtifacts {
    /// Uses (and creates) the folder `root`.
    pub fn new(root: impl Into<PathBuf>) -> Result<LocalArtifacts> {
        let root = root.into();
        let temp = root.join(TEMP_DIR);
        fs::create_dir_all(&temp).map_err(StoreError::io(&temp))?;
        Ok(LocalArtifacts { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Deletes unfinished writes older than `older_than`, left behind by a crash. Writes in
    /// progress in other processes are younger than any sensible `older_than` (an hour),
    /// so this is safe to call at every start.
    pub fn remove_stale_temp(&self, older_than: Duration) -> Result<usize> {
        let temp = self.root.join(TEMP_DIR);
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&temp).map_err(StoreError::io(&temp))? {
            let entry = entry.map_err(StoreError::io(&temp))?;
            let path = entry.path();
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .map_err(StoreError::io(&path))?;
            if now.duration_since(modified).unwrap_or_default() >= older_than {
                fs::remove_file(&path).map_err(StoreError::io(&path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn path_of(&self, sha256: &str) -> Result<PathBuf> {
        check_sha(sha256)?;
        Ok(self.root.join(&sha256[..2]).join(sha256))
    }

    /// Copies `reader` into a new temporary file, hashing on the way.
    fn write_temp(&self, reader: &mut dyn Read) -> Result<(NamedTempFile, String, u64)> {
        let temp_dir = self.root.join(TEMP_DIR);
        let mut temp = tempfile::Builder::new()
            .prefix("put-")
            .suffix(".partial")
            .tempfile_in(&temp_dir)
            .map_err(StoreError::io(&temp_dir))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buffer = vec![0u8; COPY_BUFFER];
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(StoreError::Io {
                        path: PathBuf::from("(artifact source)"),
                        source: e,
                    });
                }
            };
            hasher.update(&buffer[..n]);
            temp.write_all(&buffer[..n])
                .map_err(StoreError::io(temp.path()))?;
            size += n as u64;
        }
        Ok((temp, lathe_util::hex(&hasher.finalize()), size))
    }

    /// Moves a finished temporary file into place as `sha256`, durably.
    fn commit(&self, temp: NamedTempFile, sha256: &str) -> Result<()> {
        let dest = self.path_of(sha256)?;
        if dest.exists() {
            return Ok(()); // Same name, same bytes; `temp` is deleted on drop.
        }
        let shard = self.root.join(&sha256[..2]);
        if !shard.exists() {
            fs::create_dir_all(&shard).map_err(StoreError::io(&shard))?;
            sync_dir(&self.root)?;
        }
        let file = temp.as_file();
        file.sync_all().map_err(StoreError::io(temp.path()))?;
        let mut permissions = file
            .metadata()
            .map_err(StoreError::io(temp.path()))?
            .permissions();
        permissions.set_readonly(true);
        file.set_permissions(permissions)
            .map_err(StoreError::io(temp.path()))?;
        // A concurrent put of the same bytes may win the race; its rename and ours leave the
        // same content either way.
        temp.persist(&dest).map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        sync_dir(&shard)
    }
}

impl ArtifactStore for LocalArtifacts {
    fn put_reader(&self, reader: &mut dyn Read) -> Result<(String, u64)> {
        let (temp, sha256, size) = self.write_temp(reader)?;
        self.commit(temp, &sha256)?;
        Ok((sha256, size))
    }

    fn put_verified(&self, reader: &mut dyn Read, sha256: &str) -> Result<u64> {
        let dest = self.path_of(sha256)?;
        if let Ok(meta) = fs::metadata(&dest) {
            return Ok(meta.len());
        }
        let (temp, actual, size) = self.write_temp(reader)?;
        if actual != sha256 {
            return Err(StoreError::Integrity {
                expected: sha256.to_owned(),
                actual,
            });
        }
        self.commit(temp, sha256)?;
        Ok(size)
    }

    fn exists(&self, sha256: &str) -> Result<bool> {
        Ok(self.path_of(sha256)?.is_file())
    }

    fn get_path(&self, sha256: &str) -> Result<PathBuf> {
        let path = self.path_of(sha256)?;
        if path.is_file() {
            Ok(path)
        } else {
            Err(StoreError::not_found("artifact", sha256))
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut shas = Vec::new();
        for shard in fs::read_dir(&self.root).map_err(StoreError::io(&self.root))? {
            let shard = shard.map_err(StoreError::io(&self.root))?.path();
            let Some(prefix) = shard.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if prefix.len() != 2 || !is_lower_hex(prefix) || !shard.is_dir() {
                continue; // `.tmp` and anything else that is not a shard
            }
            for entry in fs::read_dir(&shard).map_err(StoreError::io(&shard))? {
                let entry = entry.map_err(StoreError::io(&shard))?;
                if let Some(name) = entry.file_name().to_str()
                    && check_sha(name).is_ok()
                    && name.starts_with(prefix)
                {
                    shas.push(name.to_owned());
                }
            }
        }
        shas.sort();
        Ok(shas)
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Refuses anything but 64 lower-case hex digits, which also keeps `..` and `/` out of paths.
fn check_sha(sha256: &str) -> Result<()> {
    if sha256.len() == 64 && is_lower_hex(sha256) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "sha256 `{sha256}`: expected 64 lower-case hex digits"
        )))
    }
}

/// fsyncs a folder so that a rename into it survives a crash.
fn sync_dir(dir: &Path) -> Result<()> {
    lathe_util::sync_dir(dir).map_err(StoreError::io(dir))
}
