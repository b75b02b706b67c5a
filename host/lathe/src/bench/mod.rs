//! `lathe bench ...`: throughput measurements whose numbers go into BENCHMARKS.md.

mod artifacts;
mod serve;
mod service;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lathe_engine::generate::{argmax, logits_to_host};
use lathe_engine::{CausalLm, KvCache, KvPool, Logits, SeqCache, SeqStep, Step};

use crate::cli::{Compute, DEFAULT_MODEL, load, load_blocks, load_by};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prompt-processing and decode tokens/s at several batch sizes, on the path generation
    /// takes (on the CPU: paged caches and host buffers, as `generate`, `eval` and `serve`).
    Generate(GenerateBench),
    /// Whether a device computes what the CPU computes: logits at every prompt position and
    /// greedy continuations, for the same weights loaded on both. Fails when they differ.
    Parity(ParityBench),
    /// Writes a Hugging Face folder with random weights in the shape of a model (or a larger
    /// one), for benchmarks at sizes no fixture has; PyTorch loads the same folder.
    SyntheticModel(SyntheticModel),
    /// Scorer throughput (native, wasm single and batched, Python), instantiation, loading.
    Plugins(PluginBench),
    /// LoRA training tokens/s and peak memory.
    Train(TrainBench),
    /// Dataset import and curation rows/s on a generated file, against a Python anchor.
    Data(DataBench),
    /// Eval examples/s on the demo's invoice suite, batched against one at a time.
    Eval(EvalBench),
    /// The serving scheduler at rising concurrency: TTFT, time per output token, latency
    /// percentiles and tokens/s, against static batches of the same prompts; a capacity plan.
    Serve(serve::ServeBench),
    /// Job queue: enqueues/s, and claims/s (claim + complete) by concurrent claimers, each
    /// with a pool of its own, on SQLite or PostgreSQL.
    Claims(service::ClaimsBench),
    /// The service: requests/s and latency percentiles on read endpoints of a real server,
    /// with a bounded load from a second process on loopback; then the job queue's claims/s.
    Api(service::ApiBench),
    /// Artifact store upload and download MiB/s (local folder or S3-compatible bucket).
    Artifacts(artifacts::ArtifactsBench),
    /// The load generator `bench api` starts in a second process.
    #[command(hide = true)]
    ApiLoad(service::ApiLoad),
}

#[derive(Args)]
pub struct DataBench {
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
}

#[derive(Args)]
pub struct EvalBench {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Held-out items per measurement.
    #[arg(long, default_value_t = 16)]
    items: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
    batch: Vec<usize>,
    #[command(flatten)]
    compute: Compute,
}

#[derive(Args)]
pub struct TrainBench {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA targets (`all` or a list such as `q,v`).
    #[arg(long, default_value = "all")]
    targets: String,
    /// Measured optimizer steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// QLoRA: 4-bit frozen projections, back-propagation one layer at a time.
    #[arg(long)]
    qlora: bool,
    /// Mixed precision: the frozen base in bf16, the LoRA weights in f32 (the anchor then
    /// runs peft in bf16 too).
    #[arg(long)]
    bf16: bool,
    /// Gradient checkpointing: keep only each decoder layer's input and recompute the layer
    /// before its backward pass, as QLoRA does, over the full-precision base.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Time the same step in PyTorch + peft (`scripts/bench_peft.py`, run by
    /// `$LATHE_ANCHOR_PYTHON`, else `.venv-anchors/bin/python`, else `python3`) on the same
    /// weights and thread count, and print the ratios. A GGUF model is first written as a
    /// Hugging Face folder of its shape with random weights, which both then train on. With
    /// `--qlora` peft runs QLoRA (bitsandbytes' 4-bit NF4 projections, gradient
    /// checkpointing), with `--gradient-checkpointing` its gradient checkpointing.
    #[arg(long)]
    vs_peft: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: Compute,
}

#[derive(Args)]
pub struct ParityBench {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Prompt length in tokens; logits are compared at every position.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Greedy tokens decoded on each device after the prompt.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// The largest logit difference allowed, as a fraction of the largest logit (default:
    /// 1e-3 where the device multiplies in f32, 1e-2 where it multiplies in TF32, as CUDA does).
    #[arg(long)]
    tolerance: Option<f32>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: Compute,
}

