//! `lathe train` (LoRA on a training version, watched by an eval suite) and `lathe export`
//! (PEFT, merged Hugging Face folder, GGUF).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use lathe_engine::gguf::{GgmlType, GgufFile};
use lathe_engine::lora::parse_targets;
use lathe_engine::train::{Progress, Schedule, TrainConfig};
use lathe_engine::{Adapter, LoraConfig};
use lathe_jobs::eval::{Plugins, Suite};
use lathe_jobs::finetune::{self, Spec};

use crate::cli::{Compute, DataDir, DEFAULT_MODEL, load};

#[derive(Args)]
pub struct TrainArgs {
    /// Base model: a GGUF file or a Hugging Face folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// The training version (id or name, e.g. `invoices.train`).
    #[arg(long)]
    data: String,
    /// The eval suite (JSON): its prompt template shapes the training examples and its
    /// primary metric drives early stopping. Lathe does not train without one.
    #[arg(long)]
    suite: PathBuf,
    /// Which of the suite's templates to train with (default: the first).
    #[arg(long)]
    template: Option<String>,
    /// Output folder (checkpoints, metrics.jsonl, best/ and last/ adapters).
    #[arg(long)]
    out: PathBuf,
    /// Learning rate; several (comma-separated) run a sweep and keep the best.
    #[arg(long, value_delimiter = ',', default_value = "1e-4")]
    lr: Vec<f64>,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Stop after this many optimizer steps (0: no cap); the schedule spans them.
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// Projections to adapt: all, or a list of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "all")]
    targets: String,
    /// Scale by alpha/√rank (rank-stabilised LoRA).
    #[arg(long)]
    rslora: bool,
    /// QLoRA: keep the frozen projections as 4-bit blocks (the GGUF's own, or Q4_0) and
    /// back-propagate one layer at a time.
    #[arg(long)]
    qlora: bool,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// cosine, linear or constant (after the warm-up).
    #[arg(long, default_value = "cosine")]
    schedule: String,
    #[arg(long, default_value_t = 0.03)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate every N optimizer steps (0: each epoch).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every N optimizer steps (0: each epoch).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Stop after this many evaluations without improvement (0: never).
    #[arg(long, default_value_t = 2)]
    patience: usize,
    /// Share of the training version kept aside to watch the run.
    #[arg(long, default_value_t = 0.1)]
    validation_fraction: f64,
    /// Validation items scored with the suite's metric at each evaluation (0: loss only).
    #[arg(long, default_value_t = 16)]
    metric_items: usize,
    /// Continue from the latest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    dir: DataDir,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let schedule = match self.schedule.as_str() {
            "cosine" => Schedule::Cosine,
            "linear" => Schedule::Linear,
            "constant" => Schedule::Constant,
            other => bail!("--schedule {other}: expected cosine, linear or constant"),
        };
        let config = TrainConfig {
            lora: LoraConfig {
                rank: self.rank,
                alpha: self.alpha,
                dropout: self.dropout,
                targets: parse_targets(&self.targets).map_err(anyhow::Error::msg)?,
                rslora: self.rslora,
            },
            learning_rate: self.lr[0],
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_len: self.max_len,
            schedule,
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            patience: self.patience,
            qlora: self.qlora,
            ..TrainConfig::default()
        };
        config.validate()?;
        Ok(config)
    }
}

/// A one-line progress bar on stderr: step, loss, learning rate, tokens/s, ETA.
pub struct ProgressLine {
    started: Instant,
}

impl ProgressLine {
    pub fn new() -> Self {
        Self { started: Instant::now() }
    }

