//! `lathe bench ...`: throughput measurements whose numbers go into BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use lathe_engine::generate::{argmax, logits_to_host};
use lathe_engine::{KvCache, Logits, Step};

use crate::cli::{Compute, DEFAULT_MODEL, load};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prompt-processing and decode tokens/s at several batch sizes.
    Generate(GenerateBench),
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
    #[command(flatten)]
    compute: Compute,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(a) => generate(a),
    }
}

fn generate(a: GenerateBench) -> Result<()> {
    let device = a.compute.setup()?;
    let m = load(&a.model, &device)?;
    let text = "The quick brown fox jumps over the lazy dog while the sun sets behind the hills. ";
    let mut ids = Vec::new();
    while ids.len() < a.prompt_tokens {
        ids.extend(m.tokenizer.encode(text, false)?);
    }
    ids.truncate(a.prompt_tokens);
    let threads = rayon::current_num_threads();
    if !a.json {
        println!("model {} | {} threads | device {}", a.model.display(), threads, a.compute.device);
        println!("{:>5} {:>14} {:>14}", "batch", "pp tokens/s", "tg tokens/s");
    }
    for &b in &a.batch {
        let (mut best_pp, mut best_tg) = (0f64, 0f64);
        for _ in 0..a.repeat.max(1) {
            let mut cache = KvCache::new(m.model.config.num_layers);
            let step = Step {
                batch: b,
                seq: ids.len(),
                tokens: ids.iter().copied().cycle().take(b * ids.len()).collect(),
                positions: (0..b).flat_map(|_| 0..ids.len() as i64).collect(),
                valid: vec![true; b * ids.len()],
            };
            let t = Instant::now();
            let logits = m.model.forward(&step, &mut cache, Logits::Last);
            let mut host = logits_to_host(logits)?;
            best_pp = best_pp.max((b * ids.len()) as f64 / t.elapsed().as_secs_f64());
            let vocab = m.model.config.vocab_size;
            let t = Instant::now();
            for i in 0..a.decode_tokens {
                let next: Vec<u32> = host.chunks(vocab).map(argmax).collect();
                let step = Step {
                    batch: b,
                    seq: 1,
                    tokens: next,
                    positions: vec![(ids.len() + i) as i64; b],
                    valid: vec![true; b],
                };
                host = logits_to_host(m.model.forward(&step, &mut cache, Logits::Last))?;
            }
            best_tg = best_tg.max((b * a.decode_tokens) as f64 / t.elapsed().as_secs_f64());
        }
        if a.json {
            println!(
                "{}",
                serde_json::json!({"engine": "lathe", "batch": b, "threads": threads,
                    "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
                    "pp_tokens_per_s": best_pp, "tg_tokens_per_s": best_tg})
            );
        } else {
            println!("{b:>5} {best_pp:>14.1} {best_tg:>14.1}");
        }
    }
    Ok(())
}