#[derive(Args)]
pub struct SyntheticModel {
    /// The model whose configuration and tokenizer to copy: a GGUF or a Hugging Face folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    like: PathBuf,
    /// Hidden size (the head size becomes hidden / heads).
    #[arg(long)]
    hidden: Option<usize>,
    /// MLP intermediate size.
    #[arg(long)]
    intermediate: Option<usize>,
    #[arg(long)]
    layers: Option<usize>,
    /// Query heads.
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write only `config.json` and the tokenizer: a shape small enough to copy to another
    /// machine, where `--like` that folder writes the weights.
    #[arg(long)]
    no_weights: bool,
    /// Write one GGUF file at `--out` instead of a folder, its matrices as f32, f16, q8_0,
    /// q4_0, q4_1 or q4_k_m (llama.cpp's mix of Q4_K and Q6_K); the tokenizer is copied
    /// from `--like`, which must then be a GGUF.
    #[arg(long, value_name = "TYPE")]
    gguf: Option<String>,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct GenerateBench {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded after the prompt.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print one JSON object per batch size instead of a table.
    #[arg(long)]
    json: bool,
    /// Then measure llama.cpp on the same GGUF, prompt length, decode length and thread count
    /// (`scripts/bench_llamacpp.py`, run by `$LATHE_ANCHOR_PYTHON`, else
    /// `.venv-anchors/bin/python`, else `python3`; `scripts/anchor_llamacpp.sh` installs it),
    /// at the same batch sizes, and print the ratios at each. CPU only.
    #[arg(long)]
    vs_llamacpp: bool,
    #[command(flatten)]
    compute: Compute,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(a) => generate(a),
        BenchCommand::Parity(a) => parity(a),
        BenchCommand::SyntheticModel(a) => synthetic_model(a),
        BenchCommand::Plugins(a) => plugins(a),
        BenchCommand::Train(a) => train(a),
        BenchCommand::Data(a) => data(a),
        BenchCommand::Eval(a) => eval(a),
        BenchCommand::Serve(a) => serve::serve(a),
        BenchCommand::Claims(a) => service::claims(&a),
        BenchCommand::Artifacts(a) => artifacts::artifacts(&a),
        BenchCommand::Api(a) => service::api(&a),
        BenchCommand::ApiLoad(a) => service::load(&a),
    }
}

/// The Python anchor for `bench data`: parse every line, write it back in a canonical form
/// (sorted keys, no spaces) and hash the result — the least an importer does.
const PY_IMPORT: &str = r#"
import hashlib, json, sys, time
t = time.perf_counter()
h = hashlib.sha256()
rows = 0
with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[2], "w", encoding="utf-8") as out:
    for line in f:
        if not line.strip():
            continue
        rec = json.loads(line)
        if not isinstance(rec.get("messages"), list):
            raise SystemExit("bad record")
        s = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
        out.write(s)
        h.update(s.encode())
        rows += 1
print(rows / (time.perf_counter() - t))
"#;

fn data(a: DataBench) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("bench.jsonl");
    lathe_data::bench::generate_jsonl(&source, a.rows, 1)?;
    let r = lathe_data::bench::run(&dir.path().join("store"), &source, &lathe_data::ImportOptions::default())?;
    let py = std::process::Command::new("python3")
        .arg("-c")
        .arg(PY_IMPORT)
        .arg(&source)
        .arg(dir.path().join("py.jsonl"))
        .output();
    let py_rows_per_s: Option<f64> = py.ok().filter(|o| o.status.success()).and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok());
    println!("{} rows, {:.1} MB", r.rows, r.source_bytes as f64 / 1e6);
    println!(
        "import      {:>7.2} s  {:>10.0} rows/s  {:.0} MB/s{}",
        r.import_s,
        r.import_rows_per_s,
        r.import_mb_per_s,
        py_rows_per_s.map_or(String::new(), |p| format!("   (Python json parse+dump+sha256: {p:.0} rows/s → {:.1}x)", r.import_rows_per_s / p))
    );
    let per = |s: f64| r.rows as f64 / s;
    println!("statistics  {:>7.2} s  {:>10.0} rows/s", r.statistics_s, per(r.statistics_s));
    println!("dedupe      {:>7.2} s  {:>10.0} rows/s  (exact + MinHash near, {} dropped)", r.dedupe_s, per(r.dedupe_s), r.dedupe_dropped);
    println!("pii scan    {:>7.2} s  {:>10.0} rows/s  ({} rows with hits)", r.pii_s, per(r.pii_s), r.pii_rows);
    println!("split       {:>7.2} s  {:>10.0} rows/s  ({} held out)", r.split_s, per(r.split_s), r.heldout_rows);
    Ok(())
}

fn eval(a: EvalBench) -> Result<()> {
    use lathe_jobs::eval::{self as ev, Item, Plugins, Subject};
    let device = a.compute.setup()?;
    let m = load(&a.model, &device)?;
    let env = lathe_jobs::Env::new(std::env::temp_dir(), device);
    let mut suite = lathe_jobs::invoices::invoice_suite();
    let plugins = Plugins::load(&env, &suite)?;
    let items: Vec<Item> = lathe_jobs::invoices::invoice_examples(a.items, 99)
        .iter()
        .map(Item::from_example)
        .collect::<lathe_jobs::Result<_>>()?;
    let subject = Subject::base(&m, a.model.display().to_string());
    let template = suite.templates[0].clone();
    println!(
        "{} invoice items, template `{}`, max {} new tokens, {} threads, {} kernel, {} activations",
        a.items,
        template.name,
        suite.max_tokens,
        rayon::current_num_threads(),
        lathe_engine::quant::cpu_kernel().unwrap_or("?"),
        activations()
    );
    let mut first = None;
    for &b in &a.batch {
        suite.batch_size = b;
        let run = ev::run(&subject, &suite, &plugins, &template, &[], &items, None, &lathe_jobs::NullSink, "")?;
        let base = *first.get_or_insert(run.examples_per_s);
        println!("batch {b:>3}: {:.2} examples/s ({:.1}x batch {})", run.examples_per_s, run.examples_per_s / base, a.batch[0]);
    }
    Ok(())
}

