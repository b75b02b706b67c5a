//! Benchmark helpers for `lathe bench data`: a synthetic JSONL generator and a run of import,
//! statistics, dedupe (exact + near), PII scan and split on one file, timed step by step.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::curate::{self, DedupeParams, PiiMode};
use crate::error::{DataError, Result};
use crate::import::{self, ImportOptions};
use crate::split::{self, SplitParams};
use crate::store::Datasets;
use crate::util::SplitMix64;

const WORDS: &[&str] = &[
    "invoice", "refund", "order", "delivery", "account", "password", "reset", "billing", "address", "warranty",
    "broken", "late", "charge", "subscription", "cancel", "upgrade", "plan", "support", "ticket", "shipping",
    "the", "my", "was", "is", "not", "please", "help", "with", "and", "a", "to", "for", "why", "how", "can", "i",
];
const LABELS: &[&str] = &["billing", "shipping", "account", "product"];

/// Writes `rows` OpenAI-chat JSONL lines with labels; about 2 % exact duplicates, 2 % near
/// duplicates and 1 % containing an e-mail address.
pub fn generate_jsonl(path: &Path, rows: u64, seed: u64) -> Result<()> {
    let f = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 16, f);
    let mut rng = SplitMix64::new(seed);
    let mut prev: Option<(String, String)> = None;
    let mut line = String::new();
    for i in 0..rows {
        let r = rng.next_u64();
        let (q, a) = match (&prev, r % 100) {
            (Some(p), 0 | 1) => p.clone(),
            (Some((q, a)), 2 | 3) => (format!("{q} please"), a.clone()),
            _ => {
                let mut q = String::new();
                for k in 0..12 {
                    if k > 0 {
                        q.push(' ');
                    }
                    q.push_str(WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]);
                }
                if r % 100 == 4 {
                    q.push_str(&format!(" contact me at user{i}@example.com"));
                }
                (q, format!("Ticket {i}: we will look into it within {} days.", r % 7 + 1))
            }
        };
        line.clear();
        line.push_str("{\"messages\":[{\"role\":\"user\",\"content\":");
        line.push_str(&serde_json::to_string(&q).expect("strings serialise"));
        line.push_str("},{\"role\":\"assistant\",\"content\":");
        line.push_str(&serde_json::to_string(&a).expect("strings serialise"));
        line.push_str("}],\"label\":\"");
        line.push_str(LABELS[(r >> 32) as usize % LABELS.len()]);
        line.push_str("\"}\n");
        w.write_all(line.as_bytes()).map_err(|e| DataError::io(path, e))?;
        prev = Some((q, a));
    }
    w.flush().map_err(|e| DataError::io(path, e))
}

/// Seconds per step and throughput of [`run`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub rows: u64,
    pub source_bytes: u64,
    pub import_s: f64,
    pub import_rows_per_s: f64,
    pub import_mb_per_s: f64,
    pub statistics_s: f64,
    pub dedupe_s: f64,
    pub dedupe_dropped: u64,
    pub pii_s: f64,
    pub pii_rows: u64,
    pub split_s: f64,
    pub heldout_rows: u64,
}

/// Imports `source` into a store under `store_root`, then times statistics, dedupe (exact and
/// near, default parameters), a PII report and a split of the deduplicated version.
pub fn run(store_root: &Path, source: &Path, opts: &ImportOptions) -> Result<BenchReport> {
    let store = Datasets::open(store_root)?;
    let t = Instant::now();
    let imported = import::import_file(&store, source, opts)?;
    let import_s = t.elapsed().as_secs_f64();
    let id = imported.manifest.id.clone();

    let t = Instant::now();
    curate::statistics(&store, &id, None)?;
    let statistics_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let deduped = curate::dedupe(&store, &id, &DedupeParams::default())?;
    let dedupe_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let pii = curate::scan_pii(&store, &deduped.manifest.id, PiiMode::Report)?;
    let pii_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let split = split::split(&store, &deduped.manifest.id, &SplitParams::default())?;
    let split_s = t.elapsed().as_secs_f64();

    let rows = imported.report.rows;
    let bytes = imported.report.source_bytes;
    Ok(BenchReport {
        rows,
        source_bytes: bytes,
        import_s,
        import_rows_per_s: rows as f64 / import_s,
        import_mb_per_s: bytes as f64 / 1e6 / import_s,
        statistics_s,
        dedupe_s,
        dedupe_dropped: deduped.report.exact_dropped + deduped.report.near_dropped,
        pii_s,
        pii_rows: pii.report.rows_with_pii,
        split_s,
        heldout_rows: split.report.heldout_rows,
    })
}
