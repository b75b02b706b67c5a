//! `lathe eval ...`: run a suite, find the prompted baseline, compare runs, write reports.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lathe_engine::Adapter;
use lathe_jobs::eval::report::{Report, RunSummary};
use lathe_jobs::eval::{self, EvalRun, Plugins, Subject, Suite};

use crate::cli::{Compute, DataDir, DEFAULT_MODEL, load};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Evaluate a model (and adapter) on a held-out version with one template.
    Run(RunArgs),
    /// Evaluate the base model with every template zero- and few-shot; keep the best.
    Baseline(BaselineArgs),
    /// Compare two runs on the same items: better, no difference or worse.
    Compare(CompareArgs),
    /// Write the JSON and HTML report of a baseline and a candidate run.
    Report(ReportArgs),
    /// The regression pack (multiple choice by log-likelihood, arithmetic, instruction
    /// following) on the base model and with an adapter: did the fine-tune forget?
    Regression(RegressionArgs),
}

#[derive(Args)]
pub struct RegressionArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    /// Generated arithmetic items.
    #[arg(long, default_value_t = 20)]
    arithmetic: usize,
    /// A drop smaller than this is not called forgetting.
    #[arg(long, default_value_t = 0.0)]
    margin: f64,
    #[command(flatten)]
    compute: Compute,
}

#[derive(Args)]
pub struct RunArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// A PEFT adapter folder.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    suite: PathBuf,
    /// The held-out version (id or name).
    #[arg(long)]
    data: String,
    #[arg(long)]
    template: Option<String>,
    /// Few-shot examples, drawn from --train.
    #[arg(long, default_value_t = 0)]
    shots: usize,
    /// The training version the shots come from.
    #[arg(long)]
    train: Option<String>,
    /// Evaluate only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args)]
pub struct BaselineArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    #[arg(long)]
    suite: PathBuf,
    /// The held-out version.
    #[arg(long)]
    data: String,
    /// The training version the shots come from.
    #[arg(long)]
    train: String,
    #[arg(long)]
    limit: Option<usize>,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args)]
pub struct CompareArgs {
    /// The baseline run (a JSON file written by `lathe eval run`).
    baseline: PathBuf,
    candidate: PathBuf,
    /// Default: the runs' primary metric.
    #[arg(long)]
    metric: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    margin: f64,
}

#[derive(Args)]
pub struct ReportArgs {
    #[arg(long)]
    baseline: PathBuf,
    #[arg(long)]
    candidate: PathBuf,
    #[arg(long, default_value_t = 0.0)]
    margin: f64,
    /// Output path without extension: writes OUT.json and OUT.html.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Run(a) => run_one(a),
        EvalCommand::Baseline(a) => baseline(a),
        EvalCommand::Compare(a) => compare(a),
        EvalCommand::Report(a) => report(a),
        EvalCommand::Regression(a) => regression(a),
    }
}

fn save_run(dir: &DataDir, run: &EvalRun) -> Result<PathBuf> {
    let runs = eval::runs_dir(&dir.path());
    std::fs::create_dir_all(&runs).with_context(|| format!("creating {}", runs.display()))?;
    let path = runs.join(format!("{}.json", run.id));
    run.save(&path)?;
    Ok(path)
}

/// Where judge verdicts are cached: one file per data folder, keyed by judge model,
/// prompt, output and seed.
fn judge_cache(dir: &DataDir) -> PathBuf {
    dir.path().join("judge-cache.jsonl")
}

fn print_judge_cache(plugins: &Plugins) {
    if let Some((hits, misses)) = plugins.judge_cache_stats() {
        println!("  judge: {misses} verdicts asked, {hits} replayed from the cache");
    }
}

pub fn print_run(run: &EvalRun) {
    for (name, e) in &run.metrics {
        println!("  {name}: {:.3} (95 % CI {:.3} … {:.3}, n = {})", e.mean, e.ci_low, e.ci_high, e.n);
    }
    if let Some(p) = run.passed_gate {
        println!("  gate: {}", if p { "passed" } else { "not passed" });
    }
}

/// A baseline trial's generation progress on stderr, erased when the trial's line prints.
pub fn trial_progress(template: &str, shots: usize, done: usize, total: usize) {
    eprint!("\r  {template} · {shots}-shot: generating {done}/{total}   ");
    if done == total {
        eprint!("\r{}\r", " ".repeat(60));
    }
}

fn progress(done: usize, total: usize) {
    eprint!("\r  generating {done}/{total}   ");
    if done == total {
        eprintln!();
    }
}

fn run_one(a: RunArgs) -> Result<()> {
    let suite = Suite::from_file(&a.suite)?;
    let template = match &a.template {
        Some(n) => suite.templates.iter().find(|t| &t.name == n).with_context(|| format!("the suite has no template `{n}`"))?,
        None => &suite.templates[0],
    };
    let store = crate::data::open_store(&a.dir)?;
    let held_id = store.resolve(&a.data)?;
    let mut items = eval::heldout_items(&store, &held_id)?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    let shots = match (&a.train, a.shots) {
        (_, 0) => Vec::new(),
        (Some(t), k) => eval::train_items(&store, &store.resolve(t)?)?.into_iter().take(k).collect(),
        (None, _) => anyhow::bail!("--shots needs --train (shots come from the training part only)"),
    };
    let device = a.compute.setup()?;
    let m = load(&a.model, &device)?;
    let adapter = match &a.adapter {
        Some(p) => Some(Adapter::load_peft(p, &m.model.config, &device)?),
        None => None,
    };
    let runtime = crate::plugin::runtime()?;
    let plugins = Plugins::load_with_judge(&runtime, &suite, &device, &judge_cache(&a.dir))?;
    let subject = Subject {
        model: &m.model,
        tokenizer: &m.tokenizer,
        adapter: adapter.as_ref(),
        model_name: a.model.display().to_string(),
        adapter_name: a.adapter.as_ref().map(|p| p.display().to_string()),
    };
    let run = eval::run(&subject, &suite, &plugins, template, &shots, &items, Some(held_id), &mut progress)?;
    print_run(&run);
    print_judge_cache(&plugins);
    println!("run {}", save_run(&a.dir, &run)?.display());
    Ok(())
}

