//! The same model on two devices: do they compute the same thing? Used to prove a GPU build
//! (`lathe bench parity --device cuda`) before any of its speed figures mean anything.

use crate::generate::{generate, logits_to_host};
use crate::{CausalLm, KvCache, Logits, SamplingParams, Step, Tokenizer};
use crate::error::Result;

/// What one model computed on the CPU and on another device, for the same tokens.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Parity {
    pub positions: usize,
    /// Largest |CPU logit − device logit| over every position and vocabulary entry.
    pub max_abs_logit_diff: f32,
    /// Largest |CPU logit|, the scale `max_abs_logit_diff` is read against.
    pub max_abs_logit: f32,
    /// Positions whose most likely next token is the same on both devices.
    pub argmax_agreement: f64,
    /// Greedy continuations of the prompt on each device.
    pub greedy_cpu: Vec<u32>,
    pub greedy_device: Vec<u32>,
}

impl Parity {
    /// The device agrees with the CPU: greedy decoding yields the same tokens and no logit
    /// moves by more than `tolerance` of the largest one.
    pub fn holds(&self, tolerance: f32) -> bool {
        self.greedy_cpu == self.greedy_device && self.max_abs_logit_diff <= tolerance * self.max_abs_logit
    }
}

/// Runs `tokens` through `cpu` and `other` (the same weights loaded on two devices): full
/// forward logits at every position, then `new_tokens` of greedy decoding from the prompt.
pub fn compare(cpu: &CausalLm, other: &CausalLm, tokenizer: &Tokenizer, tokens: &[u32], new_tokens: usize) -> Result<Parity> {
    let logits = |m: &CausalLm| {
        let mut cache = KvCache::new(m.config.num_layers);
        logits_to_host(m.forward(&Step::single(tokens, 0), &mut cache, Logits::All))
    };
    let (want, got) = (logits(cpu)?, logits(other)?);
    let vocab = cpu.config.vocab_size;
    let argmax = |row: &[f32]| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
    let agree = want.chunks(vocab).zip(got.chunks(vocab)).filter(|(a, b)| argmax(a) == argmax(b)).count();
    let params = SamplingParams {
        max_tokens: new_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let greedy = |m: &CausalLm| -> Result<Vec<u32>> {
        Ok(generate(m, tokenizer, &[tokens.to_vec()], &params, &mut |_, _| {})?.remove(0).token_ids)
    };
    Ok(Parity {
        positions: tokens.len(),
        max_abs_logit_diff: want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs())),
        max_abs_logit: want.iter().fold(0f32, |m, a| m.max(a.abs())),
        argmax_agreement: agree as f64 / tokens.len() as f64,
        greedy_cpu: greedy(cpu)?,
        greedy_device: greedy(other)?,
    })
}