/// Resident memory of this process now (Linux `VmRSS`), in MiB.
pub fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Starts [`peak_rss_mib`] over from the resident memory now (Linux: `5` into `clear_refs`
/// resets VmHWM); elsewhere the peak stays the process's.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The anchors' Python: `$LATHE_ANCHOR_PYTHON`, else the repository's `.venv-anchors`, else
/// `python3`.
fn anchor_python() -> PathBuf {
    std::env::var_os("LATHE_ANCHOR_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let venv = PathBuf::from(".venv-anchors/bin/python");
        if venv.exists() { venv } else { "python3".into() }
    })
}

/// Runs the anchor `script` (a path under the repository root) with `args` and returns the
/// JSON objects it prints, one a line: its checks and measurements in order (at least one).
/// `install` says how to install it, for the error when it fails.
fn run_anchor(script: &str, args: &[String], install: &str) -> Result<Vec<serde_json::Value>> {
    let python = anchor_python();
    let out = std::process::Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("running {} {script} (from the repository root)", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "the anchor {script} failed under {} ({}; install it with {install}): {}",
        python.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
    );
    // Its measurements are the JSON lines; a library may print other lines of its own.
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).filter(serde_json::Value::is_object).collect();
    anyhow::ensure!(!lines.is_empty(), "{script} printed no JSON line");
    Ok(lines)
}

/// `--flag value` pairs for an anchor's command line.
fn anchor_args(pairs: &[(&str, String)]) -> Vec<String> {
    pairs.iter().flat_map(|(k, v)| [format!("--{k}"), v.clone()]).collect()
}

