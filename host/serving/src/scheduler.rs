//! The continuous-batching loop, on a thread of its own. Each turn it takes new requests,
//! drops those whose client went away, admits waiting ones while the batch has room, and
//! runs one packed step: a token for every decoding sequence, then prompt chunks up to the
//! step's token budget. A sequence leaves the batch the step it finishes; the next waiting
//! one takes its place in the following step.
//!
//! When the KV cache runs out of blocks mid-decode, the most recently admitted sequence is
//! preempted: its blocks are given back and it waits at the head of the queue, to be
//! recomputed (its prompt and what it generated so far) when blocks free up, as vLLM does.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use lathe_engine::generate::{ChainSampler, Continuation, Sampler};
use lathe_engine::model::paged::BLOCK_TOKENS;
use lathe_engine::{Adapter, CausalLm, FinishReason, Generation, KvPool, LoadedModel, SamplingParams, SeqCache, SeqStep, Tokenizer};
use llguidance::Matcher;
use llguidance::toktrie::SimpleVob;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::adapters::{Adapters, InUse};
use crate::grammar::{Grammars, apply_mask};
use crate::metrics::Metrics;
use crate::{AdapterRef, Event, Request, ServeConfig, ServeError, TokenLogprob, Usage};

enum Msg {
    Submit(Box<Seq>),
    Stop,
}

/// A running continuous-batching scheduler over one base model. Dropping it stops the
/// thread after the current step; requests still open get `Failed`.
pub struct Scheduler {
    tx: mpsc::Sender<Msg>,
    model: Arc<LoadedModel>,
    metrics: Arc<Metrics>,
    /// Tokens a request may span (prompt and completion), bounded by the model's context
    /// and by the KV cache.
    max_tokens: usize,
    /// Built at the first request with a JSON schema.
    grammars: OnceLock<Result<Grammars, String>>,
    /// The base model's chat template hash, which an adapter's training must have used.
    template_sha256: String,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    pub fn start(model: Arc<LoadedModel>, config: ServeConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let metrics = Arc::new(Metrics::default());
        let max_tokens = max_request_tokens(&model.model, &config);
        let template_sha256 = crate::template_sha256(&model.tokenizer);
        let (held, m) = (model.clone(), metrics.clone());
        let thread = std::thread::Builder::new()
            .name("lathe-scheduler".into())
            .spawn(move || Loop::new(&held.model, &held.tokenizer, config, m).run(rx))
            .expect("spawning the scheduler thread");
        Self {
            tx,
            model,
            metrics,
            max_tokens,
            grammars: OnceLock::new(),
            template_sha256,
            thread: Some(thread),
        }
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The longest prompt plus completion a request may ask for.
    pub fn max_request_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Queues a request; its events arrive on the returned stream. Drop the stream to
    /// cancel. A request that can never run is refused here, with the reason; its JSON
    /// schema is compiled here too (on the caller's thread, not the scheduler's).
    pub fn submit(&self, request: Request) -> Result<UnboundedReceiver<Event>, ServeError> {
        let arrived = Instant::now();
        check(&request, &self.model.model, self.max_tokens)?;
        if let Some(a) = &request.adapter {
            check_template(a, &self.template_sha256)?;
        }
        let matcher = match &request.json_schema {
            Some(schema) => Some(self.grammars()?.matcher(schema).map_err(ServeError::Schema)?),
            None => None,
        };
        let (tx, rx) = unbounded_channel();
        let mut seq = Seq::new(request, tx, arrived);
        seq.matcher = matcher;
        self.tx.send(Msg::Submit(Box::new(seq))).map_err(|_| ServeError::Stopped)?;
        Ok(rx)
    }

    /// The model's vocabulary as the grammar engine sees it, built on first use.
    pub fn grammars(&self) -> Result<&Grammars, ServeError> {
        self.grammars
            .get_or_init(|| Grammars::new(&self.model.tokenizer, self.model.model.config.vocab_size))
            .as_ref()
            .map_err(|e| ServeError::Schema(e.clone()))
    }
}

/// The longest prompt plus completion one request may span: the model's context, or less
/// when the KV cache holds less.
fn max_request_tokens(model: &CausalLm, config: &ServeConfig) -> usize {
    let blocks = config.kv_cache_bytes / KvPool::block_bytes(&model.config);
    model.config.max_position_embeddings.min(blocks * BLOCK_TOKENS)
}

/// Refuses a request that can never run, with the reason.
fn check(request: &Request, model: &CausalLm, max_tokens: usize) -> Result<(), ServeError> {
    request.params.validate().map_err(|e| ServeError::Invalid(e.to_string()))?;
    if request.prompt.is_empty() {
        return Err(ServeError::Invalid("the prompt is empty".into()));
    }
    let vocab = model.config.vocab_size;
    if let Some(t) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ServeError::Invalid(format!("token {t} is outside the vocabulary of {vocab}")));
    }
    let total = request.prompt.len() + request.params.max_tokens;
    if total > max_tokens {
        return Err(ServeError::Invalid(format!(
            "this model's maximum context length is {max_tokens} tokens, but {total} were requested ({} in the prompt, {} for the completion)",
            request.prompt.len(),
            request.params.max_tokens
        )));
    }
    Ok(())
}

