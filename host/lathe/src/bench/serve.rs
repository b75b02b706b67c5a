//! `lathe bench serve`: the continuous-batching scheduler under rising concurrency, on the
//! demo task's held-out prompts, against static batches of the same prompts (the engine's
//! batched generation, what evaluation used before) in the same run. With `--adapters N`,
//! the same prompts again through N adapters over the base (request i through adapter
//! i mod N), against the base alone. With `--json-schema`, the same prompts again with
//! every answer constrained to the invoice suite's JSON Schema, against the unconstrained
//! run. With `--anchor-url`, the same prompt texts again through another OpenAI-compatible
//! server (llama.cpp's, `scripts/anchor_llamacpp.sh serve`) from the same clients.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use lathe_engine::{SamplingParams, generate};
use lathe_serving::{AdapterRef, Event, Request, Scheduler, ServeConfig};
use serde_json::json;

use crate::cli::{Compute, DEFAULT_MODEL, load_blocks};

#[derive(Args)]
pub struct ServeBench {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Held-out invoice prompts replayed at each level.
    #[arg(long, default_value_t = 32)]
    prompts: usize,
    /// Concurrent streams, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// New tokens at most per request (greedy; the end-of-sequence token ends it sooner).
    #[arg(long, default_value_t = 72)]
    max_tokens: usize,
    /// Latency targets for the capacity plan: p99 time per output token, p99 time to
    /// first token.
    #[arg(long, default_value_t = 250)]
    tpot_target_ms: u64,
    #[arg(long, default_value_t = 3000)]
    ttft_target_ms: u64,
    /// Also run every level through this many random LoRA adapters (request i through
    /// adapter i mod N), against the base.
    #[arg(long, default_value_t = 0)]
    adapters: usize,
    /// Rank of those adapters (every projection).
    #[arg(long, default_value_t = 16)]
    adapter_rank: usize,
    /// Also run every level with each answer constrained to the invoice JSON Schema.
    #[arg(long)]
    json_schema: bool,
    /// Also replay the prompts (as text, greedy, the same token budget) against this
    /// OpenAI-compatible server's `/v1/completions`, e.g. `http://127.0.0.1:8091` for
    /// `scripts/anchor_llamacpp.sh serve`.
    #[arg(long)]
    anchor_url: Option<String>,
    /// Skip the static-batch reference.
    #[arg(long)]
    no_reference: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: Compute,
}

/// One request as the client saw it.
struct Timing {
    ttft: Duration,
    /// Mean time per output token after the first.
    tpot: Option<Duration>,
    e2e: Duration,
    tokens: usize,
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Replays `prompts` from `c` client threads, each sending its next prompt when the last
/// one finished (closed loop, as a user waiting on answers).
fn replay(s: &Scheduler, prompts: &[Vec<u32>], adapters: &[AdapterRef], schema: Option<&serde_json::Value>, params: &SamplingParams, c: usize) -> Result<(Vec<Timing>, Duration)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    let timings = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..c)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<Timing>> {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(p) = prompts.get(i) else { return Ok(out) };
                        let sent = Instant::now();
                        let adapter = (!adapters.is_empty()).then(|| adapters[i % adapters.len()].clone());
                        let mut rx = s.submit(Request { prompt: p.clone(), params: params.clone(), adapter, logprobs: None, json_schema: schema.cloned() })?;
                        let (mut first, mut tokens) = (None, 0);
                        loop {
                            match rx.blocking_recv() {
                                Some(Event::Token { .. }) => {
                                    first.get_or_insert_with(|| sent.elapsed());
                                    tokens += 1;
                                }
                                Some(Event::Done { .. }) => break,
                                Some(Event::Failed(e)) => bail!("request failed: {e}"),
                                None => bail!("the scheduler stopped"),
                            }
                        }
                        let e2e = sent.elapsed();
                        let ttft = first.unwrap_or(e2e);
                        let tpot = (tokens > 1).then(|| (e2e - ttft) / (tokens as u32 - 1));
                        out.push(Timing { ttft, tpot, e2e, tokens });
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("client thread")).collect::<Result<Vec<_>>>()
    })?;
    Ok((timings.into_iter().flatten().collect(), start.elapsed()))
}

