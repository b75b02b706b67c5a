//! Writes that land completely or not at all.

use std::io::Write;
use std::path::Path;

use crate::error::{EngineError, Result};

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, and renames it into place,
/// so a reader never sees a half-written file, even after a crash or a full disk.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(EngineError::io(path, e));
    }
    Ok(())
}