fn train(a: TrainBench) -> Result<()> {
    use lathe_engine::train::{Encoded, RunInfo, TrainConfig, Trainer};
    let device = a.compute.setup()?;
    // The anchor reads Hugging Face folders; Lathe trains on the same one.
    let shape_dir = tempfile::tempdir()?;
    let model = if a.vs_peft && !a.model.is_dir() {
        let (config, tokenizer) = lathe_engine::load_shape(&a.model)?;
        lathe_engine::tiny::write_synthetic(shape_dir.path(), &config, &tokenizer, 0)?;
        shape_dir.path().to_path_buf()
    } else {
        a.model.clone()
    };
    let mut m = load_by(&model, &device, lathe_engine::training_loader(a.qlora, a.bf16))?;
    m.model.training_base(a.qlora, a.bf16)?;
    let loaded_mib = rss_mib();
    // Measure the training's own peak, not the loading's.
    reset_peak_rss();
    let text = "Invoice 2231 from Acme Tools GmbH, dated 2024-03-05, total 1,284.50 EUR, due in 30 days. ";
    let mut ids = Vec::new();
    while ids.len() < a.seq {
        ids.extend(m.tokenizer.encode(text, false)?);
    }
    ids.truncate(a.seq);
    // Every token after the first is a target, as in a plain causal-LM step.
    let example = Encoded {
        target: (0..a.seq).map(|i| i > 0).collect(),
        tokens: ids,
    };
    let config = TrainConfig {
        lora: lathe_engine::LoraConfig {
            rank: a.rank,
            alpha: 2.0 * a.rank as f64,
            targets: lathe_engine::lora::parse_targets(&a.targets).map_err(anyhow::Error::msg)?,
            ..Default::default()
        },
        epochs: 1,
        batch_size: a.batch,
        qlora: a.qlora,
        bf16: a.bf16,
        gradient_checkpointing: a.gradient_checkpointing,
        ..TrainConfig::default()
    };
    let out = tempfile::tempdir()?;
    let trainer = Trainer {
        model: &m.model,
        tokenizer: &m.tokenizer,
        info: RunInfo {
            config,
            dataset: "bench".into(),
            base_model: a.model.display().to_string(),
            base_model_sha256: String::new(),
            chat_template_sha256: String::new(),
            tokenizer_template_sha256: None,
            train_examples: a.batch * (a.steps + 1),
            heldout_examples: 0,
        },
        train: vec![example; a.batch * (a.steps + 1)],
        heldout: Vec::new(),
        out_dir: out.path().into(),
        on_checkpoint: None,
    };
    let mut times = Vec::new();
    let mut last = Instant::now();
    trainer.run(false, None, &mut |_| {
        times.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        std::ops::ControlFlow::Continue(())
    })?;
    let measured = &times[1..];
    let mean = measured.iter().sum::<f64>() / measured.len() as f64;
    let tokens_per_s = (a.batch * a.seq) as f64 / mean;
    let peak = peak_rss_mib();
    let gpu_mib = lathe_engine::device::gpu_reserved_bytes(&a.compute.device).map(|b| b as f64 / 1048576.0);
    let threads = rayon::current_num_threads();
    let trainable_params =
        lathe_engine::Adapter::init(trainer.info.config.lora.clone(), &m.model.config, 0, &device).num_params();
    // The anchor runs while this process waits: free the model first.
    drop(trainer);
    drop(m);
    let anchor = if a.vs_peft {
        let mut args = anchor_args(&[
            ("model", model.display().to_string()),
            ("device", a.compute.device.clone()),
            ("threads", threads.to_string()),
            ("batch", a.batch.to_string()),
            ("seq", a.seq.to_string()),
            ("rank", a.rank.to_string()),
            ("steps", a.steps.to_string()),
            ("dtype", if a.bf16 { "bf16" } else { "f32" }.into()),
        ]);
        // Like for like: QLoRA against bitsandbytes' 4-bit projections, recomputed layers
        // against PyTorch's gradient checkpointing.
        args.extend(a.qlora.then(|| "--qlora".to_string()));
        args.extend(a.gradient_checkpointing.then(|| "--gradient-checkpointing".to_string()));
        run_anchor("scripts/bench_peft.py", &args, "scripts/anchor_peft.sh")?.pop()
    } else {
        None
    };
    let anchor_tps = anchor.as_ref().and_then(|v| v["tokens_per_s"].as_f64());
    let anchor_peak = anchor.as_ref().and_then(|v| v["peak_mib"].as_f64());
    // What the anchor's peak is compared with: GPU pool memory on a GPU (PyTorch's is its
    // `max_memory_reserved`), the resident set's peak on the CPU.
    let memory = gpu_mib.or(peak);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": a.model, "qlora": a.qlora, "bf16": a.bf16, "gradient_checkpointing": a.gradient_checkpointing, "batch": a.batch, "seq": a.seq, "rank": a.rank, "targets": a.targets,
                "threads": threads, "step_s": mean, "tokens_per_s": tokens_per_s, "first_step_s": times[0],
                "device": a.compute.device, "matmul": lathe_engine::device::MatmulPrecision::of(&a.compute.device),
                "cpu_kernel": lathe_engine::quant::cpu_kernel().ok(),
                "peak_rss_training_mib": peak, "rss_before_training_mib": loaded_mib, "gpu_reserved_mib": gpu_mib,
                "trainable_params": trainable_params,
                "anchor": anchor,
                "tokens_per_s_vs_anchor": anchor_tps.map(|t| tokens_per_s / t),
                "peak_memory_vs_anchor": anchor_peak.zip(memory).map(|(p, q)| q / p),
            })
        );
    } else {
        println!(
            "{}{} r{} ({}) | batch {} × {} | {} threads, {} kernel: {:.2} s/step, {:.1} training tokens/s, peak RSS while training {:.0} MiB (before training {:.0})",
            match (a.qlora, a.gradient_checkpointing) {
                (true, _) => "QLoRA",
                (false, true) => "LoRA (gradient checkpointing)",
                (false, false) => "LoRA",
            },
            if a.bf16 { " over a bf16 base" } else { "" },
            a.rank,
            a.targets,
            a.batch,
            a.seq,
            threads,
            lathe_engine::quant::cpu_kernel().unwrap_or("?"),
            mean,
            tokens_per_s,
            peak.unwrap_or(f64::NAN),
            loaded_mib.unwrap_or(f64::NAN)
        );
        if let Some(g) = gpu_mib {
            println!("GPU memory reserved by the pools: {g:.0} MiB");
        }
        if let (Some(v), Some(t)) = (&anchor, anchor_tps) {
            println!(
                "{} on the same weights: {:.1} training tokens/s, peak memory while training {:.0} MiB -> Lathe {:.2}x the tokens/s at {:.2}x the memory",
                v["anchor"].as_str().unwrap_or("PyTorch + peft"),
                t,
                anchor_peak.unwrap_or(f64::NAN),
                tokens_per_s / t,
                memory.zip(anchor_peak).map_or(f64::NAN, |(p, q)| p / q)
            );
        }
    }
    Ok(())
}

/// Tokens of a fixed English text, repeated to `n`.
fn prompt_ids(tokenizer: &lathe_engine::Tokenizer, n: usize) -> Result<Vec<u32>> {
    let text = "The quick brown fox jumps over the lazy dog while the sun sets behind the hills. ";
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(tokenizer.encode(text, false)?);
    }
    ids.truncate(n);
    Ok(ids)
}