fn baseline(a: BaselineArgs) -> Result<()> {
    let suite = Suite::from_file(&a.suite)?;
    let store = crate::data::open_store(&a.dir)?;
    let held_id = store.resolve(&a.data)?;
    let mut items = eval::heldout_items(&store, &held_id)?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    let pool = eval::train_items(&store, &store.resolve(&a.train)?)?;
    let device = a.compute.setup()?;
    let m = load(&a.model, &device)?;
    let runtime = crate::plugin::runtime()?;
    let plugins = Plugins::load_with_judge(&runtime, &suite, &device, &judge_cache(&a.dir))?;
    let subject = Subject::base(&m, a.model.display().to_string());
    let b = eval::baseline(&subject, &suite, &plugins, &pool, &items, Some(held_id), &mut trial_progress, &mut |t| {
        println!("  {} · {}-shot: {:.3} [{:.3}, {:.3}]", t.template, t.shots, t.metric.mean, t.metric.ci_low, t.metric.ci_high)
    })?;
    println!("baseline: template {} with {} shots", b.best.template, b.best.shots);
    print_run(&b.best);
    if b.best.passed_gate == Some(true) {
        println!("the prompted base model already clears the gate: ship the prompt");
    }
    println!("run {}", save_run(&a.dir, &b.best)?.display());
    Ok(())
}

fn compare(a: CompareArgs) -> Result<()> {
    let base = EvalRun::load(&a.baseline)?;
    let cand = EvalRun::load(&a.candidate)?;
    let metric = a.metric.unwrap_or_else(|| base.primary_metric.clone());
    let c = eval::compare(&base, &cand, &metric, a.margin)?;
    let d = &c.comparison.difference;
    println!(
        "{}: {} ({:+.3}, 95 % CI {:+.3} … {:+.3}, p = {:.4}; {} better, {} worse, {} tied)",
        metric,
        c.comparison.verdict.as_str(),
        d.mean,
        d.ci_low,
        d.ci_high,
        c.comparison.p_value,
        c.comparison.wins,
        c.comparison.losses,
        c.comparison.ties
    );
    for diff in c.diffs.iter().take(5) {
        println!("  item {}: {:.2} → {:.2}", diff.index, diff.baseline_score, diff.candidate_score);
    }
    Ok(())
}

pub fn write_report(report: &Report, out: &Path) -> Result<(PathBuf, PathBuf)> {
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p).ok();
    }
    let json = out.with_extension("json");
    let html = out.with_extension("html");
    report.write(&json, &html)?;
    Ok((json, html))
}

fn report(a: ReportArgs) -> Result<()> {
    let base = EvalRun::load(&a.baseline)?;
    let cand = EvalRun::load(&a.candidate)?;
    let comparison = eval::compare(&base, &cand, &base.primary_metric, a.margin)?;
    let r = Report {
        title: format!("{}: fine-tune vs prompted baseline", base.suite),
        suite: base.suite.clone(),
        primary_metric: base.primary_metric.clone(),
        gate: base.gate.clone(),
        runs: vec![RunSummary::of("baseline", &base), RunSummary::of("candidate", &cand)],
        comparison: Some(comparison),
        ..Report::default()
    };
    let (json, html) = write_report(&r, &a.out)?;
    println!("report {} and {}", json.display(), html.display());
    Ok(())
}

/// Runs the regression pack on the base and the adapted model and prints the verdict.
pub fn forgetting_check(subject: &Subject<'_>, adapter: &Adapter, adapter_name: &str, arithmetic: usize, margin: f64) -> Result<eval::regression::Forgetting> {
    let base = eval::regression::run(subject, arithmetic, 3)?;
    let tuned_subject = subject.with_adapter(adapter, adapter_name);
    let tuned = eval::regression::run(&tuned_subject, arithmetic, 3)?;
    let f = eval::regression::compare(&base, &tuned, margin);
    for (task, c) in &f.tasks {
        println!(
            "  {task:<22} base {:.3} → fine-tune {:.3}  ({})",
            base.tasks[task].mean,
            tuned.tasks[task].mean,
            c.verdict.as_str()
        );
    }
    println!("{}", if f.forgot { "forgetting: the fine-tune is worse on general ability" } else { "forgetting: none detected" });
    Ok(f)
}

fn regression(a: RegressionArgs) -> Result<()> {
    let device = a.compute.setup()?;
    let m = load(&a.model, &device)?;
    let adapter = Adapter::load_peft(&a.adapter, &m.model.config, &device)?;
    let subject = Subject::base(&m, a.model.display().to_string());
    forgetting_check(&subject, &adapter, &a.adapter.display().to_string(), a.arithmetic, a.margin)?;
    Ok(())
}
