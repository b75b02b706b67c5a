//! `lathe data ...`: import files into the dataset store, curate, split, inspect.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lathe_data::curate::{DedupeParams, PiiMode, ValidateMode};
use lathe_data::split::SplitParams;
use lathe_data::{FieldMapping, ImportOptions, NearDupParams, Store};

use crate::cli::DataDir;

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

/// The import hook over a WebAssembly formatter plugin.
struct PluginFormatter {
    name: String,
    instance: lathe_sandbox::Instance,
}

impl lathe_data::RecordFormatter for PluginFormatter {
    fn format(&mut self, record: serde_json::Value) -> std::result::Result<lathe_data::Example, lathe_data::RecordError> {
        use lathe_data::{Message, Problem, RecordError, Role};
        let fail = |message: String| RecordError::whole(Problem::Formatter { message });
        match self.instance.format(&record.to_string()) {
            Err(e) => Err(fail(e.to_string())),
            Ok(Err(field)) => Err(RecordError::new(field.field, Problem::Formatter { message: field.message })),
            Ok(Ok(lathe_sandbox::Example::Completion { prompt, completion })) => {
                Ok(lathe_data::Example::prompt_completion(None, &prompt, &completion))
            }
            Ok(Ok(lathe_sandbox::Example::Chat(messages))) => {
                let messages = messages
                    .into_iter()
                    .map(|m| {
                        Role::parse(&m.role)
                            .map(|r| Message::new(r, m.content))
                            .ok_or_else(|| fail(format!("the formatter returned the unknown role `{}`", m.role)))
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let example = lathe_data::Example::new(messages);
                example.validate()?;
                Ok(example)
            }
        }
    }

    fn format_name(&self) -> lathe_data::Format {
        lathe_data::Format::Plugin(self.name.clone())
    }
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

pub fn open_store(dir: &DataDir) -> Result<Store> {
    Ok(Store::open(dir.path())?)
}

fn import(a: ImportArgs) -> Result<()> {
    let store = open_store(&a.dir)?;
    let mut opts = ImportOptions::default();
    if let (Some(p), Some(c)) = (&a.prompt_col, &a.completion_col) {
        let mut m = FieldMapping::new(p, c);
        if let Some(s) = &a.system_col {
            m = m.with_system(s);
        }
        if let Some(l) = &a.label_col {
            m = m.with_label(l);
        }
        opts.mapping = Some(m);
    }
    let imported = match &a.formatter {
        Some(name) => {
            let runtime = crate::plugin::runtime()?;
            let plugin = lathe_jobs::eval::load_plugin(&runtime, name, lathe_sandbox::Kind::Formatter)?;
            let instance = plugin.instance(&json_arg(&a.formatter_config)?.to_string())?;
            let mut f = PluginFormatter {
                name: name.clone(),
                instance,
            };
            lathe_data::import_with(&store, &a.file, &opts, &mut f)?
        }
        None => lathe_data::import_file(&store, &a.file, &opts)?,
    };
    let r = &imported.report;
    println!(
        "{}: detected {} ({:?}), {} rows, {} blank lines skipped",
        r.source,
        r.format.as_str(),
        r.container,
        r.rows,
        r.blank_lines
    );
    println!("version {}", imported.manifest.id);
    if let Some(name) = &a.name {
        store.set_ref(name, &imported.manifest.id)?;
        println!("named {name}");
    }
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
    let store = open_store(&a.dir)?;
    let mut current = store.resolve(&a.version)?;
    if a.dedupe || a.near.is_some() {
        let params = match a.near {
            Some(t) => DedupeParams::near(t),
            None => DedupeParams::exact_only(),
        };
        let out = lathe_data::curate::dedupe(&store, &current, &params)?;
        println!("dedupe: {}", out.report.summary());
        current = out.manifest.id.clone();
    }
    if let Some(mode) = &a.pii {
        let mode = match mode.as_str() {
            "report" => PiiMode::Report,
            "redact" => PiiMode::Redact,
            "drop" => PiiMode::Drop,
            other => anyhow::bail!("--pii {other}: expected report, redact or drop"),
        };
        let out = lathe_data::curate::scan_pii(&store, &current, mode)?;
        println!("pii: {}", out.report.summary());
        for hit in out.report.hits.iter().take(10) {
            println!("  example {} {}: {:?} at {}..{}", hit.example, hit.field, hit.kind, hit.start, hit.end);
        }
        current = out.manifest.id.clone();
    }
    if let Some(v) = &a.validator {
        let runtime = crate::plugin::runtime()?;
        let plugin = lathe_jobs::eval::load_plugin(&runtime, v, lathe_sandbox::Kind::Validator)?;
        let config = json_arg(&a.validator_config)?.to_string();
        let inst = std::cell::RefCell::new(plugin.instance(&config)?);
        let validator = |output: &str| -> std::result::Result<(), Vec<String>> {
            match inst.borrow_mut().validate(output) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(v)) => Err(v.into_iter().map(|v| format!("{}: {}", v.path, v.message)).collect()),
                Err(e) => Err(vec![format!("the validator failed: {e}")]),
            }
        };
        let mode = if a.drop_invalid { ValidateMode::Drop } else { ValidateMode::Report };
        let out = lathe_data::curate::validate_outputs(&store, &current, &validator, v, mode)?;
        println!("validator {v}: {} of {} outputs fail", out.report.failures.len(), out.report.checked);
        for f in out.report.failures.iter().take(10) {
            println!("  example {}: {}", f.example, f.violations.join("; "));
        }
        current = out.manifest.id.clone();
    }
    println!("version {current}");
    if let Some(name) = &a.name {
        store.set_ref(name, &current)?;
        println!("named {name}");
    }
    Ok(())
}

fn split(a: SplitArgs) -> Result<()> {
    let store = open_store(&a.dir)?;
    let id = store.resolve(&a.version)?;
    let params = SplitParams {
        heldout_fraction: a.heldout,
        seed: a.seed,
        stratify: !a.no_stratify,
        near: Some(NearDupParams::default()),
    };
    let out = lathe_data::split::split(&store, &id, &params)?;
    let r = &out.report;
    println!(
        "{} rows → train {} ({}), held out {} ({}); {} duplicate groups kept on one side",
        r.input_rows, r.train_rows, out.train.id, r.heldout_rows, out.heldout.id, r.duplicate_groups
    );
    let train = lathe_data::TrainingSet::open(&store, &out.train.id)?;
    let held = lathe_data::HeldOut::open(&store, &out.heldout.id)?;
    let leak = lathe_data::split::check_leakage(&store, &train, &held, Some(&NearDupParams::default()))?;
    println!("leakage check: {} exact, {} near duplicates across the split", leak.exact.len(), leak.near.len());
    if let Some(name) = &a.name {
        store.set_ref(&format!("{name}.train"), &out.train.id)?;
        store.set_ref(&format!("{name}.heldout"), &out.heldout.id)?;
        println!("named {name}.train and {name}.heldout");
    }
    Ok(())
}

struct ModelTokens(lathe_engine::Tokenizer);

impl lathe_data::TokenCounter for ModelTokens {
    fn count(&self, text: &str) -> usize {
        self.0.encode(text, false).map_or(0, |t| t.len())
    }
}

fn stats(a: StatsArgs) -> Result<()> {
    let store = open_store(&a.dir)?;
    let id = store.resolve(&a.version)?;
    let counter = match &a.model {
        Some(m) => Some(ModelTokens(crate::cli::load_tokenizer(m)?)),
        None => None,
    };
    let s = lathe_data::curate::statistics(&store, &id, counter.as_ref().map(|c| c as &dyn lathe_data::TokenCounter))?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

fn show(a: ShowArgs) -> Result<()> {
    let store = open_store(&a.dir)?;
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
