//! `lathe demo`: the workflow end to end on SmolLM2 and a generated invoice-extraction
//! task (`lathe_jobs::pipeline::demo`), run as a job of a project in the store
//! (`lathe_server::demo`) with its events rendered in the terminal; then the service, so
//! that the project can be read in the web UI.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use lathe_jobs::pipeline::demo::DemoSpec;

use lathe_server::{AppState, ServerConfig};

use crate::cli::{Compute, DEFAULT_MODEL, DataDir};
use crate::render::Terminal;

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
    /// Do not serve the result afterwards (scripted use).
    #[arg(long)]
    no_serve: bool,
    /// Where the web UI listens afterwards.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    dir: DataDir,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let started = Instant::now();
    a.compute.setup()?;
    let spec = DemoSpec {
        model: a.model.clone(),
        examples: a.examples,
        eval_items: a.eval_items,
        epochs: a.epochs,
        max_steps: a.max_steps,
        lr: a.lr,
        rank: a.rank,
        seed: a.seed,
        zero_shot_only: a.zero_shot_only,
    };
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let mut config = ServerConfig::new(a.dir.path());
        config.device = a.compute.device.clone();
        config.models.insert(model_name(&a.model), a.model.clone());
        let state = AppState::open(config, None).await?;
        let run = lathe_server::demo::run(&state, spec, &Terminal::new()).await?;
        let base = format!("http://{}", a.addr);
        let page = format!("{base}/projects/{}/jobs/{}", run.project.id, run.job.id);
        if run.job.state.as_str() != "succeeded" {
            bail!("the demo job {}: {}", run.job.state.as_str(), run.job.error.unwrap_or_default());
        }
        let outcome = run.job.outcome.unwrap_or_default();
        println!("\nreport:  {}", outcome["report"]["html"].as_str().unwrap_or("-"));
        println!("         {}", outcome["report"]["json"].as_str().unwrap_or("-"));
        println!("adapter: {}", outcome["adapter_dir"].as_str().unwrap_or("-"));
        println!("project: {} (job {})", run.project.id, run.job.id);
        println!("done in {}", crate::cli::duration(started.elapsed().as_secs_f64()));
        if a.no_serve {
            println!("\n`lathe serve --data-dir {}` shows it in the web UI; sign in with this token (shown once):\n\n    {}", a.dir.path().display(), run.token.expose());
            return Ok(());
        }
        println!("\nThe demo project is in the web UI: open {page}");
        println!("and sign in with this token (shown once):\n\n    {}\n\nCtrl-C stops the server.", run.token.expose());
        lathe_server::serve(state, a.addr, 1).await?;
        Ok(())
    })
}

/// The name jobs know a model by: its file name without `.gguf`, lower-cased.
fn model_name(path: &std::path::Path) -> String {
    let stem = path.file_stem().map_or_else(|| "model".to_string(), |s| s.to_string_lossy().to_lowercase());
    stem.split('.').next().unwrap_or("model").to_string()
}
