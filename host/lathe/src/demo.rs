//! `lathe demo`: the workflow end to end on SmolLM2 and a generated invoice-extraction
//! task (`lathe_jobs::pipeline::demo`), its events rendered in the terminal.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use lathe_jobs::pipeline::demo::DemoSpec;

use crate::cli::{Compute, DEFAULT_MODEL, DataDir, run_job};

#[derive(Args)]
pub struct DemoArgs {
    /// A GGUF file or Hugging Face folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Invoices generated for the task.
    #[arg(long, default_value_t = DemoSpec::default().examples)]
    examples: usize,
    /// Held-out items evaluated (the first N of the held-out part).
    #[arg(long, default_value_t = DemoSpec::default().eval_items)]
    eval_items: usize,
    /// Training epochs of the LoRA pilot.
    #[arg(long, default_value_t = DemoSpec::default().epochs)]
    epochs: usize,
    /// Optimizer steps of the pilot (0: the whole epochs).
    #[arg(long, default_value_t = DemoSpec::default().max_steps)]
    max_steps: usize,
    /// Learning rate of the pilot (a short pilot wants more than the 1e-4 default).
    #[arg(long, default_value_t = DemoSpec::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = DemoSpec::default().rank)]
    rank: usize,
    #[arg(long, default_value_t = DemoSpec::default().seed)]
    seed: u64,
    /// Skip the few-shot variants of the baseline (faster).
    #[arg(long)]
    zero_shot_only: bool,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    dir: DataDir,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let demo_dir = DataDir { data_dir: Some(a.dir.path().join("demo")) };
    let env = a.compute.env(&demo_dir)?;
    let spec = DemoSpec {
        model: a.model,
        examples: a.examples,
        eval_items: a.eval_items,
        epochs: a.epochs,
        max_steps: a.max_steps,
        lr: a.lr,
        rank: a.rank,
        seed: a.seed,
        zero_shot_only: a.zero_shot_only,
    };
    let out = run_job(&env, &spec, lathe_jobs::pipeline::demo::run)?;
    println!("\nreport:  {}", out.report.html.display());
    println!("         {}", out.report.json.display());
    println!("adapter: {}", out.adapter_dir.display());
    println!("done in {}", crate::cli::duration(started.elapsed().as_secs_f64()));
    Ok(())
}