/// Refuses an adapter whose training recorded another chat template than the base's
/// (adapters without a record, such as imported PEFT folders, are served).
fn check_template(adapter: &AdapterRef, base_sha256: &str) -> Result<(), ServeError> {
    let path = adapter.dir.join("run.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let run: serde_json::Value = serde_json::from_str(&text).map_err(|e| ServeError::Invalid(format!("{}: {e}", path.display())))?;
    match run["tokenizer_template_sha256"].as_str() {
        Some(trained) if trained != base_sha256 => Err(ServeError::Invalid(format!(
            "adapter `{}` was trained with the chat template {}, but this base model's template is {}: it would see prompts laid out otherwise than in training; serve it over the base it was trained on",
            adapter.key,
            &trained[..trained.len().min(12)],
            &base_sha256[..base_sha256.len().min(12)]
        ))),
        _ => Ok(()),
    }
}

/// Runs `prompts` to completion on the calling thread, through the same loop the
/// scheduler runs (continuous batching, the paged cache, prefix sharing), with at most
/// `config.max_seqs` at once: evaluation's generation. `on_done(i)` is called as prompt
/// `i` finishes; `cancelled` is asked before every step.
#[allow(clippy::too_many_arguments)]
pub fn generate_all(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    config: &ServeConfig,
    on_done: &mut dyn FnMut(usize),
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Generation>, ServeError> {
    let mut lp = Loop::new(model, tokenizer, config.clone(), Arc::new(Metrics::default()));
    run_all(&mut lp, adapter, prompts, params, on_done, cancelled)
}

/// [`generate_all`] on a loop the caller made.
fn run_all(lp: &mut Loop<'_>, adapter: Option<&Adapter>, prompts: &[Vec<u32>], params: &SamplingParams, on_done: &mut dyn FnMut(usize), cancelled: &dyn Fn() -> bool) -> Result<Vec<Generation>, ServeError> {
    let model = lp.model;
    let max_tokens = max_request_tokens(model, &lp.config);
    // The adapter is already loaded: it goes with each sequence, outside the LRU.
    let adapter = adapter.map(|a| InUse { key: String::new(), adapter: Arc::new(a.clone()), salt: 1 });
    let mut streams = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let request = Request { prompt: p.clone(), params: SamplingParams { seed: params.seed.wrapping_add(i as u64), ..params.clone() }, adapter: None, logprobs: None, json_schema: None };
        check(&request, model, max_tokens).map_err(|e| ServeError::Invalid(format!("prompt {i}: {e}")))?;
        let (tx, rx) = unbounded_channel();
        let mut seq = Seq::new(request, tx, Instant::now());
        seq.adapter = adapter.clone();
        lp.waiting.push_back(seq);
        streams.push(rx);
    }
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
    while !(lp.running.is_empty() && lp.waiting.is_empty()) {
        if cancelled() {
            return Err(ServeError::Cancelled);
        }
        lp.admit();
        lp.step();
        for (i, rx) in streams.iter_mut().enumerate() {
            while let Ok(event) = rx.try_recv() {
                match event {
                    Event::Token { id, .. } => ids[i].push(id),
                    Event::Done { finish, text, usage } => {
                        out[i] = Some(Generation { prompt_tokens: usage.prompt_tokens, token_ids: std::mem::take(&mut ids[i]), text, finish_reason: finish });
                        on_done(i);
                    }
                    Event::Failed(e) => return Err(ServeError::Invalid(format!("prompt {i}: {e}"))),
                }
            }
        }
    }
    Ok(out.into_iter().map(|g| g.expect("every sequence ends with Done")).collect())
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Seq {
    tx: UnboundedSender<Event>,
    request: Request,
    adapter: Option<InUse>,
    /// Prompt, then every generated token: what the cache must hold before the next sample.
    tokens: Vec<u32>,
    cache: SeqCache,
    out: Continuation,
    sampler: ChainSampler,
    arrived: Instant,
    last_token: Option<Instant>,
    cached_tokens: usize,
    /// Admission order: the latest is preempted first.
    admitted: u64,
    /// Tokens this step computes.
    planned: usize,
    /// The grammar a JSON-schema request's output must follow, at the output so far.
    matcher: Option<Matcher>,
    /// The tokens the grammar allows next, computed while this step's forward pass runs.
    mask: Option<Result<SimpleVob, String>>,
}

impl Seq {
    fn new(request: Request, tx: UnboundedSender<Event>, arrived: Instant) -> Self {
        Self {
            tx,
            tokens: request.prompt.clone(),
            sampler: ChainSampler::new(request.params.clone(), request.params.seed),
            request,
            adapter: None,
            cache: SeqCache::default(),
            out: Continuation::default(),
            arrived,
            last_token: None,
            cached_tokens: 0,
            admitted: 0,
            planned: 0,
            matcher: None,
            mask: None,
        }
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    /// Takes the blocks the prefix cache holds of this sequence's tokens; a first run (not
    /// a recompute after preemption) counts them in its usage and the metrics.
    fn attach_cached(&mut self, pool: &mut KvPool, metrics: &Metrics) {
        let before = self.cache.len();
        let cached = self.cache.attach_prefix(pool, &self.tokens) - before;
        if self.out.generated.is_empty() {
            self.cached_tokens += cached;
            metrics.prefix_hits.fetch_add(cached as u64, Ordering::Relaxed);
        }
    }

    fn salt(&self) -> u64 {
        self.adapter.as_ref().map_or(0, |a| a.salt)
    }
}

struct Loop<'m> {
    model: &'m CausalLm,
    tokenizer: &'m Tokenizer,
    config: ServeConfig,
    pool: KvPool,
    adapters: Adapters,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    admitted: u64,
}

impl<'m> Loop<'m> {
    fn new(model: &'m CausalLm, tokenizer: &'m Tokenizer, config: ServeConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            model,
            tokenizer,
            pool: KvPool::with_bytes(&model.config, config.kv_cache_bytes),
            adapters: Adapters::new(config.max_loras),
            config,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
            admitted: 0,
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                let open = rx.recv().is_ok_and(|msg| self.take(msg));
                if !open {
                    return self.shutdown();
                }
            }
            while let Ok(msg) = rx.try_recv() {
                if !self.take(msg) {
                    return self.shutdown();
                }
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.publish();
        }
    }

    /// False on `Stop`.
    fn take(&mut self, msg: Msg) -> bool {
        let Msg::Submit(seq) = msg else { return false };
        self.waiting.push_back(*seq);
        true
    }

    fn shutdown(&mut self) {
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = s.tx.send(Event::Failed("the server is shutting down".into()));
        }
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].tx.is_closed() {
                let s = self.running.swap_remove(i);
                self.metrics.finished_abort.fetch_add(1, Ordering::Relaxed);
                self.leave(s);
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.tx.is_closed());
        self.metrics.finished_abort.fetch_add((before - self.waiting.len()) as u64, Ordering::Relaxed);
    }

    /// Gives back a leaving sequence's blocks and adapter.
    fn leave(&mut self, mut s: Seq) {
        s.cache.release(&mut self.pool);
        if let Some(a) = s.adapter.take() {
            self.adapters.release(&a.key);
        }
    }

    fn admit(&mut self) {
        let (config, device) = (&self.model.config, self.model.device());
        while self.running.len() < self.config.max_seqs {
            let Some(s) = self.waiting.front_mut() else { break };
            if s.adapter.is_none()
                && let Some(r) = &s.request.adapter
            {
                match self.adapters.acquire(r, config, device) {
                    Ok(Some(a)) => s.adapter = Some(a),
                    // Every held adapter is in use: wait for one to go idle.
                    Ok(None) => break,
                    Err(e) => {
                        let s = self.waiting.pop_front().expect("front exists");
                        let _ = s.tx.send(Event::Failed(e));
                        continue;
                    }
                }
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            s.cache = SeqCache::new(s.salt());
            if s.out.generated.is_empty() {
                s.cached_tokens = 0;
                self.metrics.prefix_queries.fetch_add(s.tokens.len() as u64, Ordering::Relaxed);
            }
            s.attach_cached(&mut self.pool, &self.metrics);
            self.admitted += 1;
            s.admitted = self.admitted;
            self.running.push(s);
        }
    }

    /// Plans and runs one packed step, then samples for every sequence it completed.
    fn step(&mut self) {
        // Rows through the same adapter next to each other (stable: admission order kept).
        self.running.sort_by_key(Seq::salt);
        let mut budget = self.config.max_step_tokens.max(1);
        // Blocks the prompts planned so far fill this step: a prompt that would fill one of
        // them too (prompts admitted together behind one system prompt) waits a step and
        // then takes the first one's from the prefix cache instead of computing it again.
        let mut filling = std::collections::HashSet::new();
        // Decoding sequences first: one token each keeps every stream moving.
        for decode in [true, false] {
            let mut i = 0;
            while i < self.running.len() {
                let s = &self.running[i];
                if (s.pending() == 1) != decode || s.planned > 0 || budget == 0 {
                    i += 1;
                    continue;
                }
                if !decode {
                    let s = &mut self.running[i];
                    s.attach_cached(&mut self.pool, &self.metrics);
                    let fills = s.cache.blocks_filled_by(&s.tokens, s.pending().min(budget));
                    if fills.iter().any(|h| filling.contains(h)) {
                        i += 1;
                        continue;
                    }
                    filling.extend(fills);
                }
                let s = &self.running[i];
                let n = s.pending().min(budget);
                if self.running[i].cache.reserve(&mut self.pool, n) {
                    self.running[i].planned = n;
                    budget -= n;
                    i += 1;
                } else if decode {
                    // Out of blocks: preempt the latest admitted (possibly this one).
                    let latest = (0..self.running.len()).max_by_key(|&j| self.running[j].admitted).expect("nonempty");
                    self.preempt(latest);
                    if latest < i {
                        i -= 1;
                    }
                } else {
                    // A prompt waits for blocks rather than evicting a stream.
                    i += 1;
                }
            }
        }
        if self.running.iter().all(|s| s.planned == 0) {
            return;
        }
        let mut rows: Vec<SeqStep<'_>> = Vec::new();
        // Grammar masks for the rows that sample this step.
        let mut masks: Vec<(&mut Matcher, &mut Option<Result<SimpleVob, String>>)> = Vec::new();
        for s in self.running.iter_mut().filter(|s| s.planned > 0) {
            let start = s.cache.len();
            let samples = s.planned == s.pending();
            rows.push(SeqStep {
                tokens: &s.tokens[start..start + s.planned],
                cache: &mut s.cache,
                adapter: s.adapter.as_ref().map(|a| &*a.adapter),
                prompt_len: s.request.prompt.len(),
            });
            if let (true, Some(m)) = (samples, s.matcher.as_mut()) {
                masks.push((m, &mut s.mask));
            }
        }
        let (model, pool) = (self.model, &mut self.pool);
        let mut forward = move || model.forward_paged(&mut rows, pool);
        let logits = if masks.is_empty() {
            forward()
        } else {
            // The masks depend only on the tokens sampled so far: they are computed beside
            // the forward pass, not after it.
            std::thread::scope(|scope| {
                scope.spawn(move || {
                    for (m, slot) in masks {
                        *slot = Some(m.compute_mask_or_eos().map_err(|e| e.to_string()));
                    }
                });
                forward()
            })
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                // An engine error fails this step's requests, not the server.
                for i in (0..self.running.len()).rev() {
                    if self.running[i].planned > 0 {
                        let s = self.running.swap_remove(i);
                        let _ = s.tx.send(Event::Failed(format!("generation failed: {e}")));
                        self.leave(s);
                    }
                }
                return;
            }
        };
        let vocab = self.model.config.vocab_size;
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            if s.planned == 0 {
                continue;
            }
            let planned = std::mem::take(&mut s.planned);
            let l = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            if s.out.generated.is_empty() {
                self.metrics.prompt_tokens.fetch_add(planned as u64, Ordering::Relaxed);
            }
            if s.pending() > 0 {
                continue; // a prompt chunk: more of it next step
            }
            if sample(s, l, self.tokenizer, &self.metrics) {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let s = self.running.swap_remove(i);
            self.leave(s);
        }
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.swap_remove(i);
        s.cache.release(&mut self.pool);
        s.planned = 0;
        self.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
        // Keeps its adapter: it is first in line to run again.
        self.waiting.push_front(s);
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.running.store(self.running.len() as u64, Ordering::Relaxed);
        m.waiting.store(self.waiting.len() as u64, Ordering::Relaxed);
        m.loras_held.store(self.adapters.held() as u64, Ordering::Relaxed);
        m.lora_loads.store(self.adapters.loads, Ordering::Relaxed);
        let used = self.pool.capacity() - self.pool.available();
        m.kv_usage_permille.store((used * 1000 / self.pool.capacity().max(1)) as u64, Ordering::Relaxed);
    }
}

