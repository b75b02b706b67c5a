//! `lathe bench artifacts`: how fast the artifact store takes and gives back large files
//! (checkpoints, adapters, datasets), on the local folder or an S3-compatible bucket.
//!
//! Each artifact is a file of its own random bytes (so none is deduplicated), written before
//! the clock starts. An upload is `put_file` as the service does it: hashed into the cache,
//! then sent (one PUT up to 16 MiB, a multipart upload above). A download is `get_path`
//! through a second store with an empty cache, as another machine would read it: fetched,
//! verified against its sha256 and cached. `scripts/bench_s3.sh` runs this against a moto
//! server on loopback next to boto3 doing the same (`scripts/bench_boto3.py`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Args;
use lathe_store::{ArtifactStore, LocalArtifacts, S3Artifacts, S3Config};

#[derive(Args)]
pub struct ArtifactsBench {
    /// `s3://bucket[/prefix]` (endpoint and keys from the `AWS_*` variables); default: a
    /// local artifact folder in a temporary directory.
    #[arg(long, env = "LATHE_ARTIFACTS")]
    artifacts: Option<String>,
    /// Size of each artifact in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Artifacts uploaded, then downloaded, one after another.
    #[arg(long, default_value_t = 4)]
    count: usize,
    #[arg(long)]
    json: bool,
}

pub fn artifacts(a: &ArtifactsBench) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let size = a.size_mib << 20;
    let files: Vec<PathBuf> = (0..a.count)
        .map(|i| {
            let path = dir.path().join(format!("blob-{i}"));
            write_random(&path, size, seed())?;
            Ok(path)
        })
        .collect::<Result<_>>()?;
    let open = |cache: &Path| -> Result<Box<dyn ArtifactStore>> {
        let cache = LocalArtifacts::new(cache)?;
        Ok(match &a.artifacts {
            Some(url) => Box::new(S3Artifacts::open(&S3Config::new(url.clone()), cache)?),
            None => Box::new(cache),
        })
    };
    let writer = open(&dir.path().join("cache-writer"))?;
    let mut shas = Vec::new();
    let start = Instant::now();
    for file in &files {
        shas.push(writer.put_file(file).with_context(|| format!("uploading {}", file.display()))?.0);
    }
    let upload = start.elapsed();
    // Another machine, with nothing cached; a local folder has nothing to download.
    let download = match a.artifacts {
        Some(_) => {
            let reader = open(&dir.path().join("cache-reader"))?;
            let start = Instant::now();
            for sha in &shas {
                let path = reader.get_path(sha)?;
                ensure!(std::fs::metadata(&path)?.len() == size, "{sha} came back with another size");
            }
            Some(start.elapsed())
        }
        None => None,
    };
    let mib = (size * a.count as u64) as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();
    let store = a.artifacts.as_deref().unwrap_or("local folder");
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "engine": "lathe", "store": store, "size_mib": a.size_mib, "count": a.count,
                "upload_mib_per_s": rate(upload), "download_mib_per_s": download.map(rate),
            })
        );
    } else {
        let download = download.map_or("nothing to download".into(), |d| format!("download {:.0} MiB/s ({:.2} s)", rate(d), d.as_secs_f64()));
        println!("{store}: {} × {} MiB; upload {:.0} MiB/s ({:.2} s), {download}", a.count, a.size_mib, rate(upload), upload.as_secs_f64());
    }
    Ok(())
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    nanos as u64 ^ u64::from(std::process::id()) << 32
}

/// `size` bytes from splitmix64: incompressible, and different for every seed.
fn write_random(path: &Path, size: u64, mut state: u64) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}