fn parity(a: ParityBench) -> Result<()> {
    let device = a.compute.setup()?;
    let cpu = load(&a.model, &lathe_engine::Device::flex())?;
    let other = load(&a.model, &device)?;
    let ids = prompt_ids(&cpu.tokenizer, a.prompt_tokens)?;
    let p = lathe_engine::parity::compare(&cpu.model, &other.model, &cpu.tokenizer, &ids, a.new_tokens)?;
    let matmul = lathe_engine::device::MatmulPrecision::of(&a.compute.device);
    let tolerance = a.tolerance.unwrap_or(matmul.parity_tolerance());
    let holds = p.holds(tolerance);
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["model"] = serde_json::json!(a.model);
        v["device"] = serde_json::json!(a.compute.device);
        v["matmul"] = serde_json::json!(matmul);
        v["tolerance"] = serde_json::json!(tolerance);
        v["holds"] = serde_json::json!(holds);
        println!("{v}");
    } else {
        println!(
            "{} on {} vs cpu: {} positions, max |Δlogit| {:.3e} (largest logit {:.2}), argmax agrees at {:.1} %, greedy {} tokens {}",
            a.model.display(),
            a.compute.device,
            p.positions,
            p.max_abs_logit_diff,
            p.max_abs_logit,
            100.0 * p.argmax_agreement,
            p.greedy_cpu.len(),
            if p.greedy_cpu == p.greedy_device { "equal" } else { "DIFFER" },
        );
    }
    if !holds {
        anyhow::bail!(
            "{} ({} matmuls) does not compute what the CPU computes on {}: greedy tokens {}, max |Δlogit| {:.3e} > {} × {:.2}",
            a.compute.device,
            matmul.as_str(),
            a.model.display(),
            if p.greedy_cpu == p.greedy_device { "equal" } else { "differ" },
            p.max_abs_logit_diff,
            tolerance,
            p.max_abs_logit
        );
    }
    Ok(())
}

fn synthetic_model(a: SyntheticModel) -> Result<()> {
    let (mut config, tokenizer) = lathe_engine::load_shape(&a.like)?;
    let overridden = a.hidden.is_some() || a.heads.is_some();
    config.hidden_size = a.hidden.unwrap_or(config.hidden_size);
    config.intermediate_size = a.intermediate.unwrap_or(config.intermediate_size);
    config.num_layers = a.layers.unwrap_or(config.num_layers);
    config.num_heads = a.heads.unwrap_or(config.num_heads);
    config.num_kv_heads = a.kv_heads.unwrap_or(config.num_kv_heads);
    if overridden {
        anyhow::ensure!(
            config.hidden_size % config.num_heads == 0,
            "--hidden {} is not a multiple of --heads {}",
            config.hidden_size,
            config.num_heads
        );
        config.head_dim = config.hidden_size / config.num_heads;
    }
    anyhow::ensure!(
        config.num_heads % config.num_kv_heads == 0,
        "{} query heads cannot share {} KV heads evenly",
        config.num_heads,
        config.num_kv_heads
    );
    let params: usize = config.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    if let Some(ty) = &a.gguf {
        use lathe_engine::gguf::GgmlType;
        let ty = match ty.to_ascii_lowercase().as_str() {
            "f32" => GgmlType::F32,
            "f16" => GgmlType::F16,
            "q8_0" => GgmlType::Q8_0,
            "q4_0" => GgmlType::Q4_0,
            "q4_1" => GgmlType::Q4_1,
            "q4_k_m" => GgmlType::Q4_K,
            other => anyhow::bail!("--gguf {other}: expected f32, f16, q8_0, q4_0, q4_1 or q4_k_m"),
        };
        anyhow::ensure!(a.like.is_file(), "--gguf copies the tokenizer from a GGUF; --like {} is a folder", a.like.display());
        let like = lathe_engine::gguf::GgufFile::open(&a.like)?;
        let weights = lathe_engine::tiny::synthetic_weights(&config, a.seed);
        lathe_engine::export::write_gguf(&a.out, &config, &weights, &like.tokenizer_meta(), ty)?;
    } else if a.no_weights {
        lathe_engine::export::write_hf_shape(&a.out, &config, &tokenizer)?;
    } else {
        lathe_engine::tiny::write_synthetic(&a.out, &config, &tokenizer, a.seed)?;
    }
    println!(
        "{}: {} layers, hidden {}, {} heads over {} KV heads, intermediate {}, vocab {}: {:.0} M parameters",
        a.out.display(),
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.intermediate_size,
        config.vocab_size,
        params as f64 / 1e6
    );
    Ok(())
}

