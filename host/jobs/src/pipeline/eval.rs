//! Evaluation pipelines: a run of a suite, the prompted baseline, a paired comparison of
//! two runs, a report, and the regression pack's forgetting check. Runs are kept as JSON
//! under the environment's `evals/` folder and named by their id.

use std::path::PathBuf;

use lathe_engine::Adapter;
use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::{JobError, Result};
use crate::eval::regression::{self, Forgetting};
use crate::eval::report::{Report, RunSummary, StepCost, Weights};
use crate::eval::{self, Baseline, EvalRun, Item, Plugins, RunComparison, Subject, Suite};
use crate::event::Sink;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// A GGUF file or Hugging Face folder.
    pub model: PathBuf,
    /// A PEFT adapter folder.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    pub suite: Suite,
    /// The held-out version (id or name).
    pub data: String,
    /// The suite's template to use (default: the first).
    #[serde(default)]
    pub template: Option<String>,
    /// Few-shot examples, drawn from `train` (never from the held-out part).
    #[serde(default)]
    pub shots: usize,
    #[serde(default)]
    pub train: Option<String>,
    /// Evaluate only the first N items.
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalOutcome {
    pub run: EvalRun,
    pub path: PathBuf,
}

/// The held-out items of `data` (the first `limit`).
fn heldout(env: &Env, data: &str, limit: Option<usize>) -> Result<(String, Vec<Item>)> {
    let store = env.datasets()?;
    let id = store.resolve(data)?;
    let mut items = eval::heldout_items(&store, &id)?;
    if let Some(n) = limit {
        items.truncate(n);
    }
    if items.is_empty() {
        return Err(JobError::Invalid(format!("the held-out version {data} has no items")));
    }
    Ok((id, items))
}

fn train_pool(env: &Env, train: &str) -> Result<Vec<Item>> {
    let store = env.datasets()?;
    eval::train_items(&store, &store.resolve(train)?)
}

fn load_adapter(env: &Env, path: &std::path::Path, m: &lathe_engine::LoadedModel) -> Result<Adapter> {
    Ok(Adapter::load_peft(path, &m.model.config, env.device())?)
}

/// Saves a run under the environment's `evals/` folder.
pub fn save_run(env: &Env, run: &EvalRun) -> Result<PathBuf> {
    let dir = env.runs_dir();
    std::fs::create_dir_all(&dir).map_err(|e| JobError::io(&dir, e))?;
    let path = dir.join(format!("{}.json", run.id));
    run.save(&path)?;
    Ok(path)
}

/// A run by id (under `evals/`) or by the path of its JSON file.
pub fn load_run(env: &Env, id_or_path: &str) -> Result<EvalRun> {
    let as_path = std::path::Path::new(id_or_path);
    if as_path.is_file() {
        return EvalRun::load(as_path);
    }
    let valid_id = !id_or_path.is_empty() && id_or_path.bytes().all(|b| b.is_ascii_hexdigit());
    let path = env.runs_dir().join(format!("{id_or_path}.json"));
    if !valid_id || !path.is_file() {
        return Err(JobError::not_found("eval run", id_or_path));
    }
    EvalRun::load(&path)
}

fn summarize(sink: &dyn Sink, step: &str, run: &EvalRun) {
    let metrics: Vec<String> =
        run.metrics.iter().map(|(n, e)| format!("{n} {:.3} (95 % CI {:.3} … {:.3}, n = {})", e.mean, e.ci_low, e.ci_high, e.n)).collect();
    let gate = match run.passed_gate {
        Some(true) => "; gate passed",
        Some(false) => "; gate not passed",
        None => "",
    };
    sink.finished(step, format!("`{}` {}-shot: {}{gate}", run.template, run.shots, metrics.join(", ")));
}