/// Replays prompt texts against an OpenAI-compatible server from `c` closed-loop clients;
/// returns the completion tokens it reported, the prompt tokens it counted, and the wall
/// time.
fn replay_http(url: &str, texts: &[String], max_tokens: usize, c: usize) -> Result<(usize, usize, Duration)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    let counts = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..c)
            .map(|_| {
                scope.spawn(|| -> Result<(usize, usize)> {
                    let (mut out, mut prompt) = (0, 0);
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(text) = texts.get(i) else { return Ok((out, prompt)) };
                        let body = json!({"model": "anchor", "prompt": text, "max_tokens": max_tokens, "temperature": 0});
                        let r: serde_json::Value = ureq::post(&format!("{url}/v1/completions"))
                            .send_json(body)
                            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
                            .into_json()?;
                        out += r["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
                        prompt += r["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("client thread")).collect::<Result<Vec<_>>>()
    })?;
    let (out, prompt) = counts.into_iter().fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
    Ok((out, prompt, start.elapsed()))
}

pub fn serve(a: ServeBench) -> Result<()> {
    use lathe_jobs::eval::{Item, render_messages};
    let device = a.compute.setup()?;
    let m = Arc::new(load_blocks(&a.model, &device)?);
    let suite = lathe_jobs::invoices::invoice_suite();
    let template = &suite.templates[0];
    let prompts: Vec<Vec<u32>> = lathe_jobs::invoices::invoice_examples(a.prompts, 99)
        .iter()
        .map(|e| {
            let item = Item::from_example(e)?;
            Ok(m.tokenizer.encode_chat(&render_messages(template, &[], &item)?, true)?)
        })
        .collect::<Result<_>>()?;
    let params = SamplingParams { max_tokens: a.max_tokens, ..SamplingParams::default() };
    let schema = lathe_jobs::invoices::invoice_schema();
    let dir = tempfile::tempdir()?;
    let adapters: Vec<AdapterRef> = (0..a.adapters)
        .map(|i| {
            let path = dir.path().join(format!("adapter-{i}"));
            lathe_engine::tiny::random_adapter(&m.model.config, a.adapter_rank, i as u64, &device).save_peft(&path, "bench")?;
            Ok(AdapterRef { key: format!("bench-{i}"), dir: path })
        })
        .collect::<Result<_>>()?;
    let mean_prompt = prompts.iter().map(Vec::len).sum::<usize>() / prompts.len().max(1);
    if !a.json {
        println!("{} invoice prompts (mean {mean_prompt} tokens), at most {} new tokens, greedy, {} threads", prompts.len(), a.max_tokens, rayon::current_num_threads());
        println!("{:>4} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}", "c", "req/s", "out tok/s", "ttft p50", "ttft p99", "tpot p50", "tpot p99", "e2e p50", "e2e p99", "static t/s", "ratio");
    }
    let mut best_ok: Option<(usize, f64)> = None;
    // Output tokens/s of the prompts through a fresh scheduler, each request through its
    // adapter (i mod N) and under `schema`, for the comparisons beside each level.
    let throughput = |c: usize, adapters: &[AdapterRef], schema: Option<&serde_json::Value>| -> Result<f64> {
        let s = Scheduler::start(m.clone(), ServeConfig { max_seqs: c, max_loras: adapters.len().max(1), ..ServeConfig::default() });
        if let Some(schema) = schema {
            // Compiled once before the clock starts, as a server that has seen the schema.
            s.grammars()?.matcher(schema).map_err(anyhow::Error::msg)?;
        }
        let (t, wall) = replay(&s, &prompts, adapters, schema, &params, c)?;
        Ok(t.iter().map(|t| t.tokens).sum::<usize>() as f64 / wall.as_secs_f64())
    };
    for &c in &a.concurrency {
        // A fresh scheduler per level: the prefix cache starts empty each time.
        let s = Scheduler::start(m.clone(), ServeConfig { max_seqs: c.max(1), ..ServeConfig::default() });
        let (t, wall) = replay(&s, &prompts, &[], None, &params, c.max(1))?;
        let out_tokens: usize = t.iter().map(|t| t.tokens).sum();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ttft: Vec<f64> = t.iter().map(|t| ms(t.ttft)).collect();
        let tpot: Vec<f64> = t.iter().filter_map(|t| t.tpot).map(ms).collect();
        let e2e: Vec<f64> = t.iter().map(|t| ms(t.e2e)).collect();
        let req_s = t.len() as f64 / wall.as_secs_f64();
        let tok_s = out_tokens as f64 / wall.as_secs_f64();
        let reference = if a.no_reference {
            None
        } else {
            let start = Instant::now();
            let mut n = 0;
            for batch in prompts.chunks(c.max(1)) {
                n += generate(&m.model, &m.tokenizer, batch, &params, &mut |_, _| {})?.iter().map(|g| g.token_ids.len()).sum::<usize>();
            }
            Some(n as f64 / start.elapsed().as_secs_f64())
        };
        let with_adapters = if adapters.is_empty() { None } else { Some(throughput(c.max(1), &adapters, None)?) };
        let anchor = match &a.anchor_url {
            Some(url) => {
                // The same prompts as text: the chat template rendered, special tokens kept.
                let texts: Vec<String> = prompts.iter().map(|p| m.tokenizer.decode(p, false)).collect::<Result<_, _>>()?;
                let (tokens, prompt_tokens, wall) = replay_http(url, &texts, a.max_tokens, c.max(1))?;
                let own: usize = prompts.iter().map(Vec::len).sum();
                if prompt_tokens != own {
                    eprintln!("note: the anchor counted {prompt_tokens} prompt tokens where Lathe has {own}");
                }
                Some(tokens as f64 / wall.as_secs_f64())
            }
            None => None,
        };
        let constrained = if a.json_schema { Some(throughput(c.max(1), &[], Some(&schema))?) } else { None };
        let (tp99, tt99) = (percentile(tpot.clone(), 0.99), percentile(ttft.clone(), 0.99));
        if tp99 <= a.tpot_target_ms as f64 && tt99 <= a.ttft_target_ms as f64 && best_ok.is_none_or(|(_, r)| req_s > r) {
            best_ok = Some((c, req_s));
        }
        if a.json {
            println!("{}", json!({"bench": "serve", "concurrency": c, "requests": t.len(), "req_per_s": req_s, "output_tokens_per_s": tok_s,
                "ttft_ms": {"p50": percentile(ttft.clone(), 0.5), "p99": tt99}, "tpot_ms": {"p50": percentile(tpot.clone(), 0.5), "p99": tp99},
                "e2e_ms": {"p50": percentile(e2e.clone(), 0.5), "p99": percentile(e2e, 0.99)}, "static_batch_tokens_per_s": reference,
                "adapters": a.adapters, "adapters_tokens_per_s": with_adapters, "json_schema_tokens_per_s": constrained, "anchor_tokens_per_s": anchor,
                "prefix_hits": s.metrics().prefix_hits.load(std::sync::atomic::Ordering::Relaxed), "threads": rayon::current_num_threads()}));
        } else {
            println!(
                "{c:>4} {req_s:>8.2} {tok_s:>9.1} {:>9.0} {tt99:>9.0} {:>9.1} {tp99:>9.1} {:>9.0} {:>9.0} {:>10} {:>7}",
                percentile(ttft, 0.5),
                percentile(tpot, 0.5),
                percentile(e2e.clone(), 0.5),
                percentile(e2e, 0.99),
                reference.map_or("-".into(), |r| format!("{r:.1}")),
                reference.map_or("-".into(), |r| format!("{:.2}x", tok_s / r)),
            );
            if let Some(w) = with_adapters {
                println!("     through {} adapters (rank {}): {w:.1} tok/s, {:.2}x the base", a.adapters, a.adapter_rank, w / tok_s);
            }
            if let Some(w) = anchor {
                println!("     the anchor server, same clients: {w:.1} tok/s; Lathe {:.2}x", tok_s / w);
            }
            if let Some(w) = constrained {
                println!("     constrained to the invoice JSON Schema: {w:.1} tok/s, {:.2}x unconstrained", w / tok_s);
            }
        }
    }
    let plan = match best_ok {
        Some((c, r)) => format!(
            "capacity: {r:.2} req/s at {c} streams meets p99 TPOT ≤ {} ms and p99 TTFT ≤ {} ms; plan for {:.2}–{:.2} req/s per replica (60–70 % utilisation)",
            a.tpot_target_ms,
            a.ttft_target_ms,
            0.6 * r,
            0.7 * r
        ),
        None => format!("capacity: no level met p99 TPOT ≤ {} ms and p99 TTFT ≤ {} ms", a.tpot_target_ms, a.ttft_target_ms),
    };
    if a.json {
        println!("{}", json!({"bench": "serve", "plan": plan}));
    } else {
        println!("{plan}");
    }
    Ok(())
}