    pub fn show(&self, prefix: &str, p: &Progress) {
        let r = &p.record;
        let done = r.step as f64 / p.total_steps.max(1) as f64;
        let width = 24;
        let filled = (done * width as f64).round() as usize;
        let elapsed = self.started.elapsed().as_secs_f64().max(p.elapsed_s);
        let eta = if r.step > 0 { elapsed / r.step as f64 * (p.total_steps - r.step) as f64 } else { 0.0 };
        eprint!(
            "\r{prefix}step {:>4}/{} [{}{}] loss {:.4} lr {:.2e} {:.0} tok/s ETA {}   ",
            r.step,
            p.total_steps,
            "=".repeat(filled),
            " ".repeat(width - filled),
            r.loss,
            r.lr,
            p.tokens_per_s,
            duration(eta)
        );
        if r.step == p.total_steps {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

pub fn duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    let config = a.config()?;
    let suite = Suite::from_file(&a.suite)?;
    let template = match &a.template {
        Some(name) => suite
            .templates
            .iter()
            .find(|t| &t.name == name)
            .with_context(|| format!("--template {name}: the suite has {:?}", suite.templates.iter().map(|t| &t.name).collect::<Vec<_>>()))?,
        None => &suite.templates[0],
    };
    let store = crate::data::open_store(&a.dir)?;
    let data_id = store.resolve(&a.data)?;
    let items = lathe_jobs::eval::train_items(&store, &data_id)?;
    let (train_items, validation) = finetune::validation_split(&items, a.validation_fraction, 8);

    let device = a.compute.setup()?;
    let mut m = load(&a.model, &device)?;
    if config.qlora {
        let freed = m.model.quantize_base(GgmlType::Q4_0)?;
        eprintln!("QLoRA: the frozen projections are 4-bit blocks; {:.0} MiB of f32 copies dropped", freed as f64 / (1 << 20) as f64);
    }
    let runtime = crate::plugin::runtime()?;
    let plugins = Plugins::load(&runtime, &suite)?;
    let spec = Spec {
        model: &m.model,
        tokenizer: &m.tokenizer,
        model_name: a.model.display().to_string(),
        model_sha256: model_sha256(&a.model)?,
        suite: &suite,
        plugins: &plugins,
        template,
        config,
        dataset: data_id.clone(),
        metric_items: a.metric_items,
    };
    eprintln!(
        "training on {} examples ({} kept to watch the run) of {}; LoRA r{} on {} ({} parameters)",
        train_items.len(),
        validation.len(),
        &data_id[..16],
        spec.config.lora.rank,
        a.targets,
        Adapter::init(spec.config.lora.clone(), &m.model.config, 0, &device).num_params()
    );
    let bar = ProgressLine::new();
    let (points, winner, outcomes) = finetune::sweep(
        &spec,
        &a.lr,
        &train_items,
        &validation,
        &a.out,
        a.resume,
        &mut |lr, p| bar.show(&if a.lr.len() > 1 { format!("lr {lr:.0e} ") } else { String::new() }, p),
        &mut |n, v| eprintln!("\n  validation {}: {v:.4} on {n} items", suite.primary_metric()),
    )?;
    for (p, o) in points.iter().zip(&outcomes) {
        eprintln!(
            "lr {:.1e}: {} steps, final loss {:.4}, best {} at step {}{}",
            p.learning_rate,
            o.steps,
            p.final_loss,
            p.best_value.map_or("—".into(), |v| format!("{v:.4}")),
            p.best_step.map_or("—".into(), |s| s.to_string()),
            if o.stopped_early { " (stopped early)" } else { "" }
        );
    }
    let best = &outcomes[winner];
    println!("adapter: {}", best.adapter_dir.display());
    if points.len() > 1 {
        println!("sweep winner: lr {:.1e}", points[winner].learning_rate);
    }
    Ok(())
}

/// sha256 of a GGUF file, or of a folder's safetensors and config.
pub fn model_sha256(path: &Path) -> Result<String> {
    if path.is_file() {
        return finetune::file_sha256(path);
    }
    let mut parts = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") || p.file_name().is_some_and(|n| n == "config.json"))
        .collect();
    entries.sort();
    for p in entries {
        parts.push(finetune::file_sha256(&p)?);
    }
    Ok(finetune::sha256_hex(parts.join("\n").as_bytes()))
}

#[derive(Args)]
pub struct ExportArgs {
    /// The base model the adapter was trained on.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// A PEFT adapter folder (`best/`, `last/` or a checkpoint).
    #[arg(long)]
    adapter: PathBuf,
    /// peft (copy of the adapter), hf (merged safetensors folder), gguf-f16, gguf-q8_0 or
    /// gguf-q4_1 (merged, for llama.cpp).
    #[arg(long, default_value = "peft")]
    format: String,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    compute: Compute,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let device = a.compute.setup()?;
    let m = load(&a.model, &device)?;
    let adapter = Adapter::load_peft(&a.adapter, &m.model.config, &device)?;
    let gguf_type = match a.format.as_str() {
        "peft" => {
            adapter.save_peft(&a.out, &a.model.display().to_string())?;
            println!("PEFT adapter written to {}", a.out.display());
            return Ok(());
        }
        "hf" => {
            let merged = adapter.merge(&m.model);
            lathe_engine::export::write_hf_folder(&a.out, &m.model.config, &merged, &m.tokenizer)?;
            println!("merged Hugging Face folder written to {}", a.out.display());
            return Ok(());
        }
        "gguf-f16" => GgmlType::F16,
        "gguf-q8_0" => GgmlType::Q8_0,
        "gguf-q4_1" => GgmlType::Q4_1,
        other => bail!("--format {other}: expected peft, hf, gguf-f16, gguf-q8_0 or gguf-q4_1"),
    };
    if !a.model.is_file() {
        bail!("GGUF export copies the tokenizer from a GGUF base model; {} is a folder (export `hf` instead)", a.model.display());
    }
    let base = GgufFile::open(&a.model)?;
    let tokenizer_meta: Vec<(String, lathe_engine::gguf::Value)> = base
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let merged = adapter.merge(&m.model);
    lathe_engine::export::write_gguf(&a.out, &m.model.config, &merged, &tokenizer_meta, gguf_type)?;
    println!("merged GGUF ({}) written to {}", gguf_type.name(), a.out.display());
    Ok(())
}
