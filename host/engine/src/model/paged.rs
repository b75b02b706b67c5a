//! Paged attention for serving: the key/value cache lives on the host in fixed-size
//! blocks that sequences own or share, and one forward pass runs a packed batch of
//! sequences at different points — a new prompt next to other rows' single decode tokens —
//! each through its own adapter.
//!
//! Blocks are written in place; nothing is concatenated or copied as a sequence grows.
//! A full block is registered under a hash of every token up to its end (and the
//! adapter), so a later prompt that starts the same way (a shared system prompt, a
//! few-shot block) reuses it instead of computing it again: prefix caching as vLLM does
//! it. Blocks no sequence holds stay cached until the pool needs them (least recently
//! used first).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::ops::Range;

use super::{CausalLm, Linear, Lora, LoraGroup, Step};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::lora::{Adapter, Target};
use crate::quant::{exp, hmax, hsum};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// Identifies a full block by its tokens and every token before them.
type BlockHash = u128;

/// The key/value blocks of every layer, and which sequences hold them.
#[derive(Debug)]
pub struct KvPool {
    kv_heads: usize,
    head_dim: usize,
    /// Per layer: keys `[block][kv_head][head_dim][BLOCK_TOKENS]` (a dimension's 16 slots
    /// side by side, so a query's scores against a block are 16 lanes), values
    /// `[block][kv_head][BLOCK_TOKENS][head_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    /// Blocks holding nothing worth keeping.
    free: Vec<u32>,
    /// Full blocks by hash, held or idle.
    cached: HashMap<BlockHash, u32>,
    /// Idle cached blocks (no holder), by when they were last released.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
    hits: u64,
}

impl KvPool {
    /// Bytes one block takes across all layers.
    pub fn block_bytes(config: &ModelConfig) -> usize {
        2 * config.num_layers * config.num_kv_heads * BLOCK_TOKENS * config.head_dim * 4
    }