pub fn run(env: &Env, spec: &EvalSpec, sink: &dyn Sink) -> Result<EvalOutcome> {
    spec.suite.check()?;
    let template = spec.suite.template(spec.template.as_deref())?;
    let (held_id, items) = heldout(env, &spec.data, spec.limit)?;
    let shots = match (&spec.train, spec.shots) {
        (_, 0) => Vec::new(),
        (Some(t), k) => train_pool(env, t)?.into_iter().take(k).collect(),
        (None, _) => return Err(JobError::invalid("few-shot prompts need `train`: shots come from the training part only")),
    };
    let plugins = Plugins::load_with_judge(env, &spec.suite)?;
    let m = env.model(&spec.model)?;
    let adapter = spec.adapter.as_deref().map(|p| load_adapter(env, p, &m)).transpose()?;
    let base = Subject::base(&m, spec.model.display().to_string());
    let subject = match (&adapter, &spec.adapter) {
        (Some(a), Some(p)) => base.with_adapter(a, p.display().to_string()),
        _ => base,
    };
    sink.started("eval", format!("evaluate `{}` on {} held-out items", template.name, items.len()));
    let run = eval::run(&subject, &spec.suite, &plugins, template, &shots, &items, Some(held_id), sink, "eval")?;
    summarize(sink, "eval", &run);
    if let Some((hits, misses)) = plugins.judge_cache_stats() {
        sink.info(format!("judge: {misses} verdicts asked, {hits} replayed from the cache"));
    }
    let path = save_run(env, &run)?;
    sink.artifact("run", &path);
    Ok(EvalOutcome { run, path })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineSpec {
    pub model: PathBuf,
    pub suite: Suite,
    /// The held-out version.
    pub data: String,
    /// The training version the shots come from.
    pub train: String,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineOutcome {
    pub baseline: Baseline,
    /// The best run's file.
    pub path: PathBuf,
    /// The prompted base model already clears the gate: ship the prompt.
    pub ship_the_prompt: bool,
}

/// The base model with every template at every shot count; the best is the baseline.
pub fn baseline(env: &Env, spec: &BaselineSpec, sink: &dyn Sink) -> Result<BaselineOutcome> {
    spec.suite.check()?;
    let (held_id, items) = heldout(env, &spec.data, spec.limit)?;
    let pool = train_pool(env, &spec.train)?;
    let plugins = Plugins::load_with_judge(env, &spec.suite)?;
    let m = env.model(&spec.model)?;
    let subject = Subject::base(&m, spec.model.display().to_string());
    sink.started(
        "baseline",
        format!("{} templates × shots {:?} on {} held-out items", spec.suite.templates.len(), spec.suite.shots, items.len()),
    );
    let b = eval::baseline(&subject, &spec.suite, &plugins, &pool, &items, Some(held_id), sink)?;
    let ship = b.best.passed_gate == Some(true);
    sink.finished(
        "baseline",
        format!(
            "baseline = `{}` {}-shot: {} {:.3}{}",
            b.best.template,
            b.best.shots,
            b.best.primary_metric,
            b.best.primary(),
            if ship { " — the prompted base model already clears the gate: ship the prompt" } else { "" }
        ),
    );
    let path = save_run(env, &b.best)?;
    sink.artifact("run", &path);
    Ok(BaselineOutcome { baseline: b, path, ship_the_prompt: ship })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareSpec {
    /// Run ids (or paths of run files).
    pub baseline: String,
    pub candidate: String,
    /// Default: the baseline's primary metric.
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default)]
    pub margin: f64,
}

pub fn compare(env: &Env, spec: &CompareSpec, sink: &dyn Sink) -> Result<RunComparison> {
    let base = load_run(env, &spec.baseline)?;
    let cand = load_run(env, &spec.candidate)?;
    let metric = spec.metric.clone().unwrap_or_else(|| base.primary_metric.clone());
    sink.started("compare", format!("{} vs {} on {metric}", base.id, cand.id));
    let c = eval::compare(&base, &cand, &metric, spec.margin)?;
    sink.finished("compare", verdict_line(&c, base.primary(), cand.primary()));
    Ok(c)
}

/// `verdict: BETTER — metric 0.54 → 0.94 (+0.40, 95 % CI …, p = …; 12 better, 1 worse, 7 tied)`.
pub fn verdict_line(c: &RunComparison, baseline: f64, candidate: f64) -> String {
    let d = &c.comparison.difference;
    format!(
        "verdict: {} — {} {baseline:.3} → {candidate:.3} ({:+.3}, 95 % CI {:+.3} … {:+.3}, p = {:.4}; {} better, {} worse, {} tied)",
        c.comparison.verdict.as_str().to_uppercase(),
        c.metric,
        d.mean,
        d.ci_low,
        d.ci_high,
        c.comparison.p_value,
        c.comparison.wins,
        c.comparison.losses,
        c.comparison.ties
    )
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    pub baseline: String,
    pub candidate: String,
    #[serde(default)]
    pub margin: f64,
    /// Output path without extension: writes OUT.json and OUT.html. Default:
    /// `evals/report-<baseline>-<candidate>`.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Also run the regression pack on the candidate's base model and adapter, and put
    /// the forgetting verdict in the report.
    #[serde(default)]
    pub forgetting: Option<ForgettingSpec>,
    /// Runs of the candidate's exports (its merged weights quantized to int8 or int4) on
    /// the same items: the report then shows what each step costs, base with its best
    /// prompt → fine-tune → each variant, and whether each still clears the gate.
    #[serde(default)]
    pub variants: Vec<String>,
}

/// The regression pack's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgettingSpec {
    /// Generated arithmetic items.
    #[serde(default = "default_arithmetic")]
    pub arithmetic: usize,
    /// A drop smaller than this is not called forgetting.
    #[serde(default)]
    pub margin: f64,
}

