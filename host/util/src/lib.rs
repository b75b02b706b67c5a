//! The few things every Lathe crate needs done the same way: writes that land whole or
//! not at all ([`write_atomic`]), and content hashes as lower-case hex ([`sha256_hex`],
//! [`sha256_file`], [`hex`]). It depends on nothing heavier than `sha2`, so the engine,
//! the dataset store, the sandbox and the service all use the one implementation.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` so that a reader sees the old file or the whole new one,
/// never a part: a temporary file in the same folder, fsync, rename, fsync of the folder
/// (so the rename itself survives a crash). On error the temporary file is removed and the
/// old file, if any, is untouched: a full disk mid-write loses nothing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] for content produced by a writer (large files, streamed).
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let dir = parent_of(path);
    let tmp = dir.join(temp_name(path));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A temporary name beside `path`: hidden, unique within the process and across
/// processes, recognisable by [`is_temp_name`].
pub fn temp_name(path: &Path) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    format!(".{name}.{}-{n}.tmp", std::process::id())
}

/// Whether a file name is one of [`temp_name`]'s (a write that never finished).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// fsyncs a folder, so that renames into it are durable. Best effort where folders cannot
/// be opened (not Unix).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir) {
        Ok(f) => f.sync_all().or(Ok(())),
        Err(_) => Ok(()),
    }
}

/// A folder written under a temporary name and renamed into place by [`StagedDir::commit`],
/// replacing any folder of that name; dropped without a commit, it is removed. Readers see
/// the old folder or the whole new one (checkpoints, exported models).
pub struct StagedDir {
    tmp: std::path::PathBuf,
    target: std::path::PathBuf,
    committed: bool,
}

impl StagedDir {
    pub fn new(target: &Path) -> io::Result<Self> {
        let parent = parent_of(target);
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(temp_name(target));
        std::fs::create_dir_all(&tmp)?;
        Ok(Self { tmp, target: target.to_path_buf(), committed: false })
    }

    /// Where to write the folder's files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the folder into place (the old one, if any, is removed after).
    pub fn commit(mut self) -> io::Result<()> {
        let parent = parent_of(&self.target).to_path_buf();
        let old = parent.join(temp_name(&self.target) + ".old");
        if self.target.exists() {
            std::fs::rename(&self.target, &old)?;
        }
        std::fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        sync_dir(&parent)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Lower-case hex of a byte slice.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// sha256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of everything `reader` yields, hex, with the number of bytes read; streamed in
/// 1 MiB pieces, so a file of any size takes constant memory.
pub fn sha256_reader(mut reader: impl Read) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&h.finalize()), total))
}

/// sha256 of a file, hex, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    Ok(sha256_reader(File::open(path)?)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_sha256_match_known_values() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let (h, n) = sha256_reader(&b"abc"[..]).unwrap();
        assert_eq!((h.as_str(), n), ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 3));
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, vec!["a.json".to_string()]);
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(is_temp_name(&temp_name(&path)));
    }

    #[test]
    fn a_staged_folder_replaces_the_old_one_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("ckpt");
        let s = StagedDir::new(&target).unwrap();
        std::fs::write(s.path().join("a"), b"1").unwrap();
        s.commit().unwrap();
        let s = StagedDir::new(&target).unwrap();
        std::fs::write(s.path().join("b"), b"2").unwrap();
        drop(s); // a failure before the commit
        assert!(target.join("a").is_file() && !target.join("b").exists());
        let s = StagedDir::new(&target).unwrap();
        std::fs::write(s.path().join("b"), b"2").unwrap();
        s.commit().unwrap();
        assert!(!target.join("a").exists() && target.join("b").is_file());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary folder left");
    }
}