    /// A pool of `blocks` blocks for `config`'s model.
    pub fn new(config: &ModelConfig, blocks: usize) -> Self {
        let per_layer = blocks * config.num_kv_heads * BLOCK_TOKENS * config.head_dim;
        Self {
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            k: (0..config.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..config.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            refs: vec![0; blocks],
            hash: vec![None; blocks],
            free: (0..blocks as u32).rev().collect(),
            cached: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![0; blocks],
            clock: 0,
            hits: 0,
        }
    }

    /// A pool that fits in `bytes`.
    pub fn with_bytes(config: &ModelConfig, bytes: usize) -> Self {
        Self::new(config, bytes / Self::block_bytes(config))
    }

    pub fn capacity(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a sequence could take now: free ones and idle cached ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks served from the prefix cache so far.
    pub fn prefix_hits(&self) -> u64 {
        self.hits
    }

    fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                let h = self.hash[b as usize].take().expect("idle blocks are cached");
                self.cached.remove(&h);
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    fn hold(&mut self, block: u32) {
        let b = block as usize;
        if self.refs[b] == 0 {
            self.idle.remove(&self.idle_since[b]);
        }
        self.refs[b] += 1;
    }

    fn release(&mut self, block: u32) {
        let b = block as usize;
        self.refs[b] -= 1;
        if self.refs[b] > 0 {
            return;
        }
        if self.hash[b].is_some() {
            self.clock += 1;
            self.idle_since[b] = self.clock;
            self.idle.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
    }

    fn register(&mut self, block: u32, hash: BlockHash) {
        // Another sequence may have computed the same block first; this copy stays private.
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hash[block as usize] = Some(hash);
        }
    }

    /// Offset of `(block, kv_head)` in a layer's buffer: its `BLOCK_TOKENS × head_dim` keys,
    /// or values, start there.
    fn at(&self, block: u32, head: usize) -> usize {
        (block as usize * self.kv_heads + head) * BLOCK_TOKENS * self.head_dim
    }
}

/// One sequence's blocks and the tokens whose keys and values they hold.
#[derive(Debug, Default)]
pub struct SeqCache {
    blocks: Vec<u32>,
    tokens: Vec<u32>,
    /// Hashes of the full blocks, in order.
    chain: Vec<BlockHash>,
    /// Separates adapters: the same tokens through another adapter have other keys.
    salt: u64,
}

impl SeqCache {
    /// An empty sequence; `salt` names the adapter it runs through (0 for the base).
    pub fn new(salt: u64) -> Self {
        Self {
            salt,
            ..Self::default()
        }
    }

    /// Tokens whose keys and values are cached.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Takes the cached blocks that continue this sequence along `prompt` (which starts with
    /// the tokens it holds), leaving at least the prompt's last token to compute (its logits
    /// are needed). Only a sequence holding whole blocks and nothing reserved past them can
    /// take more; others are left as they are. Returns how many tokens are now cached.
    pub fn attach_prefix(&mut self, pool: &mut KvPool, prompt: &[u32]) -> usize {
        debug_assert!(prompt.starts_with(&self.tokens), "the prompt continues the cached tokens");
        if self.blocks.len() != self.chain.len() || self.tokens.len() != self.chain.len() * BLOCK_TOKENS {
            return self.len();
        }
        let mut prev = self.chain.last().copied().unwrap_or(self.salt as BlockHash);
        let rest = &prompt[self.len()..prompt.len().saturating_sub(1).max(self.len())];
        for chunk in rest.chunks_exact(BLOCK_TOKENS) {
            let h = chain_hash(prev, chunk);
            let Some(&block) = pool.cached.get(&h) else { break };
            pool.hold(block);
            pool.hits += 1;
            self.blocks.push(block);
            self.chain.push(h);
            self.tokens.extend_from_slice(chunk);
            prev = h;
        }
        self.len()
    }

    /// The hashes of the full blocks that computing the next `n` tokens of `prompt` (which
    /// continues the cached tokens) would fill: two sequences that would fill the same block
    /// in one step compute it twice, so a scheduler lets the second wait a step and then
    /// [`attach_prefix`](Self::attach_prefix) the first one's.
    pub fn blocks_filled_by(&self, prompt: &[u32], n: usize) -> Vec<u128> {
        let end = (self.len() + n).min(prompt.len());
        let full = end / BLOCK_TOKENS;
        let mut prev = self.chain.last().copied().unwrap_or(self.salt as BlockHash);
        let mut out = Vec::new();
        for i in self.chain.len()..full {
            prev = chain_hash(prev, &prompt[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS]);
            out.push(prev);
        }
        out
    }

    /// Blocks still needed to add `n` tokens.
    pub fn blocks_needed(&self, n: usize) -> usize {
        (self.len() + n).div_ceil(BLOCK_TOKENS).saturating_sub(self.blocks.len())
    }

    /// Makes room for `n` more tokens; false, with nothing taken, when the pool is short.
    pub fn reserve(&mut self, pool: &mut KvPool, n: usize) -> bool {
        let need = self.blocks_needed(n);
        if need > pool.available() {
            return false;
        }
        for _ in 0..need {
            let b = pool.allocate().expect("counted as available");
            self.blocks.push(b);
        }
        true
    }

    /// Gives every block back (cached ones stay reusable until evicted).
    pub fn release(&mut self, pool: &mut KvPool) {
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
        self.tokens.clear();
        self.chain.clear();
    }

    /// Records `tokens` as cached and registers the blocks they filled that lie before
    /// position `exact` (the ones past it hold keys from 8-bit rows).
    fn commit(&mut self, pool: &mut KvPool, tokens: &[u32], exact: usize) {
        self.tokens.extend_from_slice(tokens);
        while (self.chain.len() + 1) * BLOCK_TOKENS <= self.tokens.len() {
            let i = self.chain.len();
            let prev = self.chain.last().copied().unwrap_or(self.salt as BlockHash);
            let h = chain_hash(prev, &self.tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS]);
            if (i + 1) * BLOCK_TOKENS <= exact {
                pool.register(self.blocks[i], h);
            }
            self.chain.push(h);
        }
    }

    /// Where position `p`'s key and value live: block and slot.
    fn slot(&self, p: usize) -> (u32, usize) {
        (self.blocks[p / BLOCK_TOKENS], p % BLOCK_TOKENS)
    }
}

/// 128 bits from two keyed SipHashes: a collision would silently reuse another prompt's
/// keys, so 64 bits are not enough for a cache that lives as long as the server.
fn chain_hash(prev: BlockHash, tokens: &[u32]) -> BlockHash {
    let half = |key: u8| {
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        prev.hash(&mut h);
        tokens.hash(&mut h);
        h.finish() as u128
    };
    (half(1) << 64) | half(2)
}

/// One sequence's part of a packed step: the tokens it adds (a prompt or the next token)
/// after what its cache holds, and the adapter it runs through.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    pub adapter: Option<&'a Adapter>,
    /// The sequence's prompt length: tokens at later positions were sampled. With 8-bit
    /// activations ([`crate::quant::set_int8_activations`]) the sampled tokens' rows
    /// multiply in 8 bits whatever their number, so a sampled token's bits do not depend on
    /// what shares its step, and a prompt's rows in f32: rounding a prompt's activations
    /// cost the grounded-QA pack's baseline 0.13 ROUGE-L. The prompt's rows then go through
    /// `QMatrix::matmul_exact`, the same bits however the prompt is cut (whole, a
    /// prefix-cache tail alone, in pieces, beside others): 8-bit rounding downstream would
    /// turn a one-ulp difference into another code, sometimes another token.
    pub prompt_len: usize,
}

