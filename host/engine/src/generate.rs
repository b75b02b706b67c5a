//! Batched generation: on the CPU each prompt fills its own blocks of a paged cache (see
//! `model::paged`); elsewhere left-padded prompts share one KV cache. Each row samples on
//! its own seeded RNG, so a prompt gives the same tokens alone or in a batch.

use burn::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::lora::Adapter;
use crate::model::paged::{BLOCK_TOKENS, KvPool, SeqCache, SeqStep};
use crate::model::{CausalLm, KvCache, Logits, Step};
use crate::tokenizer::Tokenizer;

/// How to pick tokens and when to stop. The defaults are greedy decoding up to 256 tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// Hugging Face's (CTRL) repetition penalty; 1.0 disables it.
    pub repetition_penalty: f32,
    pub seed: u64,
    pub max_tokens: usize,
    /// Generation ends before any of these strings; the string is not returned.
    pub stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Generation(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad(format!("top_p must be in (0, 1], got {p}"));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be ≥ 1".into());
        }
        // NaN is refused too.
        if self.repetition_penalty.is_nan() || self.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Generated ids (without the EOS token that ended them).
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Picks the next token from a row of logits.
pub trait Sampler {
    fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32;
}

/// The standard chain: repetition penalty, temperature, top-k, top-p, then a draw.
pub struct ChainSampler {
    params: SamplingParams,
    rng: StdRng,
}

impl ChainSampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler for ChainSampler {
    fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = p.top_k {
            cand.truncate(k.max(1));
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if let Some(top_p) = p.top_p {
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    cum += x;
                    cum >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= total);
        }
        let mut r: f32 = self.rng.random();
        for (i, &x) in probs.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Where generated text goes as it is produced: `(row, new text)`.
pub type OnText<'a> = &'a mut dyn FnMut(usize, &str);

/// One sequence's generated tokens and text, fed a token at a time: it ends the sequence
/// on an end-of-sequence token, a stop string or `max_tokens`, and tells what text is
/// certain enough to stream (no partial UTF-8 character, no possible stop-string prefix).
/// Batched generation here and the serving scheduler both use it.
#[derive(Debug, Clone, Default)]
pub struct Continuation {
    pub generated: Vec<u32>,
    pub text: String,
    emitted: usize,
    pub finish: Option<FinishReason>,
}

impl Continuation {
    /// Adds a sampled token; returns the text that may now be streamed (possibly empty).
    pub fn push(&mut self, token: u32, tokenizer: &Tokenizer, params: &SamplingParams) -> Result<&str> {
        debug_assert!(self.finish.is_none(), "a finished continuation takes no tokens");
        if !params.ignore_eos && tokenizer.stop_ids.contains(&token) {
            self.finish = Some(FinishReason::Stop);
        } else {
            self.generated.push(token);
            self.text = tokenizer.decode(&self.generated, true)?;
            if let Some(cut) = params.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
                self.text.truncate(cut);
                self.finish = Some(FinishReason::Stop);
            } else if self.generated.len() >= params.max_tokens {
                self.finish = Some(FinishReason::Length);
            }
        }
        let end = if self.finish.is_some() {
            self.text.len()
        } else if self.text.ends_with('\u{FFFD}') {
            self.emitted
        } else {
            self.text.len() - held_back(&self.text, &params.stop)
        };
        let start = self.emitted.min(end);
        self.emitted = end.max(self.emitted);
        Ok(&self.text[start..end])
    }

    pub fn finished(&self) -> bool {
        self.finish.is_some()
    }
}

struct Row {
    prompt: Vec<u32>,
    out: Continuation,
    sampler: ChainSampler,
}

/// Longest suffix of `text` that is a proper prefix of some stop string: held back from
/// streaming until it is known not to start a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut held = 0;
    for s in stops {
        for (k, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..k]) {
                held = held.max(k);
            }
        }
    }
    held
}

/// Generates a continuation for each prompt (token ids), in one batch.
pub fn generate(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    on_text: OnText<'_>,
) -> Result<Vec<Generation>> {
    generate_with(model, None, tokenizer, prompts, params, on_text)
}

