//! `lathe eval ...`: run a suite, find the prompted baseline, compare runs, write reports.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use lathe_jobs::eval::EvalRun;
use lathe_jobs::pipeline::{self, eval::{BaselineSpec, CompareSpec, EvalSpec, ForgettingSpec, RegressionSpec, ReportSpec}};

use crate::cli::{Compute, DEFAULT_MODEL, DataDir, run_job};

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
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args)]
pub struct RunArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// A PEFT adapter folder.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A suite file, or the name of a suite installed from a pack.
    #[arg(long)]
    suite: String,
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
    /// A suite file, or the name of a suite installed from a pack.
    #[arg(long)]
    suite: String,
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
    /// The baseline run: its id, or the JSON file `lathe eval run` wrote.
    baseline: PathBuf,
    candidate: PathBuf,
    /// Default: the runs' primary metric.
    #[arg(long)]
    metric: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    margin: f64,
    #[command(flatten)]
    dir: DataDir,
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
    /// Also run the regression pack on the candidate's base model and adapter and put the
    /// forgetting verdict in the report.
    #[arg(long)]
    forgetting: bool,
    /// Generated arithmetic items in the regression pack (with --forgetting).
    #[arg(long, default_value_t = 20)]
    arithmetic: usize,
    /// A run of the candidate's export (`lathe export --format gguf-q8_0` or `gguf-q4_1`,
    /// then `lathe eval run --model` on it) on the same items; repeat for each. The
    /// report shows what each step costs: base with its best prompt, fine-tune, each variant.
    #[arg(long = "variant")]
    variants: Vec<PathBuf>,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    dir: DataDir,
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

pub fn print_run(run: &EvalRun) {
    for (name, e) in &run.metrics {
        println!("  {name}: {:.3} (95 % CI {:.3} … {:.3}, n = {})", e.mean, e.ci_low, e.ci_high, e.n);
    }
    if let Some(p) = run.passed_gate {
        println!("  gate: {}", if p { "passed" } else { "not passed" });
    }
}

fn run_one(a: RunArgs) -> Result<()> {
    let spec = EvalSpec {
        model: a.model,
        adapter: a.adapter,
        suite: lathe_jobs::pack::LocalPacks::new(&a.dir.env()).suite(&a.suite)?,
        data: a.data,
        template: a.template,
        shots: a.shots,
        train: a.train,
        limit: a.limit,
    };
    let out = run_job(&a.compute.env(&a.dir)?, &spec, pipeline::eval::run)?;
    print_run(&out.run);
    println!("run {}", out.path.display());
    Ok(())
}

fn baseline(a: BaselineArgs) -> Result<()> {
    let spec = BaselineSpec { model: a.model, suite: lathe_jobs::pack::LocalPacks::new(&a.dir.env()).suite(&a.suite)?, data: a.data, train: a.train, limit: a.limit };
    let out = run_job(&a.compute.env(&a.dir)?, &spec, pipeline::eval::baseline)?;
    print_run(&out.baseline.best);
    println!("run {}", out.path.display());
    Ok(())
}

fn compare(a: CompareArgs) -> Result<()> {
    let spec = CompareSpec {
        baseline: a.baseline.display().to_string(),
        candidate: a.candidate.display().to_string(),
        metric: a.metric,
        margin: a.margin,
    };
    // The verdict is the step's summary; the items that moved most follow.
    let c = run_job(&a.dir.env(), &spec, pipeline::eval::compare)?;
    for diff in c.diffs.iter().take(5) {
        println!("  item {}: {:.2} → {:.2}", diff.index, diff.baseline_score, diff.candidate_score);
    }
    Ok(())
}

fn report(a: ReportArgs) -> Result<()> {
    let spec = ReportSpec {
        baseline: a.baseline.display().to_string(),
        candidate: a.candidate.display().to_string(),
        margin: a.margin,
        out: Some(a.out),
        forgetting: a.forgetting.then_some(ForgettingSpec { arithmetic: a.arithmetic, ..ForgettingSpec::default() }),
        variants: a.variants.iter().map(|v| v.display().to_string()).collect(),
    };
    let out = run_job(&a.compute.env(&a.dir)?, &spec, pipeline::eval::report)?;
    println!("report {} and {}", out.json.display(), out.html.display());
    Ok(())
}

fn regression(a: RegressionArgs) -> Result<()> {
    let spec = RegressionSpec { model: a.model, adapter: a.adapter, arithmetic: a.arithmetic, margin: a.margin };
    run_job(&a.compute.env(&a.dir)?, &spec, pipeline::eval::regression)?;
    Ok(())
}