/// Tokens one pass through the layers takes at most. A step with more (a long prompt, or
/// many prompts at once) runs as several passes, each row's tokens in order, so what a pass
/// allocates (activations `[tokens, width]`, the prompt kernels' operands) stays bounded
/// whatever the prompt's length, as llama.cpp's `n_ubatch` (also 512) bounds it. A prompt's
/// rows are the same bits however a step is cut (their products do not depend on the rows
/// beside them, and attention reads earlier passes' keys from the pool), so passes change
/// no result.
pub const PASS_TOKENS: usize = 512;

impl CausalLm {
    /// Runs a packed step: every row's tokens, each attending to its own cached blocks, in
    /// passes of at most [`PASS_TOKENS`] tokens. Writes their keys and values into `pool`
    /// (room must be reserved) and returns the logits of each row's last token, `[rows,
    /// vocab]` on the host. Rows through the same adapter should be adjacent: each run of
    /// them is one matmul.
    pub fn forward_paged(&self, rows: &mut [SeqStep<'_>], pool: &mut KvPool) -> Result<Vec<f32>> {
        self.forward_paged_by(rows, pool, PASS_TOKENS)
    }

    /// [`forward_paged`](Self::forward_paged) in passes of at most `pass_tokens` tokens.
    pub fn forward_paged_by(&self, rows: &mut [SeqStep<'_>], pool: &mut KvPool, pass_tokens: usize) -> Result<Vec<f32>> {
        // Checked before the first pass writes anything.
        for (r, row) in rows.iter().enumerate() {
            if row.tokens.is_empty() {
                return Err(EngineError::Generation(format!("row {r} of a packed step has no tokens")));
            }
            if row.cache.blocks_needed(row.tokens.len()) > 0 {
                return Err(EngineError::Generation(format!("row {r}: no blocks reserved for its tokens")));
            }
        }
        let pass_tokens = pass_tokens.max(1);
        let lens: Vec<usize> = rows.iter().map(|r| r.tokens.len()).collect();
        if lens.iter().sum::<usize>() <= pass_tokens {
            return Ok(super::in_pool(|| self.pass(rows, pool)));
        }
        let vocab = self.config.vocab_size;
        let mut logits = vec![0f32; rows.len() * vocab];
        // Tokens of each row already through.
        let mut done = vec![0usize; rows.len()];
        while done != lens {
            let mut budget = pass_tokens;
            let mut part = Vec::new();
            let mut which = Vec::new();
            for (r, row) in rows.iter_mut().enumerate() {
                let take = (lens[r] - done[r]).min(budget);
                if take == 0 {
                    continue;
                }
                budget -= take;
                let tokens: &[u32] = row.tokens;
                part.push(SeqStep {
                    tokens: &tokens[done[r]..done[r] + take],
                    cache: &mut *row.cache,
                    adapter: row.adapter,
                    prompt_len: row.prompt_len,
                });
                which.push(r);
            }
            let got = super::in_pool(|| self.pass(&mut part, pool));
            for ((i, &r), step) in which.iter().enumerate().zip(&part) {
                done[r] += step.tokens.len();
                if done[r] == lens[r] {
                    logits[r * vocab..(r + 1) * vocab].copy_from_slice(&got[i * vocab..(i + 1) * vocab]);
                }
            }
        }
        Ok(logits)
    }

    /// One pass: every row's tokens through the layers at once (rows checked by the caller).
    fn pass(&self, rows: &mut [SeqStep<'_>], pool: &mut KvPool) -> Vec<f32> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        // For each token: its row and position.
        let mut owner = Vec::new();
        let mut ends = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter().enumerate() {
            let start = row.cache.len();
            tokens.extend_from_slice(row.tokens);
            for p in start..start + row.tokens.len() {
                positions.push(p as i64);
                owner.push((r, p));
            }
            ends.push(tokens.len() - 1);
        }
        let n = tokens.len();
        // Which tokens multiply with 8-bit activations: the sampled ones, when asked for.
        let int8 = crate::quant::int8_activations();
        let eight: Vec<bool> = owner.iter().map(|&(r, p)| int8 && p >= rows[r].prompt_len).collect();
        let step = Step {
            batch: 1,
            seq: n,
            valid: vec![true; n],
            tokens,
            positions,
        };
        let rope = Rope::new(&self.inv_freq, &step.positions);
        let runs = adapter_runs(rows);
        // The step runs on host buffers, `[tokens, width]` row-major: a handful of calls
        // per layer instead of some twenty small tensor ops.
        let mut x = super::to_host(self.embed(&step));
        for i in 0..self.layers.len() {
            let lora = Lora {
                groups: runs
                    .iter()
                    .map(|(range, a)| LoraGroup {
                        layer: &a.layers[i],
                        scale: a.config.scale(),
                        rows: (range.len() < n).then(|| range.clone()),
                    })
                    .collect(),
                dropout: 0.0,
            };
            let layer = &self.layers[i];
            let h = self.paged_attention(i, &layer.input_layernorm.forward_host(&x), &rope, rows, &owner, &eight, pool, &lora);
            add(&mut x, &h);
            let h = layer.mlp.forward_host(&layer.post_attention_layernorm.forward_host(&x), n, &eight, &lora, &self.device);
            add(&mut x, &h);
        }
        for row in rows.iter_mut() {
            // Blocks holding 8-bit rows are not offered to other sequences: a prompt that
            // contains those tokens computes them in f32.
            let exact = if int8 { row.prompt_len } else { usize::MAX };
            row.cache.commit(pool, row.tokens, exact);
        }
        let d = self.config.hidden_size;
        let last: Vec<f32> = ends.iter().flat_map(|&e| x[e * d..(e + 1) * d].iter().copied()).collect();
        let last8: Vec<bool> = ends.iter().map(|&e| eight[e]).collect();
        let mut logits = Linear::forward_host(&[&self.lm_head], &self.norm.forward_host(&last), rows.len(), &last8, &self.device);
        logits.pop().expect("one output")
    }

    /// Attention of a packed step: projections as a batch, then each token against its own
    /// row's blocks. `h` is `[tokens, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(&self, layer: usize, h: &[f32], rope: &Rope, rows: &[SeqStep<'_>], owner: &[(usize, usize)], int8: &[bool], pool: &mut KvPool, lora: &Lora<'_>) -> Vec<f32> {
        let c = &self.config;
        let attn = &self.layers[layer].self_attn;
        let n = owner.len();
        let (heads, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        // `[tokens, heads, hd]` each.
        let projections = [(&attn.q_proj, Target::Q), (&attn.k_proj, Target::K), (&attn.v_proj, Target::V)];
        let [mut q, mut k, v]: [Vec<f32>; 3] = lora.apply_host(&projections, h, n, int8, &self.device).try_into().expect("three projections");
        rope.apply(&mut q, hd);
        rope.apply(&mut k, hd);

        for (t, &(r, p)) in owner.iter().enumerate() {
            let (block, slot) = rows[r].cache.slot(p);
            for g in 0..kvh {
                let at = pool.at(block, g);
                let src = (t * kvh + g) * hd;
                for (d, &x) in k[src..src + hd].iter().enumerate() {
                    pool.k[layer][at + d * BLOCK_TOKENS + slot] = x;
                }
                pool.v[layer][at + slot * hd..][..hd].copy_from_slice(&v[src..src + hd]);
            }
        }

        let geometry = Geometry {
            heads,
            group: heads / kvh,
            hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window: c.sliding_window,
        };
        // Tasks: a row's run of up to 8 query tokens against one key/value head, so each
        // key is read once for every query head that shares it.
        let mut tasks = Vec::new();
        let mut t = 0;
        while t < n {
            let r = owner[t].0;
            let end = (t..n).find(|&u| owner[u].0 != r || u - t == 8).unwrap_or(n);
            tasks.extend((0..kvh).map(|g| (r, g, t..end)));
            t = end;
        }
        let pool = &*pool;
        // Query-key products: a single stream's decode step is too little work to be worth
        // handing out (measured: 0.95x on the team); more goes to the team, whose threads are
        // spinning between the products around this (rayon's would wake beside them).
        let work: usize = tasks.iter().map(|(_, _, ts)| ts.len() * geometry.group * (owner[ts.end - 1].1 + 1) * hd).sum();
        // Each task (row, key/value head, its tokens) with the place for its output.
        type Task = ((usize, usize, Range<usize>), Vec<f32>);
        let mut results: Vec<Task> = tasks.into_iter().map(|t| (t, Vec::new())).collect();
        let run = |((r, g, ts), out): &mut Task| *out = attend(pool, layer, &rows[*r].cache.blocks, *g, ts.clone(), owner, &q, &geometry);
        if work < 1 << 18 {
            results.iter_mut().for_each(run);
        } else {
            crate::team::for_each(&mut results, run);
        }
        let mut out = vec![0.0f32; n * heads * hd];
        for ((_, g, ts), res) in results {
            let mut res = res.chunks_exact(hd);
            for t in ts.clone() {
                for h in g * geometry.group..(g + 1) * geometry.group {
                    out[(t * heads + h) * hd..][..hd].copy_from_slice(res.next().expect("one output per query head"));
                }
            }
        }
        lora.apply_host_one(&attn.o_proj, Target::O, &out, n, int8, &self.device)
    }
}

/// `x += y`, elementwise.
fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// Rotary embedding tables for a step's tokens: per token, the cosine and sine of each
/// frequency's angle (computed in f32 as Hugging Face does). Serving and the CPU training
/// step (`train/backprop.rs`) rotate with these.
pub(crate) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    pub(crate) fn new(inv_freq: &[f64], positions: &[i64]) -> Self {
        let half = inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * half), Vec::with_capacity(positions.len() * half));
        for &p in positions {
            for &f in inv_freq {
                let angle = (p as f32) * (f as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// Rotates every head of every token in `x` (`[tokens, heads, hd]`): the first half of
    /// each head against the second, `x·cos + rotate_half(x)·sin`.
    pub(crate) fn apply(&self, x: &mut [f32], hd: usize) {
        self.rotate(x, hd, 1.0);
    }

    /// The rotation's transpose (its inverse): from the gradient of [`Rope::apply`]'s output
    /// to that of its input.
    pub(crate) fn apply_transposed(&self, x: &mut [f32], hd: usize) {
        self.rotate(x, hd, -1.0);
    }

    fn rotate(&self, x: &mut [f32], hd: usize, sign: f32) {
        assert_eq!(hd, 2 * self.half, "rotary tables for this head size");
        let tokens = self.cos.len() / self.half;
        for (t, row) in x.chunks_exact_mut(x.len() / tokens).enumerate() {
            let (cos, sin) = (&self.cos[t * self.half..][..self.half], &self.sin[t * self.half..][..self.half]);
            for head in row.chunks_exact_mut(hd) {
                let (x1, x2) = head.split_at_mut(self.half);
                for i in 0..self.half {
                    let (a, b, s) = (x1[i], x2[i], sign * sin[i]);
                    x1[i] = a * cos[i] - b * s;
                    x2[i] = b * cos[i] + a * s;
                }
            }
        }
    }
}

/// The attention shapes every task shares.
struct Geometry {
    heads: usize,
    /// Query heads per key/value head.
    group: usize,
    hd: usize,
    scale: f32,
    window: Option<usize>,
}

/// Attention of query tokens `ts` (one row's, positions rising) through the query heads of
/// key/value head `g`, against the row's cached keys in `blocks`. Returns
/// `[token][head][hd]`.
///
/// One pass over the blocks with a running maximum and sum per query (online softmax, as
/// FlashAttention tiles it): a block's scores first, then one rescale if its maximum is
/// new, then its weighted values. A block's keys and values stay in L1 while every query
/// of the task reads them.
///
/// The block's 16 scores are 16 lanes ([`Scores`]), its weights one vectorized `exp`
/// and a pairwise sum, and every result one fixed chain of fused multiply-adds: the same
/// bits on every kernel (the portable loops get them from `f32::mul_add`), and for a query
/// whatever else its task holds.
#[allow(clippy::too_many_arguments)]
fn attend(pool: &KvPool, layer: usize, blocks: &[u32], g: usize, ts: Range<usize>, owner: &[(usize, usize)], q: &[f32], geo: &Geometry) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unsafe_code)]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { attend_avx512(pool, layer, blocks, g, ts, owner, q, geo) };
        }
        #[allow(unsafe_code)]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { attend_avx2(pool, layer, blocks, g, ts, owner, q, geo) };
        }
    }
    attend_blocks::<PortableScores>(pool, layer, blocks, g, ts, owner, q, geo)
}