/// [`generate`] through a LoRA adapter.
pub fn generate_with(
    model: &CausalLm,
    adapter: Option<&Adapter>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    on_text: OnText<'_>,
) -> Result<Vec<Generation>> {
    params.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(EngineError::Generation(format!("prompt {i} is empty")));
    }
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = model.config.max_position_embeddings;
    if longest + params.max_tokens > limit {
        return Err(EngineError::Generation(format!(
            "prompt of {longest} tokens + max_tokens {} exceeds the model's context of {limit}",
            params.max_tokens
        )));
    }
    let pad = tokenizer.pad_token_id.or(tokenizer.eos_token.as_ref().map(|t| t.1)).unwrap_or(0);
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Row {
            prompt: p.clone(),
            out: Continuation::default(),
            sampler: ChainSampler::new(params.clone(), params.seed.wrapping_add(i as u64)),
        })
        .collect();

    let mut batch = if model.on_host() {
        Batch::paged(model, prompts, params.max_tokens)
    } else {
        Batch::Padded(KvCache::new(model.config.num_layers))
    };
    let vocab = model.config.vocab_size;
    let mut logits = batch.prefill(model, adapter, prompts, pad)?;
    for _ in 0..params.max_tokens {
        let mut next = Vec::with_capacity(b);
        for (r, row) in rows.iter_mut().enumerate() {
            if row.out.finished() {
                next.push(pad);
                continue;
            }
            let mut l = logits[r * vocab..(r + 1) * vocab].to_vec();
            let history: Vec<u32> = row.prompt.iter().chain(&row.out.generated).copied().collect();
            let t = row.sampler.sample(&mut l, &history);
            next.push(t);
            let text = row.out.push(t, tokenizer, params)?;
            if !text.is_empty() {
                on_text(r, text);
            }
        }
        if rows.iter().all(|r| r.out.finished()) {
            break;
        }
        let live: Vec<bool> = rows.iter().map(|r| !r.out.finished()).collect();
        let positions: Vec<i64> = rows.iter().map(|r| (r.prompt.len() + r.out.generated.len()) as i64 - 1).collect();
        logits = batch.decode(model, adapter, next, positions, &live)?;
    }
    Ok(rows
        .into_iter()
        .map(|r| Generation {
            prompt_tokens: r.prompt.len(),
            token_ids: r.out.generated,
            text: r.out.text,
            finish_reason: r.out.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}

/// Where a batch's keys and values live while it generates (one per generation call, so
/// the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Batch {
    /// On the model's device: prompts left-padded to one length, a cache that grows by
    /// concatenation.
    Padded(KvCache),
    /// On the host (CPU models): each row its own blocks, written in place, and the step
    /// on host buffers ([`CausalLm::forward_paged`]); no padding.
    Paged { pool: KvPool, caches: Vec<SeqCache>, prompt_lens: Vec<usize> },
}

impl Batch {
    fn paged(model: &CausalLm, prompts: &[Vec<u32>], max_tokens: usize) -> Self {
        let blocks = prompts.iter().map(|p| (p.len() + max_tokens).div_ceil(BLOCK_TOKENS)).sum();
        Batch::Paged {
            pool: KvPool::new(&model.config, blocks),
            caches: prompts.iter().map(|_| SeqCache::new(0)).collect(),
            prompt_lens: prompts.iter().map(Vec::len).collect(),
        }
    }

    /// Every prompt at once; the logits of each one's last token, `[rows, vocab]`.
    fn prefill(&mut self, model: &CausalLm, adapter: Option<&Adapter>, prompts: &[Vec<u32>], pad: u32) -> Result<Vec<f32>> {
        match self {
            Batch::Padded(cache) => {
                let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
                let mut step = Step {
                    batch: prompts.len(),
                    seq: longest,
                    tokens: Vec::with_capacity(prompts.len() * longest),
                    positions: Vec::with_capacity(prompts.len() * longest),
                    valid: Vec::with_capacity(prompts.len() * longest),
                };
                for p in prompts {
                    let padding = longest - p.len();
                    step.tokens.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
                    step.positions.extend(std::iter::repeat_n(0, padding).chain(0..p.len() as i64));
                    step.valid.extend(std::iter::repeat_n(false, padding).chain(std::iter::repeat_n(true, p.len())));
                }
                logits_to_host(model.forward_with(&step, cache, Logits::Last, adapter))
            }
            Batch::Paged { pool, caches, prompt_lens } => {
                let live = vec![true; prompts.len()];
                Self::paged_step(model, adapter, pool, caches, prompt_lens, prompts.iter().map(Vec::as_slice).collect(), &live, model.config.vocab_size)
            }
        }
    }

    /// One token for each row (finished rows get `next` but are not `live`); the logits of
    /// the live rows, `[rows, vocab]` (a finished row's are left zero).
    fn decode(&mut self, model: &CausalLm, adapter: Option<&Adapter>, next: Vec<u32>, positions: Vec<i64>, live: &[bool]) -> Result<Vec<f32>> {
        match self {
            Batch::Padded(cache) => {
                let step = Step {
                    batch: next.len(),
                    seq: 1,
                    positions,
                    valid: live.to_vec(),
                    tokens: next,
                };
                logits_to_host(model.forward_with(&step, cache, Logits::Last, adapter))
            }
            Batch::Paged { pool, caches, prompt_lens } => {
                let tokens: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
                Self::paged_step(model, adapter, pool, caches, prompt_lens, tokens, live, model.config.vocab_size)
            }
        }
    }

    /// The live rows' `tokens` as one packed step.
    #[allow(clippy::too_many_arguments)]
    fn paged_step(model: &CausalLm, adapter: Option<&Adapter>, pool: &mut KvPool, caches: &mut [SeqCache], prompt_lens: &[usize], tokens: Vec<&[u32]>, live: &[bool], vocab: usize) -> Result<Vec<f32>> {
        let mut steps = Vec::new();
        for (((cache, t), &l), &prompt_len) in caches.iter_mut().zip(&tokens).zip(live).zip(prompt_lens) {
            if l {
                assert!(cache.reserve(pool, t.len()), "the pool holds every row's prompt and budget");
                steps.push(SeqStep { tokens: t, cache, adapter, prompt_len });
            }
        }
        let got = model.forward_paged(&mut steps, pool)?;
        let mut logits = vec![0f32; live.len() * vocab];
        let mut rows = got.chunks_exact(vocab);
        for (r, _) in live.iter().enumerate().filter(|(_, l)| **l) {
            logits[r * vocab..(r + 1) * vocab].copy_from_slice(rows.next().expect("logits for every live row"));
        }
        Ok(logits)
    }
}

/// Logits of a `[batch, 1, vocab]` tensor, row-major on the host.
pub fn logits_to_host(logits: Tensor<3>) -> Result<Vec<f32>> {
    logits
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| EngineError::Generation(format!("reading logits: {e:?}")))
}