/// Samples the next token of `s` from its logits (within its grammar's mask, if it has one)
/// and streams it; true when `s` is done.
fn sample(s: &mut Seq, logits: &[f32], tokenizer: &Tokenizer, metrics: &Metrics) -> bool {
    let now = Instant::now();
    let mut l = logits.to_vec();
    if let Some(mask) = s.mask.take() {
        let fault = match mask {
            Ok(allowed) if apply_mask(&mut l, &allowed) => None,
            Ok(_) => Some("the JSON schema allows no token at this point".to_string()),
            Err(e) => Some(format!("the JSON schema's grammar failed: {e}")),
        };
        if let Some(fault) = fault {
            let _ = s.tx.send(Event::Failed(fault));
            return true;
        }
    }
    let t = s.sampler.sample(&mut l, &s.tokens);
    if let Some(m) = &mut s.matcher
        && !tokenizer.stop_ids.contains(&t)
        && let Err(e) = m.consume_token(t)
    {
        let _ = s.tx.send(Event::Failed(format!("the JSON schema's grammar refused token {t}: {e}")));
        return true;
    }
    let logprob = s.request.logprobs.map(|k| logprobs(logits, k, t));
    let before = s.out.generated.len();
    let text = match s.out.push(t, tokenizer, &s.request.params) {
        Ok(text) => text.to_string(),
        Err(e) => {
            let _ = s.tx.send(Event::Failed(format!("decoding the output failed: {e}")));
            return true;
        }
    };
    match s.last_token {
        None => metrics.time_to_first_token(now.duration_since(s.arrived).as_secs_f64()),
        Some(prev) => metrics.inter_token_latency(now.duration_since(prev).as_secs_f64()),
    }
    s.last_token = Some(now);
    metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
    s.tokens.push(t);
    // The end-of-sequence token ends the stream without being part of it.
    if s.out.generated.len() > before || !text.is_empty() {
        let _ = s.tx.send(Event::Token { id: t, text, logprob });
    }
    let Some(finish) = s.out.finish else { return false };
    metrics.e2e_latency(now.duration_since(s.arrived).as_secs_f64());
    match finish {
        FinishReason::Stop => &metrics.finished_stop,
        FinishReason::Length => &metrics.finished_length,
    }
    .fetch_add(1, Ordering::Relaxed);
    let usage = Usage {
        prompt_tokens: s.request.prompt.len(),
        completion_tokens: s.out.generated.len(),
        cached_tokens: s.cached_tokens,
    };
    let _ = s.tx.send(Event::Done {
        finish,
        text: s.out.text.clone(),
        usage,
    });
    true
}