/// [`attend_blocks`] compiled for AVX-512: a block's 16 scores in one register.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512(pool: &KvPool, layer: usize, blocks: &[u32], g: usize, ts: Range<usize>, owner: &[(usize, usize)], q: &[f32], geo: &Geometry) -> Vec<f32> {
    attend_blocks::<Avx512Scores>(pool, layer, blocks, g, ts, owner, q, geo)
}

/// [`attend_blocks`] compiled for AVX2 and FMA: in two.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(pool: &KvPool, layer: usize, blocks: &[u32], g: usize, ts: Range<usize>, owner: &[(usize, usize)], q: &[f32], geo: &Geometry) -> Vec<f32> {
    attend_blocks::<Avx2Scores>(pool, layer, blocks, g, ts, owner, q, geo)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_blocks<S: Scores>(pool: &KvPool, layer: usize, blocks: &[u32], g: usize, ts: Range<usize>, owner: &[(usize, usize)], q: &[f32], geo: &Geometry) -> Vec<f32> {
    let (hd, group) = (geo.hd, geo.group);
    // The first key position `p` sees (a sliding window starts later).
    let first = |p: usize| geo.window.map_or(0, |w| (p + 1).saturating_sub(w));
    // One query per (token, head): its position and vector; a running max and sum each.
    let queries: Vec<(usize, &[f32])> = ts.clone().flat_map(|t| (g * group..(g + 1) * group).map(move |h| (owner[t].1, &q[(t * geo.heads + h) * hd..][..hd]))).collect();
    let mut max = vec![f32::NEG_INFINITY; queries.len()];
    let mut sum = vec![0.0f32; queries.len()];
    let mut acc = vec![0.0f32; queries.len() * hd];
    let last = owner[ts.end - 1].1;
    let lo = first(owner[ts.start].1);
    for (bi, &block) in blocks.iter().enumerate().take(last / BLOCK_TOKENS + 1).skip(lo / BLOCK_TOKENS) {
        let base = pool.at(block, g);
        let keys = &pool.k[layer][base..base + BLOCK_TOKENS * hd];
        let values = &pool.v[layer][base..base + BLOCK_TOKENS * hd];
        let j0 = bi * BLOCK_TOKENS;
        for (k, &(p, qv)) in queries.iter().enumerate() {
            // The block's slots this query sees: keys from first(p) through p.
            let from = first(p).max(j0) - j0;
            let to = (p + 1).min(j0 + BLOCK_TOKENS).saturating_sub(j0);
            if from >= to {
                continue;
            }
            let scores = S::scores(qv, keys, geo.scale);
            // The largest score the query sees, lanes outside its slots at −∞ (a maximum in
            // any order is the same value).
            let mut seen = [f32::NEG_INFINITY; BLOCK_TOKENS];
            for (j, (m, &s)) in seen.iter_mut().zip(&scores).enumerate() {
                if j >= from && j < to {
                    *m = s;
                }
            }
            let top = hmax(seen);
            let a = &mut acc[k * hd..(k + 1) * hd];
            if top > max[k] {
                if max[k] > f32::NEG_INFINITY {
                    let shrink = exp(max[k] - top);
                    sum[k] *= shrink;
                    for x in a.iter_mut() {
                        *x *= shrink;
                    }
                }
                max[k] = top;
            }
            let m = max[k];
            let mut w = [0f32; BLOCK_TOKENS];
            for (j, (w, &s)) in w.iter_mut().zip(&scores).enumerate() {
                let e = exp(s - m);
                *w = if j >= from && j < to { e } else { 0.0 };
            }
            sum[k] += hsum(w);
            add_weighted(a, &w[from..to], &values[from * hd..to * hd]);
        }
    }
    for (k, a) in acc.chunks_exact_mut(hd).enumerate() {
        let inv = 1.0 / sum[k];
        for x in a.iter_mut() {
            *x *= inv;
        }
    }
    acc
}