fn generate(a: GenerateBench) -> Result<()> {
    anyhow::ensure!(
        !a.vs_llamacpp || a.compute.device == "cpu",
        "--vs-llamacpp measures llama.cpp on the CPU; it cannot anchor --device {}",
        a.compute.device
    );
    let device = a.compute.setup()?;
    let m = load_blocks(&a.model, &device)?;
    let ids = prompt_ids(&m.tokenizer, a.prompt_tokens)?;
    let threads = rayon::current_num_threads();
    if !a.json {
        println!(
            "model {} | {} threads | {} kernel, {} activations | device {}",
            a.model.display(),
            threads,
            lathe_engine::quant::cpu_kernel().unwrap_or("?"),
            activations(),
            a.compute.device
        );
        println!("{:>5} {:>14} {:>14} {:>14} {:>14}", "batch", "pp tokens/s", "tg tokens/s", "resident MiB", "peak MiB");
    }
    let file_mib = std::fs::metadata(&a.model).map(|m| m.len() as f64 / (1 << 20) as f64).unwrap_or(f64::NAN);
    // Each batch size's tokens/s (prefill, decode), for the anchor's ratios.
    let mut ours = Vec::new();
    for &b in &a.batch {
        let (mut best_pp, mut best_tg, mut rss) = (0f64, 0f64, 0f64);
        // This batch size's own peak, not the loading's or an earlier batch's.
        reset_peak_rss();
        for _ in 0..a.repeat.max(1) {
            let run = if m.model.on_host() {
                time_paged(&m.model, &ids, b, a.decode_tokens)?
            } else {
                time_padded(&m.model, &ids, b, a.decode_tokens)?
            };
            best_pp = best_pp.max((b * ids.len()) as f64 / run.prefill_s);
            best_tg = best_tg.max((b * a.decode_tokens) as f64 / run.decode_s);
            rss = rss.max(run.rss_mib);
        }
        ours.push((b, best_pp, best_tg));
        let peak = peak_rss_mib().unwrap_or(f64::NAN);
        if a.json {
            println!(
                "{}",
                serde_json::json!({"engine": "lathe", "batch": b, "threads": threads,
                    "activations": if lathe_engine::quant::int8_activations() { "int8" } else { "f32" },
                    "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
                    "pp_tokens_per_s": best_pp, "tg_tokens_per_s": best_tg,
                    "rss_mib": rss, "peak_rss_mib": peak, "model_file_mib": file_mib})
            );
        } else {
            println!("{b:>5} {best_pp:>14.1} {best_tg:>14.1} {rss:>14.0} {peak:>14.0}");
        }
    }
    if a.vs_llamacpp {
        // The anchor runs while this process waits, on the same cores: free the model first.
        drop(m);
        let args = anchor_args(&[
            ("model", a.model.display().to_string()),
            ("threads", threads.to_string()),
            ("prompt-tokens", a.prompt_tokens.to_string()),
            ("decode-tokens", a.decode_tokens.to_string()),
            ("repeat", a.repeat.max(1).to_string()),
            ("batch", a.batch.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
        ]);
        let lines = run_anchor("scripts/bench_llamacpp.py", &args, "scripts/anchor_llamacpp.sh")?;
        for &(b, ours_pp, ours_tg) in &ours {
            let anchor = lines.iter().find(|l| l["batch"].as_u64() == Some(b as u64)).with_context(|| format!("the llama.cpp anchor reported no batch {b}"))?;
            let theirs = |k: &str| anchor[k].as_f64().with_context(|| format!("the llama.cpp anchor reported no {k}: {anchor}"));
            let (pp, tg) = (theirs("pp_tokens_per_s")?, theirs("tg_tokens_per_s")?);
            let (pp_ratio, tg_ratio) = (ours_pp / pp, ours_tg / tg);
            if a.json {
                println!("{}", serde_json::json!({"anchor": anchor, "batch": b, "pp_vs_anchor": pp_ratio, "tg_vs_anchor": tg_ratio}));
            } else {
                println!("{b:>5} {pp:>14.1} {tg:>14.1}   llama.cpp (same GGUF, threads and batch)");
                println!("Lathe / llama.cpp at batch {b}: prefill {pp_ratio:.2}x, decode {tg_ratio:.2}x");
            }
        }
    }
    Ok(())
}

/// One timed generation: seconds of prefill and of decode, and the resident MiB at the end
/// of decoding (model and caches held).
struct Timed {
    prefill_s: f64,
    decode_s: f64,
    rss_mib: f64,
}

impl Timed {
    fn end(prefill_s: f64, decode_s: f64) -> Timed {
        Timed {
            prefill_s,
            decode_s,
            rss_mib: rss_mib().unwrap_or(f64::NAN),
        }
    }
}

/// Seconds to prefill `b` copies of the prompt and to decode `decode` tokens after it, as
/// generation runs on the CPU: each row its own cache blocks, written in place, the steps
/// on host buffers.
fn time_paged(model: &CausalLm, ids: &[u32], b: usize, decode: usize) -> Result<Timed> {
    let c = &model.config;
    let mut pool = KvPool::new(c, b * (ids.len() + decode).div_ceil(lathe_engine::model::paged::BLOCK_TOKENS));
    let mut caches: Vec<SeqCache> = (0..b).map(|_| SeqCache::new(0)).collect();
    let mut step = |tokens: &[&[u32]]| -> Result<Vec<f32>> {
        let mut rows = Vec::with_capacity(b);
        for (cache, t) in caches.iter_mut().zip(tokens) {
            anyhow::ensure!(cache.reserve(&mut pool, t.len()), "the pool holds every row's tokens");
            rows.push(SeqStep { tokens: t, cache, adapter: None, prompt_len: ids.len() });
        }
        Ok(model.forward_paged(&mut rows, &mut pool)?)
    };
    let t = Instant::now();
    let mut host = step(&vec![ids; b])?;
    let pp = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..decode {
        let next: Vec<[u32; 1]> = host.chunks(c.vocab_size).map(|l| [argmax(l)]).collect();
        host = step(&next.iter().map(|t| &t[..]).collect::<Vec<_>>())?;
    }
    Ok(Timed::end(pp, t.elapsed().as_secs_f64()))
}

/// The same on the model's device (a GPU): one padded batch, a cache that grows by
/// concatenation.
fn time_padded(model: &CausalLm, ids: &[u32], b: usize, decode: usize) -> Result<Timed> {
    let mut cache = KvCache::new(model.config.num_layers);
    let step = Step {
        batch: b,
        seq: ids.len(),
        tokens: ids.iter().copied().cycle().take(b * ids.len()).collect(),
        positions: (0..b).flat_map(|_| 0..ids.len() as i64).collect(),
        valid: vec![true; b * ids.len()],
    };
    let t = Instant::now();
    let mut host = logits_to_host(model.forward(&step, &mut cache, Logits::Last))?;
    let pp = t.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size;
    let t = Instant::now();
    for i in 0..decode {
        let step = Step {
            batch: b,
            seq: 1,
            tokens: host.chunks(vocab).map(argmax).collect(),
            positions: vec![(ids.len() + i) as i64; b],
            valid: vec![true; b],
        };
        host = logits_to_host(model.forward(&step, &mut cache, Logits::Last))?;
    }
    Ok(Timed::end(pp, t.elapsed().as_secs_f64()))
}

#[derive(Args)]
pub struct PluginBench {
    /// Pairs per metric.
    #[arg(long, default_value_t = 200_000)]
    pairs: usize,
    /// Also time the plain-Python versions (scripts/bench_metrics.py) in the same run.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    python: bool,
    /// Also time these scorer components (a `.wasm` each: say the Rust and the Python build
    /// of one plugin) on the exact-match pairs: compile and load, instantiate, calls.
    #[arg(long)]
    component: Vec<PathBuf>,
}

/// Deterministic pairs for each metric, half of them matching.
fn plugin_pairs(n: usize) -> Vec<(&'static str, Vec<(String, String)>)> {
    let words = ["invoice", "total", "paid", "the", "vendor", "Paris", "delivery", "a", "late", "net", "tax", "due"];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut em = Vec::with_capacity(n);
    let mut f1 = Vec::with_capacity(n);
    let mut jf = Vec::with_capacity(n);
    for i in 0..n {
        let a = next();
        let answer = format!("answer {}", a % 1000);
        em.push((if i % 2 == 0 { answer.clone() } else { format!("answer {}", a % 997) }, answer));
        let sentence = |k: u64| (0..12).map(|j| words[((k >> (j * 4)) % words.len() as u64) as usize]).collect::<Vec<_>>().join(" ");
        f1.push((sentence(a), sentence(if i % 2 == 0 { a } else { next() })));
        let obj = |k: u64| {
            format!(
                r#"{{"vendor": "ACME {}", "total": {}.{:02}, "currency": "EUR", "date": "2024-03-{:02}", "address": {{"city": "Köln", "zip": "{}"}}}}"#,
                k % 50, k % 1000, k % 100, k % 28 + 1, 50000 + k % 999
            )
        };
        jf.push((obj(if i % 2 == 0 { a } else { next() }), obj(a)));
    }
    vec![("exact-match", em), ("token-f1", f1), ("json-field-match", jf)]
}

/// A scorer's pairs/s, best of 3: one call per pair (over the first `single_n` pairs), and
/// batched 10,000 pairs to a call.
fn call_rates(inst: &mut lathe_sandbox::Instance, pairs: &[(String, String)], single_n: usize) -> (f64, f64) {
    let best_of = |f: &mut dyn FnMut() -> f64| (0..3).map(|_| f()).fold(0f64, f64::max);
    let single_n = pairs.len().min(single_n);
    let single = best_of(&mut || {
        let t = Instant::now();
        for (p, r) in &pairs[..single_n] {
            std::hint::black_box(inst.score(p, r).expect("score"));
        }
        single_n as f64 / t.elapsed().as_secs_f64()
    });
    let preds: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
    let refs: Vec<&str> = pairs.iter().map(|p| p.1.as_str()).collect();
    let batch = best_of(&mut || {
        let t = Instant::now();
        for (p, r) in preds.chunks(10_000).zip(refs.chunks(10_000)) {
            std::hint::black_box(inst.score_batch(p, r).expect("batch"));
        }
        pairs.len() as f64 / t.elapsed().as_secs_f64()
    });
    (single, batch)
}

fn plugins(a: PluginBench) -> Result<()> {
    use lathe_metrics::text::{Normalize, exact_match, token_f1};
    use lathe_sandbox::{Runtime, RuntimeConfig};
    let data = plugin_pairs(a.pairs);
    let rt = Runtime::new(RuntimeConfig::default())?;
    let best_of = |f: &mut dyn FnMut() -> f64| (0..3).map(|_| f()).fold(0f64, f64::max);
    let rate = |n: usize, t: Instant| n as f64 / t.elapsed().as_secs_f64();
    let python: serde_json::Value = if a.python {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("pairs.json");
        let map: serde_json::Map<String, serde_json::Value> =
            data.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
        std::fs::write(&path, serde_json::Value::Object(map).to_string())?;
        let out = std::process::Command::new("python3").arg("scripts/bench_metrics.py").arg(&path).output()?;
        anyhow::ensure!(out.status.success(), "bench_metrics.py: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout)?
    } else {
        serde_json::Value::Null
    };
    println!("scorer throughput, pairs/s on one core ({} pairs, best of 3)", a.pairs);
    println!("{:<18} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}", "metric", "native", "wasm single", "wasm batch", "python", "batch/py", "batch/nat");
    let norm = Normalize { trim: true, ..Default::default() };
    for (name, pairs) in &data {
        let native: &dyn Fn(&str, &str) -> f64 = match *name {
            "exact-match" => &|p, r| exact_match(p, r, &norm),
            "token-f1" => &|p, r| token_f1(p, r),
            _ => &|p, r| lathe_metrics::json_fields::field_match_value(p, r, false).unwrap_or(0.0),
        };
        let nat = best_of(&mut || {
            let t = Instant::now();
            let s: f64 = pairs.iter().map(|(p, r)| native(p, r)).sum();
            std::hint::black_box(s);
            rate(pairs.len(), t)
        });
        let plugin = rt.load(lathe_sandbox::builtin(name).expect("built-in"))?;
        let (single, batch) = call_rates(&mut plugin.instance("{}")?, pairs, 50_000);
        let py = python[name].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<18} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>10.2} {:>10.2}",
            name, nat, single, batch, py, batch / py, batch / nat
        );
    }
    // Instantiation and loading.
    let plugin = rt.load(lathe_sandbox::builtin("exact-match").expect("built-in"))?;
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(plugin.instance("{}")?);
    }
    println!("instance + configure (exact-match): {:.1} µs", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    for name in ["exact-match", "json-schema"] {
        let bytes = lathe_sandbox::builtin(name).expect("built-in");
        let dir = tempfile::tempdir()?;
        let cfg = || RuntimeConfig { cache_dir: Some(dir.path().into()), ..Default::default() };
        let t = Instant::now();
        Runtime::new(cfg())?.load(bytes)?;
        let cold = t.elapsed().as_secs_f64() * 1e3;
        let warm_rt = Runtime::new(cfg())?;
        let t = Instant::now();
        let p = warm_rt.load(bytes)?;
        let cached = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let _ready = p.instance("{}");
        let first = t.elapsed().as_secs_f64() * 1e3;
        println!("{name}: cold compile + load {cold:.1} ms, cached load {cached:.2} ms, then first instance {first:.3} ms");
    }
    let pairs = &data.iter().find(|(k, _)| *k == "exact-match").expect("exact-match pairs").1;
    // Components load as the CLI and the server load them: through a compile cache, whose
    // file their instances' memory images map.
    let cache = tempfile::tempdir()?;
    let rt = Runtime::new(RuntimeConfig { cache_dir: Some(cache.path().into()), ..Default::default() })?;
    for path in &a.component {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let t = Instant::now();
        let plugin = rt.load(&bytes)?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let mut inst = plugin.instance("{}")?;
        let instance_ms = t.elapsed().as_secs_f64() * 1e3;
        let (single, batch) = call_rates(&mut inst, pairs, 20_000);
        println!(
            "{}: {:.1} MB, compile + load {load_ms:.0} ms, instance + configure {instance_ms:.1} ms, {single:.0} pairs/s one call each, {batch:.0} pairs/s batched",
            path.display(),
            bytes.len() as f64 / 1e6
        );
    }
    Ok(())
}

/// The activations the quantized products take, for the benches' headers.
fn activations() -> &'static str {
    if lathe_engine::quant::int8_activations() { "8-bit" } else { "f32" }
}