/// The log-probability of `continuation` following `prompt` (summed over its tokens), for
/// scoring choices by likelihood.
pub fn continuation_logprob(model: &CausalLm, adapter: Option<&Adapter>, prompt: &[u32], continuation: &[u32]) -> f64 {
    if prompt.is_empty() || continuation.is_empty() {
        return 0.0;
    }
    let mut tokens = prompt.to_vec();
    tokens.extend_from_slice(continuation);
    let logits = model.forward_with(&Step::single(&tokens, 0), &mut KvCache::default(), Logits::All, adapter);
    let v = model.config.vocab_size;
    let lp = burn::tensor::activation::log_softmax(logits.reshape([tokens.len(), v]), 1);
    let host = lp.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 logits");
    continuation
        .iter()
        .enumerate()
        .map(|(k, &t)| f64::from(host[(prompt.len() + k - 1) * v + t as usize]))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_ignores_the_rng_and_penalty_pushes_away() {
        let mut s = ChainSampler::new(SamplingParams::default(), 1);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[]), 1);
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = ChainSampler::new(params, 1);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        let mut s = ChainSampler::new(params, 7);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5, 0.9], &[]), 1);
        }
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = ChainSampler::new(params.clone(), seed);
            (0..32).map(|_| s.sample(&mut [0.0; 8], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities ≈ [0.84, 0.11, 0.04, 0.01]: top_p 0.8 keeps only the first.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.8),
            ..Default::default()
        };
        let mut s = ChainSampler::new(params, 11);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 1.0, -0.5], &[]), 0);
        }
    }

    #[test]
    fn stop_prefixes_are_held_back() {
        let stops = vec!["###".to_string()];
        assert_eq!(held_back("answer #", &stops), 1);
        assert_eq!(held_back("answer ##", &stops), 2);
        assert_eq!(held_back("answer", &stops), 0);
    }
}