impl Default for ForgettingSpec {
    fn default() -> Self {
        ForgettingSpec { arithmetic: default_arithmetic(), margin: 0.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportOutcome {
    pub json: PathBuf,
    pub html: PathBuf,
}

pub fn report(env: &Env, spec: &ReportSpec, sink: &dyn Sink) -> Result<ReportOutcome> {
    let base = load_run(env, &spec.baseline)?;
    let cand = load_run(env, &spec.candidate)?;
    let variants = spec.variants.iter().map(|v| load_run(env, v)).collect::<Result<Vec<_>>>()?;
    let ladder = ladder(("baseline", &base), ("candidate", &cand), &variants, spec.margin)?;
    let notes = crate::eval::report::plugin_mismatches(&ladder.runs);
    let r = Report {
        title: format!("{}: fine-tune vs prompted baseline", base.suite),
        suite: base.suite.clone(),
        primary_metric: base.primary_metric.clone(),
        gate: base.gate.clone(),
        runs: ladder.runs,
        comparison: Some(ladder.comparison),
        steps: ladder.steps,
        forgetting: match &spec.forgetting {
            Some(f) => Some(candidate_forgetting(env, &cand, f, sink)?),
            None => None,
        },
        notes,
        ..Report::default()
    };
    for n in &r.notes {
        sink.warn(n.clone());
    }
    let out = spec.out.clone().unwrap_or_else(|| env.runs_dir().join(format!("report-{}-{}", base.id, cand.id)));
    write_report(&r, &out, sink)
}

/// A report's runs and what each step between them costs.
pub struct Ladder {
    pub runs: Vec<RunSummary>,
    /// Fine-tune against the baseline, with the items that changed.
    pub comparison: RunComparison,
    pub steps: Vec<StepCost>,
}

/// The way from a prompted base model to what gets deployed, each step paired on the same
/// held-out items: the fine-tune against the baseline, then each variant of the fine-tune
/// (its merged weights quantized) against the fine-tune. Runs are labelled as given, and
/// variants by their weights (`fine-tune int8 (Q8_0)`).
pub fn ladder(baseline: (&str, &EvalRun), tuned: (&str, &EvalRun), variants: &[EvalRun], margin: f64) -> Result<Ladder> {
    let metric = &baseline.1.primary_metric;
    let comparison = eval::compare(baseline.1, tuned.1, metric, margin)?;
    let mut runs = vec![
        RunSummary::of(baseline.0, baseline.1).with_weights(weights_of(baseline.1)),
        RunSummary::of(tuned.0, tuned.1).with_weights(weights_of(tuned.1)),
    ];
    let mut steps = vec![StepCost { step: "fine-tune".into(), from: baseline.0.into(), to: tuned.0.into(), comparison: comparison.comparison.clone() }];
    for (i, v) in variants.iter().enumerate() {
        let weights = weights_of(v);
        let (step, label) = match weights.as_ref().map(|w| (precision(&w.format), w.format.as_str())) {
            Some((Some(bits), format)) => (format!("quantize to {bits} ({format})"), format!("{} {bits} ({format})", tuned.0)),
            Some((None, format)) => (format!("merge ({format})"), format!("{} merged ({format})", tuned.0)),
            None => (format!("variant {}", i + 1), format!("{} variant {}", tuned.0, i + 1)),
        };
        let c = eval::compare(tuned.1, v, metric, margin)?;
        steps.push(StepCost { step, from: tuned.0.into(), to: label.clone(), comparison: c.comparison });
        runs.push(RunSummary::of(&label, v).with_weights(weights));
    }
    Ok(Ladder { runs, comparison, steps })
}

/// The integer precision a weight format quantizes to; None for float formats.
fn precision(format: &str) -> Option<&'static str> {
    match format {
        "Q8_0" => Some("int8"),
        "Q6_K" => Some("int6"),
        "Q5_K" => Some("int5"),
        "Q4_0" | "Q4_1" | "Q4_K" => Some("int4"),
        _ => None,
    }
}

/// What a run's model is stored as and its size (with its adapter's); None when its files
/// are no longer there.
pub fn weights_of(run: &EvalRun) -> Option<Weights> {
    let model = std::path::Path::new(&run.model);
    let (format, bytes) = if model.is_file() {
        let gguf = lathe_engine::gguf::GgufFile::open(model).ok()?;
        (gguf.weight_type()?.name().to_string(), std::fs::metadata(model).ok()?.len())
    } else {
        ("safetensors".to_string(), safetensors_bytes(model)?)
    };
    let adapter_bytes = match &run.adapter {
        Some(a) => Some(safetensors_bytes(std::path::Path::new(a))?),
        None => None,
    };
    Some(Weights { format, bytes, adapter_bytes })
}

/// The size of the `.safetensors` files of a folder; None when it has none.
fn safetensors_bytes(dir: &std::path::Path) -> Option<u64> {
    let sizes: Vec<u64> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .collect();
    (!sizes.is_empty()).then(|| sizes.iter().sum())
}

/// The regression pack on the model and adapter a candidate run was made with.
fn candidate_forgetting(env: &Env, cand: &EvalRun, spec: &ForgettingSpec, sink: &dyn Sink) -> Result<Forgetting> {
    let adapter_path = cand.adapter.as_deref().ok_or_else(|| {
        JobError::Invalid(format!(
            "run {} has no adapter: the forgetting check compares a fine-tune with its base model",
            cand.id
        ))
    })?;
    let m = env.model(std::path::Path::new(&cand.model))?;
    let adapter = load_adapter(env, std::path::Path::new(adapter_path), &m)?;
    let subject = Subject::base(&m, cand.model.clone());
    forgetting_check(&subject, &adapter, adapter_path, spec.arithmetic, spec.margin, sink)
}

/// Writes `OUT.json` and `OUT.html`.
pub fn write_report(report: &Report, out: &std::path::Path, sink: &dyn Sink) -> Result<ReportOutcome> {
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p).map_err(|e| JobError::io(p, e))?;
    }
    let json = out.with_extension("json");
    let html = out.with_extension("html");
    report.write(&json, &html)?;
    sink.artifact("report", &html);
    sink.artifact("report", &json);
    Ok(ReportOutcome { json, html })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegressionSpec {
    pub model: PathBuf,
    pub adapter: PathBuf,
    /// Generated arithmetic items.
    #[serde(default = "default_arithmetic")]
    pub arithmetic: usize,
    /// A drop smaller than this is not called forgetting.
    #[serde(default)]
    pub margin: f64,
}

fn default_arithmetic() -> usize {
    20
}

pub fn regression(env: &Env, spec: &RegressionSpec, sink: &dyn Sink) -> Result<Forgetting> {
    let m = env.model(&spec.model)?;
    let adapter = load_adapter(env, &spec.adapter, &m)?;
    let subject = Subject::base(&m, spec.model.display().to_string());
    forgetting_check(&subject, &adapter, &spec.adapter.display().to_string(), spec.arithmetic, spec.margin, sink)
}

/// The regression pack on the base model and through the adapter, with the forgetting
/// verdict; one log line per task.
pub fn forgetting_check(
    subject: &Subject<'_>,
    adapter: &Adapter,
    adapter_name: &str,
    arithmetic: usize,
    margin: f64,
    sink: &dyn Sink,
) -> Result<Forgetting> {
    sink.started("regression", "the regression pack (general ability), base vs fine-tune");
    let base = regression::run(subject, arithmetic, 3)?;
    sink.check_cancelled()?;
    let tuned = regression::run(&subject.with_adapter(adapter, adapter_name), arithmetic, 3)?;
    let f = regression::compare(&base, &tuned, margin);
    for (task, c) in &f.tasks {
        sink.info(format!(
            "{task:<22} base {:.3} → fine-tune {:.3}  ({})",
            base.tasks[task].mean,
            tuned.tasks[task].mean,
            c.verdict.as_str()
        ));
    }
    sink.finished(
        "regression",
        if f.forgot { "forgetting: the fine-tune is worse on general ability" } else { "forgetting: none detected" },
    );
    Ok(f)
}