/// A query's scaled scores against a block's 16 keys (`keys` as `[hd][16]`): each key one
/// lane, summed over the dimensions in four interleaved chains of fused multiply-adds
/// (`d mod 4`, so consecutive multiply-adds do not wait on each other; the tail past a
/// multiple of four joins the first), then `((c₀ + c₁) + (c₂ + c₃)) · scale`. Every
/// implementation gives these bits.
trait Scores {
    fn scores(q: &[f32], keys: &[f32], scale: f32) -> [f32; BLOCK_TOKENS];
}

/// [`Scores`] in plain loops (`f32::mul_add` is the fused multiply-add on any CPU).
struct PortableScores;

impl Scores for PortableScores {
    #[inline(always)]
    fn scores(q: &[f32], keys: &[f32], scale: f32) -> [f32; BLOCK_TOKENS] {
        assert_eq!(keys.len(), q.len() * BLOCK_TOKENS);
        let mut c = [[0f32; BLOCK_TOKENS]; 4];
        for (d, &qd) in q.iter().enumerate() {
            let chain = if d < q.len() / 4 * 4 { d % 4 } else { 0 };
            for (c, &k) in c[chain].iter_mut().zip(&keys[d * BLOCK_TOKENS..][..BLOCK_TOKENS]) {
                *c = qd.mul_add(k, *c);
            }
        }
        std::array::from_fn(|j| ((c[0][j] + c[1][j]) + (c[2][j] + c[3][j])) * scale)
    }
}

