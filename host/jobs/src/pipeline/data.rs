//! Dataset pipelines: import (with format detection or a formatter plugin), curate
//! (dedupe, PII, validator), split with its leakage check, and statistics. Each makes
//! immutable, content-addressed versions in the environment's dataset store.

use std::path::PathBuf;
use std::sync::Mutex;

use lathe_data::curate::{DedupeParams, DedupeReport, PiiMode, PiiReport, Statistics, ValidateMode, ValidationReport};
use lathe_data::split::{LeakageReport, SplitParams, SplitReport};
use lathe_data::import::ImportReport;
use lathe_data::{FieldMapping, ImportOptions, NearDupParams};
use lathe_sandbox::Kind;
use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::{JobError, Result};
use crate::eval::PluginRef;
use crate::event::Sink;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSpec {
    pub file: PathBuf,
    /// The name errors and the manifest use for the file (an upload's name); default: the
    /// file's name.
    #[serde(default)]
    pub source_name: Option<String>,
    /// Name the new version (`invoices`), usable wherever a version id is.
    #[serde(default)]
    pub name: Option<String>,
    /// CSV/Parquet: which columns hold the prompt, completion, system and label.
    #[serde(default)]
    pub mapping: Option<FieldMapping>,
    /// Turn each raw record into an example with this formatter plugin.
    #[serde(default)]
    pub formatter: Option<PluginRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportOutcome {
    pub version: String,
    pub report: ImportReport,
}

pub fn import(env: &Env, spec: &ImportSpec, sink: &dyn Sink) -> Result<ImportOutcome> {
    let store = env.datasets()?;
    sink.started("data.import", format!("import {}", spec.source_name.clone().unwrap_or_else(|| spec.file.display().to_string())));
    // An upload is stored under its hash, without its extension: the container comes from
    // the name the user gave it.
    let kind = spec.source_name.as_deref().map(|n| lathe_data::SourceKind::from_path(std::path::Path::new(n)));
    let opts = ImportOptions { source_name: spec.source_name.clone(), mapping: spec.mapping.clone(), kind, ..ImportOptions::default() };
    let imported = match &spec.formatter {
        Some(f) => {
            let plugin = env.plugin_ref(&f.plugin, f.sha256.as_deref(), f.limits, Kind::Formatter)?;
            let instance = plugin.instance(&f.config.to_string()).map_err(|e| JobError::PluginCall { plugin: f.plugin.clone(), item: 0, source: e })?;
            let mut formatter = PluginFormatter { name: f.plugin.clone(), instance };
            lathe_data::import_with(&store, &spec.file, &opts, &mut formatter)?
        }
        None => lathe_data::import_file(&store, &spec.file, &opts)?,
    };
    let r = &imported.report;
    if let Some(name) = &spec.name {
        store.set_ref(name, &imported.manifest.id)?;
    }
    sink.artifact("dataset", &store.version_dir(&imported.manifest.id));
    sink.finished(
        "data.import",
        format!(
            "{}: detected {} ({:?}), {} rows, {} blank lines skipped → version {}{}",
            r.source,
            r.format.as_str(),
            r.container,
            r.rows,
            r.blank_lines,
            imported.manifest.id,
            spec.name.as_ref().map(|n| format!(" named {n}")).unwrap_or_default()
        ),
    );
    Ok(ImportOutcome { version: imported.manifest.id, report: imported.report })
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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurateSpec {
    /// Version id or name.
    pub version: String,
    /// Drop exact duplicates (after normalisation).
    #[serde(default)]
    pub dedupe: bool,
    /// Also drop near duplicates at this Jaccard similarity (MinHash + LSH).
    #[serde(default)]
    pub near: Option<f64>,
    #[serde(default)]
    pub pii: Option<PiiMode>,
    /// Check every target output with this validator plugin.
    #[serde(default)]
    pub validator: Option<PluginRef>,
    /// Drop examples whose output fails the validator (default: report only).
    #[serde(default)]
    pub drop_invalid: bool,
    /// Name the final version.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurateOutcome {
    pub version: String,
    pub dedupe: Option<DedupeReport>,
    pub pii: Option<PiiReport>,
    pub validation: Option<ValidationReport>,
}

pub fn curate(env: &Env, spec: &CurateSpec, sink: &dyn Sink) -> Result<CurateOutcome> {
    let store = env.datasets()?;
    let mut current = store.resolve(&spec.version)?;
    let mut out = CurateOutcome { version: String::new(), dedupe: None, pii: None, validation: None };
    if spec.dedupe || spec.near.is_some() {
        sink.started("data.dedupe", "remove duplicates");
        let params = match spec.near {
            Some(t) => DedupeParams::near(t),
            None => DedupeParams::exact_only(),
        };
        let d = lathe_data::curate::dedupe(&store, &current, &params)?;
        sink.finished("data.dedupe", format!("dedupe: {}", d.report.summary()));
        current = d.manifest.id;
        out.dedupe = Some(d.report);
    }
    if let Some(mode) = spec.pii {
        sink.check_cancelled()?;
        sink.started("data.pii", "scan for personal data");
        let p = lathe_data::curate::scan_pii(&store, &current, mode)?;
        sink.finished("data.pii", format!("pii: {}", p.report.summary()));
        for hit in p.report.hits.iter().take(10) {
            sink.info(format!("example {} {}: {:?} at {}..{}", hit.example, hit.field, hit.kind, hit.start, hit.end));
        }
        current = p.manifest.id;
        out.pii = Some(p.report);
    }
    if let Some(v) = &spec.validator {
        sink.check_cancelled()?;
        sink.started("data.validate", format!("check outputs with {}", v.plugin));
        let plugin = env.plugin_ref(&v.plugin, v.sha256.as_deref(), v.limits, Kind::Validator)?;
        let inst = Mutex::new(
            plugin.instance(&v.config.to_string()).map_err(|e| JobError::PluginCall { plugin: v.plugin.clone(), item: 0, source: e })?,
        );
        let validator = |output: &str| -> std::result::Result<(), Vec<String>> {
            match inst.lock().expect("validator lock").validate(output) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(v)) => Err(v.into_iter().map(|v| format!("{}: {}", v.path, v.message)).collect()),
                Err(e) => Err(vec![format!("the validator failed: {e}")]),
            }
        };
        let mode = if spec.drop_invalid { ValidateMode::Drop } else { ValidateMode::Report };
        // The version's history names the exact component that checked it, as eval runs do.
        let checked_by = format!("{}@sha256:{}", v.plugin, plugin.info().sha256);
        let r = lathe_data::curate::validate_outputs(&store, &current, &validator, &checked_by, mode)?;
        for f in r.report.failures.iter().take(10) {
            sink.info(format!("example {}: {}", f.example, f.violations.join("; ")));
        }
        sink.finished("data.validate", format!("validator {}: {} of {} outputs fail", v.plugin, r.report.failures.len(), r.report.checked));
        current = r.manifest.id;
        out.validation = Some(r.report);
    }
    if let Some(name) = &spec.name {
        store.set_ref(name, &current)?;
    }
    sink.artifact("dataset", &store.version_dir(&current));
    out.version = current;
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    pub version: String,
    /// Share held out, in (0, 1); the workflow wants 0.1–0.2.
    #[serde(default = "default_heldout")]
    pub heldout: f64,
    #[serde(default)]
    pub seed: u64,
    /// Keep each label's share equal on both sides.
    #[serde(default = "yes")]
    pub stratify: bool,
    /// Names `NAME.train` and `NAME.heldout` for the two parts.
    #[serde(default)]
    pub name: Option<String>,
}

