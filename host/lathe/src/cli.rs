use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::render::Terminal;
use crate::{bench, data, demo, eval, pack, plugin, serve, train};
use lathe_engine::device::parse_device;
use lathe_engine::{LoadedModel, Message, SamplingParams};
use lathe_jobs::Env;

pub use lathe_jobs::DEFAULT_MODEL;

#[derive(Parser)]
#[command(name = "lathe", version, about = "Fine-tune open-weight LLMs for domain tasks, and prove they beat the prompted base model")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the workflow end to end on SmolLM2.
    Demo(demo::DemoArgs),
    /// Generate text from a model, streaming tokens to the terminal.
    Generate(GenerateArgs),
    /// Measure performance.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Write, build, inspect and try plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Build, inspect, install and export eval packs (plugins, suites and held-out data for
    /// one task, as one verified file).
    #[command(subcommand)]
    Pack(pack::PackCommand),
    /// Import, curate, split and inspect datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Evaluate models, find the prompted baseline, compare runs, write reports.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Fine-tune a LoRA adapter, watched by an eval suite.
    Train(Box<train::TrainArgs>),
    /// Write an adapter as PEFT, a merged Hugging Face folder, or a merged GGUF.
    Export(train::ExportArgs),
    /// Run the service: the REST and OpenAI-compatible APIs with an in-process worker.
    Serve(serve::ServeArgs),
    /// Run workers that take jobs from a shared database.
    Worker(serve::WorkerArgs),
}

/// Where Lathe keeps datasets, runs and reports.
#[derive(Args, Clone)]
pub struct DataDir {
    /// Default: $LATHE_HOME, else ./.lathe
    #[arg(long = "data-dir")]
    pub data_dir: Option<PathBuf>,
}

impl DataDir {
    pub fn path(&self) -> PathBuf {
        self.data_dir
            .clone()
            .or_else(|| std::env::var_os("LATHE_HOME").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(".lathe"))
    }

    /// The job environment over this folder, computing on the CPU (data commands).
    pub fn env(&self) -> Env {
        Env::new(self.path(), lathe_engine::Device::flex())
    }
}

/// Runs a pipeline with its events rendered in the terminal.
pub fn run_job<S, O>(env: &Env, spec: &S, pipeline: fn(&Env, &S, &dyn lathe_jobs::Sink) -> lathe_jobs::Result<O>) -> Result<O> {
    Ok(pipeline(env, spec, &Terminal::new())?)
}

/// Where and how to compute.
#[derive(Args, Clone)]
pub struct Compute {
    /// cpu (default), cuda[:N] (needs the `cuda` build) or wgpu (needs the `wgpu` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Multiply every token with f32 activations, which matches the reference
    /// (transformers) within float rounding, instead of the default: sampled tokens with
    /// activations rounded to 8 bits and integer dot products against the quantized
    /// weights, as llama.cpp decodes (prompts stay f32), faster and with logits a few
    /// tenths from the f32 path's.
    #[arg(long, env = "LATHE_F32_ACTIVATIONS")]
    pub f32_activations: bool,
}

impl Compute {
    /// The job environment over `dir` on this device.
    pub fn env(&self, dir: &DataDir) -> Result<Env> {
        Ok(Env::new(dir.path(), self.setup()?))
    }

    pub fn setup(&self) -> Result<lathe_engine::Device> {
        lathe_engine::quant::set_int8_activations(!self.f32_activations);
        lathe_engine::quant::cpu_kernel().map_err(anyhow::Error::msg)?;
        lathe_engine::team::spin().map_err(anyhow::Error::msg)?;
        if let Some(n) = self.threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .context("setting the thread count")?;
        }
        Ok(parse_device(&self.device)?)
    }
}


#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "chat"]))]
struct GenerateArgs {
    /// A GGUF file or Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter (PEFT folder) applied on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Raw text to continue.
    #[arg(long)]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// A system message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[command(flatten)]
    compute: Compute,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Generate(a) => generate(a),
        Command::Bench(b) => bench::run(b),
        Command::Plugin(p) => plugin::run(p),
        Command::Pack(p) => pack::run(p),
        Command::Data(d) => data::run(d),
        Command::Eval(e) => eval::run(e),
        Command::Train(t) => train::train(*t),
        Command::Export(e) => train::export(e),
        Command::Serve(a) => serve::serve(a),
        Command::Worker(a) => serve::worker(a),
    }
}

/// The model at `path`, as training and evaluation read it (`lathe_engine::load`).
pub fn load(path: &Path, device: &lathe_engine::Device) -> Result<LoadedModel> {
    load_by(path, device, lathe_engine::load)
}

/// The model at `path` for generation alone: quantized weights keep their blocks alone
/// (`lathe_engine::load_blocks`), as the server's.
pub fn load_blocks(path: &Path, device: &lathe_engine::Device) -> Result<LoadedModel> {
    load_by(path, device, lathe_engine::load_blocks)
}

/// The model at `path` by one of the engine's loaders (a training run's:
/// `lathe_engine::training_loader`).
pub fn load_by(path: &Path, device: &lathe_engine::Device, loader: fn(&Path, &lathe_engine::Device) -> lathe_engine::Result<LoadedModel>) -> Result<LoadedModel> {
    if !path.exists() && path == Path::new(DEFAULT_MODEL) {
        anyhow::bail!("{} is missing: run scripts/setup.sh (it fetches the model)", path.display());
    }
    let start = Instant::now();
    let m = loader(path, device)?;
    let c = &m.model.config;
    eprintln!(
        "loaded {} ({:?}, {} layers, hidden {}, vocab {}) in {:.1} s",
        path.display(),
        c.architecture,
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        start.elapsed().as_secs_f64()
    );
    Ok(m)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let device = a.compute.setup()?;
    let m = load_blocks(&a.model, &device)?;
    let adapter = match &a.adapter {
        Some(p) => Some(lathe_engine::Adapter::load_peft(p, &m.model.config, &device)?),
        None => None,
    };
    let ids = match (&a.prompt, &a.chat) {
        (Some(p), _) => m.tokenizer.encode(p, true)?,
        (None, Some(c)) => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", c));
            m.tokenizer.encode_chat(&msgs, true)?
        }
        (None, None) => unreachable!("clap requires --prompt or --chat"),
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop,
        ignore_eos: false,
    };
    stream(&m, adapter.as_ref(), &ids, &params)?;
    Ok(())
}

/// Generates for one prompt, printing text as it comes, and reports speed on stderr.
fn stream(m: &LoadedModel, adapter: Option<&lathe_engine::Adapter>, ids: &[u32], params: &SamplingParams) -> Result<lathe_engine::Generation> {
    let start = Instant::now();
    let mut out = std::io::stdout();
    let mut on_text = |_row: usize, text: &str| {
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    };
    let g = lathe_engine::generate::generate_with(&m.model, adapter, &m.tokenizer, &[ids.to_vec()], params, &mut on_text)?
        .pop()
        .expect("one prompt gives one generation");
    println!();
    eprintln!(
        "[{} prompt tokens, {} generated, {:?}, {:.1} s]",
        g.prompt_tokens,
        g.token_ids.len(),
        g.finish_reason,
        start.elapsed().as_secs_f64()
    );
    Ok(g)
}

/// `4m05s`, `1h02m`.
pub fn duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 { format!("{}h{:02}m", s / 3600, s / 60 % 60) } else { format!("{}m{:02}s", s / 60, s % 60) }
}
