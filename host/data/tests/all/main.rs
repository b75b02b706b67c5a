//! Integration tests of lathe-data, one binary (see STYLE.md).

mod curate;
mod import;
mod scale;
mod split;
mod store;

use std::path::{Path, PathBuf};

use lathe_data::Datasets;

/// A store in a fresh temporary folder, and that folder (for source files).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Datasets,
}

impl Env {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Datasets::open(dir.path().join("store")).unwrap();
        Env { dir, store }
    }

    /// Writes `bytes` to a source file named `name` and returns its path.
    pub fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Every entry of `<root>/datasets` (versions, temporary folders, refs).
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    pub fn examples(&self, id: &str) -> Vec<lathe_data::Example> {
        self.store.examples(id).unwrap().map(Result::unwrap).collect()
    }

    pub fn assert_empty(&self) {
        assert_eq!(self.entries(), Vec::<String>::new(), "a failed import must leave nothing behind");
    }
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(std::fs::read(p).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A chat example with a user prompt and an assistant answer.
pub fn qa(q: &str, a: &str) -> lathe_data::Example {
    lathe_data::Example::prompt_completion(None, q, a)
}