fn default_heldout() -> f64 {
    0.15
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitOutcome {
    pub train: String,
    pub heldout: String,
    pub report: SplitReport,
    pub leakage: LeakageReport,
}

pub fn split(env: &Env, spec: &SplitSpec, sink: &dyn Sink) -> Result<SplitOutcome> {
    let store = env.datasets()?;
    let id = store.resolve(&spec.version)?;
    sink.started("data.split", format!("hold out {:.0} %", spec.heldout * 100.0));
    let params = SplitParams { heldout_fraction: spec.heldout, seed: spec.seed, stratify: spec.stratify, near: Some(NearDupParams::default()) };
    let out = lathe_data::split::split(&store, &id, &params)?;
    let train = lathe_data::TrainingSet::open(&store, &out.train.id)?;
    let held = lathe_data::HeldOut::open(&store, &out.heldout.id)?;
    let leakage = lathe_data::split::check_leakage(&store, &train, &held, Some(&NearDupParams::default()))?;
    if let Some(name) = &spec.name {
        store.set_ref(&format!("{name}.train"), &out.train.id)?;
        store.set_ref(&format!("{name}.heldout"), &out.heldout.id)?;
    }
    let r = &out.report;
    sink.finished(
        "data.split",
        format!(
            "{} rows → train {} ({}), held out {} ({}); {} duplicate groups kept on one side; leakage check: {} exact, {} near duplicates across the split",
            r.input_rows,
            r.train_rows,
            &out.train.id[..16],
            r.heldout_rows,
            &out.heldout.id[..16],
            r.duplicate_groups,
            leakage.exact.len(),
            leakage.near.len()
        ),
    );
    Ok(SplitOutcome { train: out.train.id, heldout: out.heldout.id, report: out.report, leakage })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsSpec {
    pub version: String,
    /// Count tokens with this model's tokenizer (no weights are loaded).
    #[serde(default)]
    pub model: Option<PathBuf>,
}

/// A version's statistics and, when counted with a model's tokenizer, that model's
/// context length, so that examples longer than it (truncated in training) show.
#[derive(Debug, Clone, Serialize)]
pub struct StatsOutcome {
    #[serde(flatten)]
    pub statistics: Statistics,
    pub context_length: Option<usize>,
}

pub fn stats(env: &Env, spec: &StatsSpec, sink: &dyn Sink) -> Result<StatsOutcome> {
    let store = env.datasets()?;
    let id = store.resolve(&spec.version)?;
    sink.started("data.stats", format!("statistics of {}", &id[..16]));
    let (counter, context_length) = match &spec.model {
        Some(m) if m.is_dir() => (
            Some(ModelTokens(lathe_engine::Tokenizer::from_hf_folder(m)?)),
            Some(lathe_engine::config::ModelConfig::from_hf_file(&m.join("config.json"))?.max_position_embeddings),
        ),
        Some(m) => {
            let g = lathe_engine::gguf::GgufFile::open(m)?;
            (Some(ModelTokens(lathe_engine::Tokenizer::from_gguf(&g)?)), Some(lathe_engine::config::ModelConfig::from_gguf(&g)?.max_position_embeddings))
        }
        None => (None, None),
    };
    let s = lathe_data::curate::statistics(&store, &id, counter.as_ref().map(|c| c as &dyn lathe_data::TokenCounter))?;
    let longest = s.tokens.map(|t| t.total.max);
    let over = match (longest, context_length) {
        (Some(l), Some(c)) if l as usize > c => format!("; the longest, {l} tokens, exceeds the model's context of {c}"),
        (Some(l), Some(c)) => format!("; all fit the model's context of {c} tokens (the longest has {l})"),
        _ => String::new(),
    };
    sink.finished("data.stats", format!("{} examples{over}", s.rows));
    Ok(StatsOutcome { statistics: s, context_length })
}

struct ModelTokens(lathe_engine::Tokenizer);

impl lathe_data::TokenCounter for ModelTokens {
    fn count(&self, text: &str) -> usize {
        self.0.encode(text, false).map_or(0, |t| t.len())
    }
}

