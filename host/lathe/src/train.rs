//! `lathe train` (LoRA on a training version, watched by an eval suite) and `lathe export`
//! (PEFT, merged Hugging Face folder, GGUF). Settings not given as flags come from the
//! layers under them: `LATHE_TRAIN_*` variables, the data folder's `lathe.toml`
//! (`[train]`), the workflow's defaults.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lathe_jobs::pipeline::{self, train::{ExportSpec, TrainSpec}};
use lathe_jobs::settings::Layers;
use serde_json::{Map, Value};

use crate::cli::{Compute, DEFAULT_MODEL, DataDir, run_job};

#[derive(Args)]
pub struct TrainArgs {
    /// Base model: a GGUF file or a Hugging Face folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// The training version (id or name, e.g. `invoices.train`).
    #[arg(long)]
    data: String,
    /// The eval suite (a JSON file, or the name of a suite installed from a pack): its prompt
    /// template shapes the training examples and its primary metric drives early stopping.
    /// Lathe does not train without one.
    #[arg(long)]
    suite: String,
    /// Which of the suite's templates to train with (default: the first).
    #[arg(long)]
    template: Option<String>,
    /// Output folder (checkpoints, metrics.jsonl, best/ and last/ adapters).
    #[arg(long)]
    out: PathBuf,
    /// Settings file (default: lathe.toml in the data folder); its [train] table.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Learning rate [1e-4]; several (comma-separated) run a sweep and keep the best.
    #[arg(long, value_delimiter = ',')]
    lr: Vec<f64>,
    /// [3]
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many optimizer steps; the schedule spans them [0: no cap].
    #[arg(long)]
    max_steps: Option<usize>,
    /// [16]
    #[arg(long)]
    rank: Option<usize>,
    /// [32]
    #[arg(long)]
    alpha: Option<f64>,
    /// [0.1]
    #[arg(long)]
    dropout: Option<f64>,
    /// Projections to adapt: all, or a list of q,k,v,o,gate,up,down [all].
    #[arg(long)]
    targets: Option<String>,
    /// Scale by alpha/√rank (rank-stabilised LoRA).
    #[arg(long)]
    rslora: bool,
    /// QLoRA: keep the frozen projections as 4-bit blocks (the GGUF's own, or Q4_0) and
    /// back-propagate one layer at a time.
    #[arg(long)]
    qlora: bool,
    /// Mixed precision: the frozen base in bf16, the LoRA weights in f32. For GPUs with
    /// bf16 tensor cores (`--device cuda`) and CPUs with AMX tiles (Xeon Sapphire Rapids
    /// and later) or AVX-512 BF16 (AMD Zen 4), where it is faster than f32; on other CPUs
    /// the weights are widened to f32 per layer (half the weights' memory, about f32's
    /// speed).
    #[arg(long)]
    bf16: bool,
    /// Gradient checkpointing: recompute each decoder layer in the backward pass instead of
    /// keeping its activations (less memory, one more forward pass).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// [4]
    #[arg(long)]
    batch_size: Option<usize>,
    /// [1]
    #[arg(long)]
    grad_accum: Option<usize>,
    /// [512]
    #[arg(long)]
    max_len: Option<usize>,
    /// cosine, linear or constant, after the warm-up [cosine].
    #[arg(long)]
    schedule: Option<String>,
    /// [0.03]
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// [0]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// [1]
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// [42]
    #[arg(long)]
    seed: Option<u64>,
    /// Evaluate every N optimizer steps [0: each epoch].
    #[arg(long)]
    eval_every: Option<usize>,
    /// Checkpoint every N optimizer steps [0: each epoch].
    #[arg(long)]
    save_every: Option<usize>,
    /// Stop after this many evaluations without improvement [2; 0: never].
    #[arg(long)]
    patience: Option<usize>,
    /// Share of the training version kept aside to watch the run [0.1].
    #[arg(long)]
    validation_fraction: Option<f64>,
    /// Validation items scored with the suite's metric at each evaluation [16; 0: loss only].
    #[arg(long)]
    metric_items: Option<usize>,
    /// Continue from the latest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    dir: DataDir,
}

impl TrainArgs {
    /// The flags that were given, as the request layer of the settings.
    fn overrides(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        match self.lr.as_slice() {
            [] => {}
            [one] => put("learning_rate", Some((*one).into())),
            many => put("sweep", Some(many.into())),
        }
        put("epochs", self.epochs.map(Into::into));
        put("max_steps", self.max_steps.map(Into::into));
        put("rank", self.rank.map(Into::into));
        put("alpha", self.alpha.map(Into::into));
        put("dropout", self.dropout.map(Into::into));
        put("targets", self.targets.clone().map(Into::into));
        put("rslora", self.rslora.then_some(true.into()));
        put("qlora", self.qlora.then_some(true.into()));
        put("bf16", self.bf16.then_some(true.into()));
        put("gradient_checkpointing", self.gradient_checkpointing.then_some(true.into()));
        put("batch_size", self.batch_size.map(Into::into));
        put("grad_accum", self.grad_accum.map(Into::into));
        put("max_len", self.max_len.map(Into::into));
        put("schedule", self.schedule.clone().map(Into::into));
        put("warmup_ratio", self.warmup_ratio.map(Into::into));
        put("weight_decay", self.weight_decay.map(Into::into));
        put("max_grad_norm", self.max_grad_norm.map(Into::into));
        put("seed", self.seed.map(Into::into));
        put("eval_every", self.eval_every.map(Into::into));
        put("save_every", self.save_every.map(Into::into));
        put("patience", self.patience.map(Into::into));
        put("validation_fraction", self.validation_fraction.map(Into::into));
        put("metric_items", self.metric_items.map(Into::into));
        m
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    let toml = a.config.clone().unwrap_or_else(|| a.dir.path().join("lathe.toml"));
    let settings = Layers::from_process(Some(&toml))?.with_overrides(a.overrides()).resolve("train")?;
    let env = a.compute.env(&a.dir)?;
    let spec = TrainSpec {
        model: a.model,
        data: a.data,
        suite: lathe_jobs::pack::LocalPacks::new(&a.dir.env()).suite(&a.suite)?,
        template: a.template,
        out: Some(a.out),
        settings,
        resume: a.resume,
    };
    let out = run_job(&env, &spec, pipeline::train::train)?;
    println!("adapter: {}", out.adapter_dir.display());
    Ok(())
}

#[derive(Args)]
pub struct ExportArgs {
    /// The base model the adapter was trained on.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// A PEFT adapter folder (`best/`, `last/` or a checkpoint).
    #[arg(long)]
    adapter: PathBuf,
    /// peft (copy of the adapter), hf (merged safetensors folder), gguf-f16, gguf-q8_0,
    /// gguf-q4_1 or gguf-q4_k_m (merged, for llama.cpp).
    #[arg(long, default_value = "peft")]
    format: String,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    compute: Compute,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let spec = ExportSpec { model: a.model, adapter: a.adapter, format: a.format.parse()?, out: a.out };
    let env = a.compute.env(&DataDir { data_dir: None })?;
    run_job(&env, &spec, pipeline::train::export)?;
    Ok(())
}