/// Sixteen f32 lanes in registers, for [`SimdScores`]: one AVX-512 register or two AVX2
/// ones. Only called inside the functions compiled for those features (`attend_avx512`,
/// `attend_avx2`), where the intrinsics inline.
#[cfg(target_arch = "x86_64")]
trait Lanes: Copy {
    fn zero() -> Self;
    fn splat(x: f32) -> Self;
    /// The 16 floats from `at` (16 must lie there).
    fn load(at: &[f32]) -> Self;
    /// `a·b + c`, fused.
    fn fmadd(a: Self, b: Self, c: Self) -> Self;
    fn add(a: Self, b: Self) -> Self;
    fn mul(a: Self, b: Self) -> Self;
    fn store(self, out: &mut [f32; BLOCK_TOKENS]);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
impl Lanes for std::arch::x86_64::__m512 {
    // SAFETY (every method): instantiated only through `Avx512`, inside `attend_avx512`,
    // which runs where AVX-512 F is; loads read 16 floats of a slice of at least 16.
    #[inline(always)]
    fn zero() -> Self {
        unsafe { std::arch::x86_64::_mm512_setzero_ps() }
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        unsafe { std::arch::x86_64::_mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn load(at: &[f32]) -> Self {
        assert!(at.len() >= 16);
        unsafe { std::arch::x86_64::_mm512_loadu_ps(at.as_ptr()) }
    }
    #[inline(always)]
    fn fmadd(a: Self, b: Self, c: Self) -> Self {
        unsafe { std::arch::x86_64::_mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn add(a: Self, b: Self) -> Self {
        unsafe { std::arch::x86_64::_mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        unsafe { std::arch::x86_64::_mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; BLOCK_TOKENS]) {
        unsafe { std::arch::x86_64::_mm512_storeu_ps(out.as_mut_ptr(), self) }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
impl Lanes for [std::arch::x86_64::__m256; 2] {
    // SAFETY (every method): instantiated only through `Avx2`, inside `attend_avx2`, which
    // runs where AVX2 and FMA are; loads read 16 floats of a slice of at least 16.
    #[inline(always)]
    fn zero() -> Self {
        unsafe { [std::arch::x86_64::_mm256_setzero_ps(); 2] }
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        unsafe { [std::arch::x86_64::_mm256_set1_ps(x); 2] }
    }
    #[inline(always)]
    fn load(at: &[f32]) -> Self {
        assert!(at.len() >= 16);
        unsafe { [std::arch::x86_64::_mm256_loadu_ps(at.as_ptr()), std::arch::x86_64::_mm256_loadu_ps(at.as_ptr().add(8))] }
    }
    #[inline(always)]
    fn fmadd(a: Self, b: Self, c: Self) -> Self {
        unsafe { [std::arch::x86_64::_mm256_fmadd_ps(a[0], b[0], c[0]), std::arch::x86_64::_mm256_fmadd_ps(a[1], b[1], c[1])] }
    }
    #[inline(always)]
    fn add(a: Self, b: Self) -> Self {
        unsafe { [std::arch::x86_64::_mm256_add_ps(a[0], b[0]), std::arch::x86_64::_mm256_add_ps(a[1], b[1])] }
    }
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        unsafe { [std::arch::x86_64::_mm256_mul_ps(a[0], b[0]), std::arch::x86_64::_mm256_mul_ps(a[1], b[1])] }
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; BLOCK_TOKENS]) {
        unsafe {
            std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), self[0]);
            std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr().add(8), self[1]);
        }
    }
}

/// [`Scores`] in registers of sixteen lanes ([`Lanes`]): the portable loops' chains, one
/// register (or pair) each.
#[cfg(target_arch = "x86_64")]
struct SimdScores<V>(std::marker::PhantomData<V>);

#[cfg(target_arch = "x86_64")]
type Avx512Scores = SimdScores<std::arch::x86_64::__m512>;
#[cfg(target_arch = "x86_64")]
type Avx2Scores = SimdScores<[std::arch::x86_64::__m256; 2]>;

#[cfg(target_arch = "x86_64")]
impl<V: Lanes> Scores for SimdScores<V> {
    #[inline(always)]
    fn scores(q: &[f32], keys: &[f32], scale: f32) -> [f32; BLOCK_TOKENS] {
        assert_eq!(keys.len(), q.len() * BLOCK_TOKENS);
        let whole = q.len() / 4 * 4;
        let mut c = [V::zero(); 4];
        for (q4, k4) in q.chunks_exact(4).zip(keys.chunks_exact(4 * BLOCK_TOKENS)) {
            for (u, c) in c.iter_mut().enumerate() {
                *c = V::fmadd(V::splat(q4[u]), V::load(&k4[u * BLOCK_TOKENS..]), *c);
            }
        }
        for (d, &qd) in q.iter().enumerate().skip(whole) {
            c[0] = V::fmadd(V::splat(qd), V::load(&keys[d * BLOCK_TOKENS..]), c[0]);
        }
        let mut out = [0f32; BLOCK_TOKENS];
        V::mul(V::add(V::add(c[0], c[1]), V::add(c[2], c[3])), V::splat(scale)).store(&mut out);
        out
    }
}

/// `a += Σⱼ w[j] · values[j]` over the rows of `values` (each `a.len()` wide), in order of
/// `j`, a fused multiply-add each; 64 dimensions at a time, kept in registers across the
/// rows.
#[inline(always)]
fn add_weighted(a: &mut [f32], w: &[f32], values: &[f32]) {
    const LANES: usize = 64;
    let hd = a.len();
    let mut chunks = a.chunks_exact_mut(LANES);
    for (c, out) in (&mut chunks).enumerate() {
        let mut x: [f32; LANES] = out.try_into().expect("a chunk of LANES");
        for (j, &wj) in w.iter().enumerate() {
            let v: &[f32; LANES] = values[j * hd + c * LANES..][..LANES].try_into().expect("a chunk of LANES");
            for l in 0..LANES {
                x[l] = wj.mul_add(v[l], x[l]);
            }
        }
        out.copy_from_slice(&x);
    }
    let start = hd / LANES * LANES;
    let tail = chunks.into_remainder();
    for (j, &wj) in w.iter().enumerate() {
        for (x, &v) in tail.iter_mut().zip(&values[j * hd + start..(j + 1) * hd]) {
            *x = wj.mul_add(v, *x);
        }
    }
}

/// Runs of adjacent rows through the same adapter, as ranges of the packed tokens.
fn adapter_runs<'a>(rows: &[SeqStep<'a>]) -> Vec<(Range<usize>, &'a Adapter)> {
    let mut runs: Vec<(Range<usize>, &'a Adapter)> = Vec::new();
    let mut at = 0;
    for row in rows {
        let end = at + row.tokens.len();
        if let Some(a) = row.adapter {
            match runs.last_mut() {
                Some((range, prev)) if range.end == at && std::ptr::eq(*prev, a) => range.end = end,
                _ => runs.push((at..end, a)),
            }
        }
        at = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention kernel against attention computed plainly in f64, over blocks that
    /// are full, partial and skipped (a sliding window), for several queries a task and
    /// head dimensions that are and are not multiples of its chunks; and the AVX-512 and
    /// AVX2 kernels (where the CPU has them) give the portable loops' bits.
    #[test]
    fn attention_over_blocks_matches_plain_softmax_in_f64_and_every_kernel_gives_the_same_bits() {
        let vals = |n: usize, seed: u32| -> Vec<f32> { (0..n as u32).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32 / 700.0 - 1.4).collect() };
        // Query heads a key/value head serves: one to five.
        for (hd, window, positions, group) in [(64, None, 40..48usize, 3), (72, None, 0..3, 4), (128, Some(20), 50..58, 5), (6, Some(5), 13..17, 1)] {
            let config = ModelConfig { num_layers: 1, num_kv_heads: 2, head_dim: hd, ..crate::tiny::tiny_config(crate::config::Architecture::Llama) };
            let kvh = 2;
            let heads = group * kvh;
            let len = positions.end;
            let mut pool = KvPool::new(&config, len.div_ceil(BLOCK_TOKENS) + 2);
            // Blocks in a scattered order, as a pool hands them out.
            let blocks: Vec<u32> = (0..len.div_ceil(BLOCK_TOKENS) as u32).rev().collect();
            let (keys, values) = (vals(len * kvh * hd, 1), vals(len * kvh * hd, 2));
            for p in 0..len {
                for g in 0..kvh {
                    let at = pool.at(blocks[p / BLOCK_TOKENS], g);
                    let (slot, src) = (p % BLOCK_TOKENS, (p * kvh + g) * hd);
                    for d in 0..hd {
                        pool.k[0][at + d * BLOCK_TOKENS + slot] = keys[src + d];
                    }
                    pool.v[0][at + slot * hd..][..hd].copy_from_slice(&values[src..src + hd]);
                }
            }
            let owner: Vec<(usize, usize)> = positions.clone().map(|p| (0, p)).collect();
            let q = vals(owner.len() * heads * hd, 3);
            let geo = Geometry { heads, group, hd, scale: 1.0 / (hd as f32).sqrt(), window };
            for g in 0..kvh {
                let ts = 0..owner.len();
                let got = attend(&pool, 0, &blocks, g, ts.clone(), &owner, &q, &geo);
                let portable = attend_blocks::<PortableScores>(&pool, 0, &blocks, g, ts.clone(), &owner, &q, &geo);
                assert!(got == portable, "hd {hd}: the dispatched kernel and the portable loops differ");
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA.
                    #[allow(unsafe_code)]
                    let avx2 = unsafe { attend_avx2(&pool, 0, &blocks, g, ts.clone(), &owner, &q, &geo) };
                    assert!(avx2 == portable, "hd {hd}: the AVX2 kernel and the portable loops differ");
                }
                // One query a task: the same bits as beside the others.
                for t in ts.clone() {
                    let alone = attend(&pool, 0, &blocks, g, t..t + 1, &owner, &q, &geo);
                    assert!(alone[..] == got[(t - ts.start) * group * hd..][..group * hd], "hd {hd}: a query's bits depend on its task");
                }
                for (t, &(_, p)) in owner.iter().enumerate() {
                    let from = window.map_or(0, |w| (p + 1).saturating_sub(w));
                    for h in 0..group {
                        let qv = &q[(t * heads + g * group + h) * hd..][..hd];
                        let score = |j: usize| (0..hd).map(|d| f64::from(qv[d]) * f64::from(keys[(j * kvh + g) * hd + d])).sum::<f64>() * f64::from(geo.scale);
                        let top = (from..=p).map(score).fold(f64::NEG_INFINITY, f64::max);
                        let weights: Vec<f64> = (from..=p).map(|j| (score(j) - top).exp()).collect();
                        let total: f64 = weights.iter().sum();
                        for d in 0..hd {
                            let want = (from..=p).zip(&weights).map(|(j, w)| w * f64::from(values[(j * kvh + g) * hd + d])).sum::<f64>() / total;
                            let have = f64::from(got[(t * group + h) * hd + d]);
                            assert!((have - want).abs() < 1e-5, "hd {hd} position {p} head {h} dim {d}: {have} against {want}");
                        }
                    }
                }
            }
        }
    }
}