/// The chosen token's log-probability under `logits` (before the sampler touched them), with
/// the `k` most likely tokens.
fn logprobs(logits: &[f32], k: usize, chosen: u32) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    }
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let top: Vec<(u32, f32)> = idx.into_iter().map(|t| (t, logits[t as usize] - lse)).collect();
    TokenLogprob {
        token: chosen,
        logprob: logits[chosen as usize] - lse,
        top,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use lathe_engine::config::Architecture;

    use super::*;

    /// Evaluation hands the loop all its prompts at once, and they share the suite's system
    /// prompt: its full blocks are computed by the first and taken from the cache by the
    /// others, not computed by each in the same step.
    #[test]
    fn prompts_admitted_together_compute_their_shared_prefix_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = lathe_engine::tiny::write_tiny(dir.path(), Architecture::Llama, 21).unwrap();
        let model = lathe_engine::load(&t.gguf, &lathe_engine::Device::flex()).unwrap();
        let shared: Vec<u32> = (0..3 * BLOCK_TOKENS as u32 + 5).map(|i| 3 + i * 37 % 240).collect();
        let prompts: Vec<Vec<u32>> = (0..4u32).map(|k| shared.iter().copied().chain((0..6 + k).map(|i| 3 + (i * 11 + k * 29) % 240)).collect()).collect();
        let params = SamplingParams { max_tokens: 4, ignore_eos: true, ..SamplingParams::default() };
        let config = ServeConfig { max_seqs: 4, ..ServeConfig::default() };
        let run = |prompts: &[Vec<u32>]| {
            let metrics = Arc::new(Metrics::default());
            let mut lp = Loop::new(&model.model, &model.tokenizer, config.clone(), metrics.clone());
            (run_all(&mut lp, None, prompts, &params, &mut |_| {}, &|| false).unwrap(), metrics)
        };
        let (together, metrics) = run(&prompts);
        let shared_blocks = 3 * BLOCK_TOKENS;
        assert_eq!(metrics.prefix_hits.load(Relaxed), 3 * shared_blocks as u64, "three prompts take the first one's blocks");
        let total: usize = prompts.iter().map(Vec::len).sum();
        assert_eq!(metrics.prompt_tokens.load(Relaxed), (total - 3 * shared_blocks) as u64, "prompt tokens computed");
        for (p, g) in prompts.iter().zip(&together) {
            assert_eq!(g.token_ids, run(std::slice::from_ref(p)).0[0].token_ids, "a prompt's answer is its answer alone");
        }
    }
}
