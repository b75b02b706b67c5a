//! `lathe data ...`: import files into the dataset store, curate, split, inspect.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lathe_data::FieldMapping;
use lathe_data::curate::PiiMode;
use lathe_jobs::eval::PluginRef;
use lathe_jobs::pipeline::{self, data::{CurateSpec, ImportSpec, SplitSpec, StatsSpec}};

use crate::cli::{DataDir, run_job};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Import JSONL (chat, prompt/completion, Alpaca, ShareGPT), CSV or Parquet.
    Import(ImportArgs),
    /// Deduplicate, scan for PII, check outputs with a validator plugin: each step makes a
    /// new version.
    Curate(CurateArgs),
    /// Split into train and held-out versions, with a leakage check.
    Split(SplitArgs),
    /// Counts, lengths (in the model's tokens with --model), labels, duplicates, PII.
    Stats(StatsArgs),
    /// A version's manifest, lineage and first examples; without a version, every version.
    Show(ShowArgs),
}

#[derive(Args)]
pub struct ImportArgs {
    file: PathBuf,
    /// Name the new version (`invoices`), usable wherever a version id is.
    #[arg(long)]
    name: Option<String>,
    /// CSV/Parquet: the column holding the prompt (user message).
    #[arg(long, requires = "completion_col")]
    prompt_col: Option<String>,
    /// CSV/Parquet: the column holding the completion (assistant message).
    #[arg(long, requires = "prompt_col")]
    completion_col: Option<String>,
    #[arg(long)]
    system_col: Option<String>,
    #[arg(long)]
    label_col: Option<String>,
    /// Turn each raw record (a JSON line, or a CSV/Parquet row as {column: value}) into an
    /// example with this formatter plugin (built-in name or .wasm), for any other format.
    #[arg(long, conflicts_with = "prompt_col")]
    formatter: Option<String>,
    /// The formatter's JSON configuration (a file path or inline JSON).
    #[arg(long, default_value = "{}", requires = "formatter")]
    formatter_config: String,
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args)]
pub struct CurateArgs {
    /// Version id or name.
    version: String,
    /// Drop exact duplicates (after normalisation).
    #[arg(long)]
    dedupe: bool,
    /// Also drop near duplicates at this Jaccard similarity (MinHash + LSH), e.g. 0.8.
    #[arg(long)]
    near: Option<f64>,
    /// report, redact or drop
    #[arg(long)]
    pii: Option<String>,
    /// Validate every target output with this validator plugin (built-in name or .wasm).
    #[arg(long)]
    validator: Option<String>,
    /// The validator's JSON configuration (a file path or inline JSON).
    #[arg(long, default_value = "{}")]
    validator_config: String,
    /// Drop examples whose output fails the validator (default: report only).
    #[arg(long)]
    drop_invalid: bool,
    /// Name the final version.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args)]
pub struct SplitArgs {
    version: String,
    /// Share held out, in (0, 1).
    #[arg(long, default_value_t = 0.15)]
    heldout: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stratify by label.
    #[arg(long)]
    no_stratify: bool,
    /// Names `NAME.train` and `NAME.heldout` for the two parts.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args)]
pub struct StatsArgs {
    version: String,
    /// Count tokens with this model's tokenizer.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args)]
pub struct ShowArgs {
    version: Option<String>,
    /// Examples to print.
    #[arg(long, default_value_t = 3)]
    limit: usize,
    #[command(flatten)]
    dir: DataDir,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Import(a) => import(a),
        DataCommand::Curate(a) => curate(a),
        DataCommand::Split(a) => split(a),
        DataCommand::Stats(a) => stats(a),
        DataCommand::Show(a) => show(a),
    }
}

fn import(a: ImportArgs) -> Result<()> {
    let mapping = match (&a.prompt_col, &a.completion_col) {
        (Some(p), Some(c)) => {
            let mut m = FieldMapping::new(p, c);
            if let Some(s) = &a.system_col {
                m = m.with_system(s);
            }
            if let Some(l) = &a.label_col {
                m = m.with_label(l);
            }
            Some(m)
        }
        _ => None,
    };
    let formatter = match &a.formatter {
        Some(name) => Some(PluginRef::new(name.clone(), json_arg(&a.formatter_config)?)),
        None => None,
    };
    let spec = ImportSpec { file: a.file, source_name: None, name: a.name, mapping, formatter };
    run_job(&a.dir.env(), &spec, pipeline::data::import)?;
    Ok(())
}

/// Reads inline JSON or a JSON file.
pub fn json_arg(s: &str) -> Result<serde_json::Value> {
    let text = if s.trim_start().starts_with(['{', '[']) {
        s.to_string()
    } else {
        std::fs::read_to_string(s).with_context(|| format!("reading {s}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{s}: not JSON"))
}

fn curate(a: CurateArgs) -> Result<()> {
    let pii = match a.pii.as_deref() {
        None => None,
        Some("report") => Some(PiiMode::Report),
        Some("redact") => Some(PiiMode::Redact),
        Some("drop") => Some(PiiMode::Drop),
        Some(other) => anyhow::bail!("--pii {other}: expected report, redact or drop"),
    };
    let validator = match &a.validator {
        Some(v) => Some(PluginRef::new(v.clone(), json_arg(&a.validator_config)?)),
        None => None,
    };
    let spec = CurateSpec { version: a.version, dedupe: a.dedupe, near: a.near, pii, validator, drop_invalid: a.drop_invalid, name: a.name };
    let out = run_job(&a.dir.env(), &spec, pipeline::data::curate)?;
    println!("version {}", out.version);
    Ok(())
}

fn split(a: SplitArgs) -> Result<()> {
    let spec = SplitSpec { version: a.version, heldout: a.heldout, seed: a.seed, stratify: !a.no_stratify, name: a.name };
    run_job(&a.dir.env(), &spec, pipeline::data::split)?;
    Ok(())
}

fn stats(a: StatsArgs) -> Result<()> {
    let spec = StatsSpec { version: a.version, model: a.model };
    let s = run_job(&a.dir.env(), &spec, pipeline::data::stats)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

fn show(a: ShowArgs) -> Result<()> {
    let store = a.dir.env().datasets()?;
    let Some(version) = &a.version else {
        let refs = store.refs()?;
        for m in store.versions()? {
            let names: Vec<&str> = refs.iter().filter(|(_, v)| **v == m.id).map(|(k, _)| k.as_str()).collect();
            println!("{}  {:>8} rows  {:?}  {}  {}", &m.id[..16], m.rows, m.role, m.created_at, names.join(", "));
        }
        return Ok(());
    };
    let id = store.resolve(version)?;
    let m = store.manifest(&id)?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    println!("lineage:");
    for (depth, v) in store.lineage(&id)?.iter().enumerate() {
        println!("  {}{} {}", "  ".repeat(depth), &v.id[..16], serde_json::to_string(&v.operation)?);
    }
    for (i, e) in store.examples(&id)?.take(a.limit).enumerate() {
        println!("--- example {i}");
        println!("{}", e?.to_canonical());
    }
    Ok(())
}
