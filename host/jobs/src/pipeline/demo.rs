//! The demo: the workflow end to end on a generated invoice-extraction task, composed of
//! the same pipelines the CLI and the server run one by one — the eval suite first, data
//! imported, curated and split, the prompted baseline, a LoRA pilot, the verdict with its
//! forgetting check, the fine-tune merged and quantized to int8 and int4 (each evaluated
//! against the gate), and a report of what each step cost.

use std::path::PathBuf;

use lathe_data::curate::PiiMode;
use lathe_engine::Adapter;
use lathe_engine::train::Schedule;
use serde::{Deserialize, Serialize};

use super::data::{CurateSpec, ImportSpec, SplitSpec};
use super::eval::{BaselineSpec, EvalSpec, ReportOutcome};
use super::train::{ExportFormat, ExportSpec, TrainSpec};
use crate::env::Env;
use crate::error::Result;
use crate::eval::report::Report;
use crate::eval::{self, Subject};
use crate::event::Sink;
use crate::invoices;
use crate::settings::TrainSettings;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoSpec {
    /// A GGUF file or Hugging Face folder.
    pub model: PathBuf,
    /// Invoices generated for the task.
    pub examples: usize,
    /// Held-out items evaluated (the first N of the held-out part).
    pub eval_items: usize,
    pub epochs: usize,
    /// Optimizer steps of the pilot (0: the whole epochs).
    pub max_steps: usize,
    /// A short pilot wants more than the 1e-4 default.
    pub lr: f64,
    pub rank: usize,
    pub seed: u64,
    /// Skip the few-shot variants of the baseline (faster).
    pub zero_shot_only: bool,
}

impl Default for DemoSpec {
    fn default() -> Self {
        Self {
            model: PathBuf::from(crate::DEFAULT_MODEL),
            examples: 160,
            eval_items: 20,
            epochs: 1,
            max_steps: 16,
            lr: 1e-3,
            rank: 8,
            seed: 7,
            zero_shot_only: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoOutcome {
    pub baseline: f64,
    pub fine_tune: f64,
    /// `better`, `no difference` or `worse`.
    pub verdict: String,
    pub forgot: bool,
    pub adapter_dir: PathBuf,
    /// The fine-tune's quantized exports, as evaluated.
    pub variants: Vec<Variant>,
    pub report: ReportOutcome,
}

#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub format: ExportFormat,
    pub path: PathBuf,
    pub metric: f64,
    pub passed_gate: Option<bool>,
}

/// The merged fine-tune is quantized to these for serving.
const QUANTIZED: [ExportFormat; 2] = [ExportFormat::GgufQ8_0, ExportFormat::GgufQ4_1];

pub fn run(env: &Env, spec: &DemoSpec, sink: &dyn Sink) -> Result<DemoOutcome> {
    let root = env.root();
    std::fs::create_dir_all(root).map_err(|e| crate::JobError::io(root, e))?;

    sink.started("demo.suite", "1/7 the task and its eval suite, before any training");
    let mut suite = invoices::invoice_suite();
    if spec.zero_shot_only {
        suite.shots = vec![0];
    }
    let suite_path = root.join("suite.json");
    lathe_util::write_atomic(&suite_path, serde_json::to_string_pretty(&suite).expect("suites serialise").as_bytes())
        .map_err(|e| crate::JobError::io(&suite_path, e))?;
    sink.artifact("suite", &suite_path);
    sink.finished(
        "demo.suite",
        format!(
            "suite `{}`: {} prompt templates, scorer {}, validator json-schema, gate {} ≥ {}",
            suite.name,
            suite.templates.len(),
            suite.scorers[0].plugin,
            suite.gate.as_ref().map_or("-", |g| g.metric.as_str()),
            suite.gate.as_ref().map_or(0.0, |g| g.min),
        ),
    );

    sink.started("demo.data", "2/7 data: import, curate, split");
    let raw = root.join("invoices.jsonl");
    invoices::write_jsonl(&raw, &invoices::invoice_examples(spec.examples, spec.seed))?;
    let imported = super::data::import(env, &ImportSpec { file: raw, ..ImportSpec::default() }, sink)?;
    let curated = super::data::curate(
        env,
        &CurateSpec { version: imported.version, near: Some(0.9), dedupe: true, pii: Some(PiiMode::Redact), ..CurateSpec::default() },
        sink,
    )?;
    let split = super::data::split(
        env,
        &SplitSpec { version: curated.version, heldout: 0.15, seed: spec.seed, stratify: true, name: Some("invoices".into()) },
        sink,
    )?;
    sink.finished("demo.data", format!("train {}, held out {}", &split.train[..16], &split.heldout[..16]));

    sink.started("demo.baseline", "3/7 the prompted baseline: every template, zero- and few-shot");
    let baseline = super::eval::baseline(
        env,
        &BaselineSpec {
            model: spec.model.clone(),
            suite: suite.clone(),
            data: split.heldout.clone(),
            train: split.train.clone(),
            limit: Some(spec.eval_items),
        },
        sink,
    )?;
    let best = &baseline.baseline.best;
    sink.finished("demo.baseline", format!("baseline = `{}` {}-shot: {:.3}", best.template, best.shots, best.primary()));

    sink.started("demo.train", "4/7 LoRA pilot");
    let settings = TrainSettings {
        rank: spec.rank,
        alpha: 2.0 * spec.rank as f64,
        learning_rate: spec.lr,
        epochs: spec.epochs,
        max_steps: spec.max_steps,
        batch_size: 4,
        schedule: Schedule::Cosine,
        warmup_ratio: 0.1,
        seed: spec.seed,
        patience: 2,
        metric_items: 0,
        ..TrainSettings::default()
    };
    let run_dir = env.train_dir().join(format!("pilot-{}", &split.train[..12]));
    let _ = std::fs::remove_dir_all(&run_dir);
    let trained = super::train::train(
        env,
        &TrainSpec {
            model: spec.model.clone(),
            data: split.train.clone(),
            suite: suite.clone(),
            template: Some(best.template.clone()),
            out: Some(run_dir),
            settings,
            resume: false,
        },
        sink,
    )?;
    sink.finished("demo.train", format!("adapter {}", trained.adapter_dir.display()));

    sink.started("demo.verdict", "5/7 fine-tune vs baseline on the held-out items");
    // The held-out evaluation with the best prompt, of a model and adapter.
    let heldout = |model: PathBuf, adapter: Option<PathBuf>| EvalSpec {
        model,
        adapter,
        suite: suite.clone(),
        data: split.heldout.clone(),
        template: Some(best.template.clone()),
        shots: 0,
        train: None,
        limit: Some(spec.eval_items),
    };
    let tuned = super::eval::run(env, &heldout(spec.model.clone(), Some(trained.adapter_dir.clone())), sink)?.run;
    let comparison = eval::compare(best, &tuned, &best.primary_metric, suite.margin)?;
    let m = env.model(&spec.model)?;
    let adapter = Adapter::load_peft(&trained.adapter_dir, &m.model.config, env.device())?;
    let base_subject = Subject::base(&m, spec.model.display().to_string());
    let forgetting =
        super::eval::forgetting_check(&base_subject, &adapter, &trained.adapter_dir.display().to_string(), 10, 0.0, sink)?;
    sink.finished("demo.verdict", super::eval::verdict_line(&comparison, best.primary(), tuned.primary()));

    sink.started("demo.quantize", "6/7 the fine-tune merged and quantized to int8 and int4, each evaluated against the gate");
    let mut variants = Vec::new();
    let mut variant_runs = Vec::new();
    for format in QUANTIZED {
        let out = root.join("exports").join(format!("fine-tune-{}.gguf", format.name()));
        super::train::export(env, &ExportSpec { model: spec.model.clone(), adapter: trained.adapter_dir.clone(), format, out: out.clone() }, sink)?;
        let run = super::eval::run(env, &heldout(out.clone(), None), sink)?.run;
        variants.push(Variant { format, path: out, metric: run.primary(), passed_gate: run.passed_gate });
        variant_runs.push(run);
    }
    sink.finished(
        "demo.quantize",
        variants.iter().map(|v| format!("{} {:.3}", v.format.name(), v.metric)).collect::<Vec<_>>().join(", "),
    );

    sink.started("demo.report", "7/7 report and artifacts");
    let ladder = super::eval::ladder(("base + best prompt", best), ("fine-tune", &tuned), &variant_runs, suite.margin)?;
    let report = Report {
        title: "Invoice fields: LoRA pilot vs prompted SmolLM2".into(),
        suite: suite.name.clone(),
        primary_metric: best.primary_metric.clone(),
        gate: suite.gate.clone(),
        runs: ladder.runs,
        baseline_trials: baseline.baseline.tried.clone(),
        comparison: Some(ladder.comparison),
        steps: ladder.steps,
        training: trained.best().history.clone(),
        training_evals: trained.best().evals.clone(),
        notes: vec![
            format!("train version {}, held-out version {}", split.train, split.heldout),
            format!("adapter (PEFT) in {}", trained.adapter_dir.display()),
        ],
        forgetting: Some(forgetting.clone()),
    };
    let written = super::eval::write_report(&report, &root.join("report"), sink)?;
    sink.finished("demo.report", format!("report {}", written.html.display()));
    Ok(DemoOutcome {
        baseline: best.primary(),
        fine_tune: tuned.primary(),
        verdict: comparison.comparison.verdict.as_str().to_string(),
        forgot: forgetting.forgot,
        adapter_dir: trained.adapter_dir,
        variants,
        report: written,
    })
}
