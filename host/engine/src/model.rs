//! The Llama / Mistral decoder in burn: grouped-query attention, rotary embeddings
//! (rotate-half, as Hugging Face), RMSNorm, SwiGLU, tied or untied output head, and
//! Mistral's sliding window. Backend-agnostic: every tensor lives on the `Device` the
//! model was loaded onto.
//!
//! `forward` takes the KV cache explicitly. Each row of a batch carries its own rotary
//! positions and a validity flag per token, so prompts of different lengths can share a
//! batch (left-padded) and give the same logits as they would alone.

use burn::tensor::activation::silu;
use burn::tensor::module::embedding;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData};

use std::sync::Arc;

use crate::config::ModelConfig;
use crate::export::MemoryWeights;
use crate::lora::{Adapter, LayerAdapter, Target};
use crate::quant::{self, QMatrix};
use crate::error::{EngineError, Result};
use crate::weights::{HostTensor, WeightSource};

pub mod attention;
pub mod paged;

static DENSE_COPY_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1 << 30);

/// The most bytes of f32 copies a model loaded on the CPU keeps beside its quantized blocks
/// (for training, and the prefill gemm with f32 activations): 1 GiB unless
/// [`set_dense_copy_limit`] says otherwise.
/// SmolLM2-135M (540 MB as f32) keeps them; a 7B model keeps its blocks alone.
pub fn dense_copy_limit() -> usize {
    DENSE_COPY_LIMIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets [`dense_copy_limit`] for models loaded from now on (process-wide).
pub fn set_dense_copy_limit(bytes: usize) {
    DENSE_COPY_LIMIT.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// A frozen linear projection, `y = x · W` with `W` logically `[in, out]`.
///
/// On the CPU, a weight that came in quantized blocks also keeps them: decoding multiplies
/// straight from the blocks, reading 4-8× fewer bytes than the f32 copy, and so does a
/// prompt with 8-bit sampled tokens ([`QMatrix::matmul_exact`]); with f32 activations
/// steps past [`quant::MAX_ROWS`] rows (prefill) use the dense gemm. A model whose f32
/// copies would pass [`dense_copy_limit`] keeps the blocks alone, and every step multiplies
/// from them: resident memory stays near the file's size.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[in, out]`; None when only the quantized blocks are kept (QLoRA's frozen base).
    weight: Option<Tensor<2>>,
    packed: Option<Arc<QMatrix>>,
}

impl Linear {
    /// From a Hugging Face `[out, in]` weight; the transpose is a strided view.
    fn from_hf(t: Tensor<2>, packed: Option<QMatrix>) -> Self {
        Self {
            weight: Some(t.transpose()),
            packed: packed.map(Arc::new),
        }
    }

    /// From a Hugging Face `[out, in]` weight on the host, stored transposed and contiguous:
    /// the gemm then packs its panels with straight copies instead of strided gathers (a
    /// third of prefill's matmul time went to packing the strided view).
    fn from_hf_host(data: &[f32], out: usize, inp: usize, device: &Device, packed: Option<QMatrix>) -> Self {
        let mut t = vec![0f32; data.len()];
        for (o, row) in data.chunks_exact(inp).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                t[i * out + o] = v;
            }
        }
        Self {
            weight: Some(Tensor::from_data(TensorData::new(t, [inp, out]), device)),
            packed: packed.map(Arc::new),
        }
    }

    /// The dense `[in, out]` weight and the quantized blocks, whichever are kept.
    pub(crate) fn parts(&self) -> (Option<&Tensor<2>>, Option<&QMatrix>) {
        (self.weight.as_ref(), self.packed.as_deref())
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.weight, &self.packed) {
            (Some(w), _) => w.dims(),
            (None, Some(q)) => [q.cols(), q.rows()],
            (None, None) => unreachable!("a projection keeps a dense or a packed weight"),
        }
    }

    /// The weight as Hugging Face stores it, `[out, in]`, row-major on the host.
    pub fn to_hf_host(&self) -> Vec<f32> {
        match (&self.weight, &self.packed) {
            (Some(w), _) => w
                .clone()
                .transpose()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32 weights"),
            (None, Some(q)) => q.dequantize(),
            (None, None) => unreachable!("a projection keeps a dense or a packed weight"),
        }
    }

    /// Keeps only the quantized blocks (quantizing to `ty` first if the weight came
    /// dense): the frozen base of QLoRA, expanded per use.
    fn drop_dense(&mut self, ty: crate::gguf::GgmlType) -> Result<()> {
        if self.packed.is_none() {
            let [i, o] = self.dims();
            let bytes = crate::gguf::quantize(ty, &self.to_hf_host());
            let q = QMatrix::from_ggml(ty, &bytes, o, i).ok_or_else(|| EngineError::Unsupported {
                path: "model".into(),
                field: "QLoRA base".into(),
                detail: format!("a [{o}, {i}] projection cannot be stored as {}: its width is not a multiple of 32", ty.name()),
            })?;
            self.packed = Some(Arc::new(q));
        }
        self.weight = None;
        Ok(())
    }

    /// The dense `[in, out]` weight: the kept one, or the blocks expanded now.
    fn dense(&self, device: &Device) -> Tensor<2> {
        match (&self.weight, &self.packed) {
            (Some(w), _) => w.clone(),
            (None, Some(q)) => Tensor::<2>::from_data(TensorData::new(q.dequantize(), [q.rows(), q.cols()]), device).transpose(),
            (None, None) => unreachable!("a projection keeps a dense or a packed weight"),
        }
    }

    /// `x · W` in the weight's precision, the product in f32: a bf16 weight
    /// ([`CausalLm::bf16_base`]) multiplies bf16 inputs (on tensor cores, accumulating in
    /// f32), as PyTorch's autocast does; an f32 one multiplies as the device does.
    fn product(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
        match w.dtype() {
            DType::BF16 => x.cast(FloatDType::BF16).matmul(w).cast(FloatDType::F32),
            _ => x.matmul(w),
        }
    }

    /// Stores the dense weight in bf16 (half its bytes), `[in, out]` row by row; returns the
    /// bytes saved. On the CPU the values are rounded straight from the f32 storage, through
    /// whatever view the weight is (a tied head is the embedding transposed): a cast would
    /// first copy the view whole in f32 (113 MB for SmolLM2's head).
    fn store_bf16(&mut self) -> usize {
        let Some(w) = self.weight.as_ref().filter(|w| w.dtype() == DType::F32) else {
            return 0;
        };
        let [i, o] = w.dims();
        let device = w.device();
        self.weight = Some(match w.clone().try_into_primitive::<burn_flex::Flex>() {
            Ok(t) => {
                let (l, data) = (t.layout(), t.storage::<f32>());
                let (st, at) = (l.strides(), l.start_offset() as isize);
                let mut rows = Vec::with_capacity(i * o);
                for r in 0..i as isize {
                    rows.extend((0..o as isize).map(|c| half::bf16::from_f32(data[(at + r * st[0] + c * st[1]) as usize])));
                }
                Tensor::from_data(TensorData::new(rows, [i, o]), (&device, DType::BF16))
            }
            Err(_) => w.clone().cast(FloatDType::BF16),
        });
        i * o * 2
    }

    /// `x · W` for each projection in `lins`, all reading the same `n` rows of `x` (`[n, in]`
    /// on the host), every quantized projection in one parallel loop on the team. The rows
    /// marked in `int8` (sampled tokens, see [`crate::model::paged::SeqStep::prompt_len`];
    /// empty for none) multiply with 8-bit activations, whatever their number, so each
    /// one's result is the same whatever shares its step; the others in f32. With 8-bit
    /// activations on, the f32 rows (prompts) go through [`QMatrix::matmul_exact`], whose
    /// rows are also the same bits in any step. With them off, up to [`quant::MAX_ROWS`]
    /// rows take the block kernel and more the dense copy where one is kept (the f32
    /// path's numerics since the packs' first baselines), else the panels. Dense weights go
    /// through the dense gemm.
    pub(crate) fn forward_host(lins: &[&Linear], x: &[f32], n: usize, int8: &[bool], device: &Device) -> Vec<Vec<f32>> {
        let packed: Option<Vec<&QMatrix>> = lins.iter().map(|l| l.packed.as_deref()).collect();
        let eight = int8.iter().filter(|&&b| b).count();
        let Some(mats) = packed.filter(|_| eight > 0) else {
            return Self::forward_host_f32(lins, x, n, device);
        };
        if eight == n {
            return QMatrix::matmul_many(&mats, x, n, true);
        }
        // Both kinds in one step: each apart, then back in the step's order.
        let d = x.len() / n;
        let (mut x8, mut xf) = (Vec::with_capacity(eight * d), Vec::with_capacity((n - eight) * d));
        for (row, &b) in x.chunks_exact(d).zip(int8) {
            if b { &mut x8 } else { &mut xf }.extend_from_slice(row);
        }
        let (y8, yf) = (QMatrix::matmul_many(&mats, &x8, eight, true), Self::forward_host_f32(lins, &xf, n - eight, device));
        y8.iter()
            .zip(&yf)
            .map(|(y8, yf)| {
                let out = (y8.len() + yf.len()) / n;
                let (mut a, mut b) = (y8.chunks_exact(out), yf.chunks_exact(out));
                int8.iter().flat_map(|&is8| if is8 { a.next() } else { b.next() }.expect("a row of its kind")).copied().collect()
            })
            .collect()
    }

    /// [`Linear::forward_host`] with f32 activations for every row.
    fn forward_host_f32(lins: &[&Linear], x: &[f32], n: usize, device: &Device) -> Vec<Vec<f32>> {
        let packed: Option<Vec<&QMatrix>> = lins.iter().map(|l| l.packed.as_deref()).collect();
        if let Some(mats) = &packed {
            if quant::int8_activations() {
                return QMatrix::matmul_exact(mats, x, n);
            }
            if n <= quant::MAX_ROWS || lins.iter().any(|l| l.weight.is_none()) {
                return QMatrix::matmul_many(mats, x, n, false);
            }
        }
        lins.iter()
            .map(|l| {
                let x = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, l.dims()[0]]), device);
                to_host(Self::product(x, l.dense(device)))
            })
            .collect()
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let out = self.dims()[1];
        // The packed kernel runs on the host, outside any autodiff graph, with f32
        // activations whatever `quant::set_int8_activations` says: on the CPU this path
        // multiplies given tokens only (a continuation scored by likelihood, parity's
        // reference), never sampled ones, which generation runs through `forward_paged`.
        if let Some(q) = &self.packed
            && (b * s <= quant::MAX_ROWS || self.weight.is_none())
            && !x.is_autodiff()
        {
            let device = x.device();
            let host = x
                .into_data()
                .try_to_vec::<f32>()
                .expect("activations on the CPU backend are f32");
            let y = q.matmul_with(&host, b * s, false);
            return Tensor::from_data(TensorData::new(y, [b, s, out]), &device);
        }
        let w = self.dense(&x.device().inner());
        Self::product(x.reshape([b * s, d]), w).reshape([b, s, out])
    }
}

#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor<1>,
    /// The same weight on the host, for the serving path's host buffers.
    host: Vec<f32>,
    eps: f64,
}

impl RmsNorm {
    /// The weight on the host and epsilon.
    pub(crate) fn host(&self) -> (&[f32], f32) {
        (&self.host, self.eps as f32)
    }

    /// Each row of `x` (rows of the weight's width, on the host) normalized and scaled.
    pub(crate) fn forward_host(&self, x: &[f32]) -> Vec<f32> {
        let d = self.host.len();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(d) {
            let var = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + self.eps as f32).sqrt();
            out.extend(row.iter().zip(&self.host).map(|(v, w)| v * inv * w));
        }
        out
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let var = x.clone().powi_scalar(2).mean_dim(2);
        let x = x * var.add_scalar(self.eps).sqrt().recip();
        x * self.weight.clone().unsqueeze::<3>()
    }
}

#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// `down(silu(gate(x)) · up(x))` for `n` rows on the host (those marked in `int8` with
    /// 8-bit activations).
    fn forward_host(&self, x: &[f32], n: usize, int8: &[bool], lora: &Lora<'_>, device: &Device) -> Vec<f32> {
        let [gate, up]: [Vec<f32>; 2] = lora.apply_host(&[(&self.gate_proj, Target::Gate), (&self.up_proj, Target::Up)], x, n, int8, device).try_into().expect("two projections");
        let h: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
        lora.apply_host_one(&self.down_proj, Target::Down, &h, n, int8, device)
    }

    fn forward(&self, x: Tensor<3>, lora: &Lora<'_>) -> Tensor<3> {
        let xd = lora.input(&x);
        let gate = silu(lora.apply(&self.gate_proj, Target::Gate, x.clone(), &xd));
        let h = gate * lora.apply(&self.up_proj, Target::Up, x, &xd);
        let hd = lora.input(&h);
        lora.apply(&self.down_proj, Target::Down, h, &hd)
    }
}

/// One layer's adapters as the forward pass sees them: `y = x·W + s·dropout(x)·A·B` for
/// each adapted projection, `x·W` for the others. Rows of a packed batch may each have
/// their own adapter: a group covers a range of the flattened `batch × seq` rows (or all
/// of them), and rows outside every group see the base alone.
struct Lora<'a> {
    groups: Vec<LoraGroup<'a>>,
    /// Dropout probability; zero outside training.
    dropout: f64,
}

struct LoraGroup<'a> {
    layer: &'a LayerAdapter,
    scale: f64,
    /// Flattened rows, in order and disjoint across groups; None for every row.
    rows: Option<std::ops::Range<usize>>,
}

impl<'a> Lora<'a> {
    const NONE: Lora<'static> = Lora {
        groups: Vec::new(),
        dropout: 0.0,
    };

    /// Layer `i` of one adapter over every row.
    fn whole(adapter: Option<&'a Adapter>, i: usize, dropout: f64) -> Self {
        match adapter {
            Some(a) => Lora {
                groups: vec![LoraGroup {
                    layer: &a.layers[i],
                    scale: a.config.scale(),
                    rows: None,
                }],
                dropout,
            },
            None => Lora::NONE,
        }
    }

    /// The adapters' input: `x` with dropout applied, shared by every projection that
    /// reads the same `x` (one mask per input rather than one per projection).
    fn input(&self, x: &Tensor<3>) -> Option<Tensor<3>> {
        if self.groups.is_empty() {
            return None;
        }
        if self.dropout <= 0.0 {
            return Some(x.clone());
        }
        let keep = x.random_like(burn::tensor::Distribution::Bernoulli(1.0 - self.dropout));
        Some(x.clone() * keep.div_scalar(1.0 - self.dropout))
    }

    /// As [`Lora::apply`] for each `(projection, target)` reading the same `n` rows on the
    /// host (inference: no dropout), the base's product with 8-bit activations for the rows
    /// marked in `int8` ([`Linear::forward_host`]). The adapters' products go through
    /// [`exact_product`], so a row's bits do not depend on how many share its adapter.
    fn apply_host(&self, projections: &[(&Linear, Target)], x: &[f32], n: usize, int8: &[bool], device: &Device) -> Vec<Vec<f32>> {
        debug_assert!(self.dropout <= 0.0, "the host path runs inference only");
        let lins: Vec<&Linear> = projections.iter().map(|(l, _)| *l).collect();
        let mut ys = Linear::forward_host(&lins, x, n, int8, device);
        let d = x.len() / n;
        for (&(_, target), y) in projections.iter().zip(&mut ys) {
            let out = y.len() / n;
            for g in &self.groups {
                let Some(p) = g.layer.get(target) else { continue };
                let r = g.rows.clone().unwrap_or(0..n);
                let (a, b) = p.host();
                let xa = exact_product(&x[r.start * d..r.end * d], a, a.len() / d);
                let scale = g.scale as f32;
                for (y, dl) in y[r.start * out..r.end * out].iter_mut().zip(exact_product(&xa, b, out)) {
                    *y += dl * scale;
                }
            }
        }
        ys
    }

    /// [`Lora::apply_host`] for one projection.
    fn apply_host_one(&self, base: &Linear, target: Target, x: &[f32], n: usize, int8: &[bool], device: &Device) -> Vec<f32> {
        self.apply_host(&[(base, target)], x, n, int8, device).pop().expect("one output per projection")
    }

    fn apply(&self, base: &Linear, target: Target, x: Tensor<3>, xd: &Option<Tensor<3>>) -> Tensor<3> {
        let y = base.forward(x);
        let Some(xd) = xd else { return y };
        let [b, s, d] = xd.dims();
        let out = y.dims()[2];
        let rows = xd.clone().reshape([b * s, d]);
        let delta = |x: Tensor<2>, g: &LoraGroup<'_>| g.layer.get(target).map(|p| x.matmul(p.a.clone()).matmul(p.b.clone()).mul_scalar(g.scale));
        if let [g @ LoraGroup { rows: None, .. }] = self.groups.as_slice() {
            return match delta(rows, g) {
                Some(dl) => y + dl.reshape([b, s, out]),
                None => y,
            };
        }
        // Per-row adapters: each group's delta on its rows, zeros between them.
        let mut parts = Vec::new();
        let mut at = 0;
        for g in &self.groups {
            let r = g.rows.clone().expect("several groups each name their rows");
            if let Some(dl) = delta(rows.clone().narrow(0, r.start, r.len()), g) {
                if r.start > at {
                    parts.push(Tensor::zeros([r.start - at, out], &y.device()));
                }
                parts.push(dl);
                at = r.end;
            }
        }
        if parts.is_empty() {
            return y;
        }
        if at < b * s {
            parts.push(Tensor::zeros([b * s - at, out], &y.device()));
        }
        y + Tensor::cat(parts, 0).reshape([b, s, out])
    }
}

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// The per-layer key/value cache and, for every cached position of every row, its
/// rotary position and whether it is a real token (false for padding).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    positions: Vec<Vec<i64>>,
    valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            positions: Vec::new(),
            valid: Vec::new(),
        }
    }

    /// Cached positions per row (the same for every row: padding included).
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What every layer of one uncached step shares: the attention mask and rotary tables.
#[derive(Debug, Clone)]
pub struct LayerContext {
    mask: Tensor<4, Bool>,
    cos: Tensor<4>,
    sin: Tensor<4>,
}

/// One forward step's input: `batch × seq` tokens, row-major.
#[derive(Debug, Clone)]
pub struct Step {
    pub batch: usize,
    pub seq: usize,
    pub tokens: Vec<u32>,
    /// Rotary position of each token.
    pub positions: Vec<i64>,
    /// False where the token is padding.
    pub valid: Vec<bool>,
}

impl Step {
    /// A single unpadded sequence continuing after `start` cached tokens.
    pub fn single(tokens: &[u32], start: usize) -> Self {
        Self {
            batch: 1,
            seq: tokens.len(),
            tokens: tokens.to_vec(),
            positions: (start as i64..(start + tokens.len()) as i64).collect(),
            valid: vec![true; tokens.len()],
        }
    }
}

/// Which positions the output head is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position of each row (generation).
    Last,
    /// Every position (scoring, training).
    All,
}

/// The token embedding, `[vocab, hidden]`: a tensor, or the GGUF's blocks alone (rows
/// expanded as tokens are looked up).
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant, reason = "one per model")]
enum Embedding {
    Dense(Tensor<2>),
    Packed(Arc<QMatrix>),
}

#[derive(Clone, Debug)]
pub struct CausalLm {
    pub config: ModelConfig,
    device: Device,
    /// Whether the device's attention groups query heads over key/value heads itself
    /// (burn's CPU backend does; the GPU kernels want one key/value head per query head).
    native_gqa: bool,
    inv_freq: Vec<f64>,
    embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `[hidden, vocab]`; the transposed embedding when the head is tied.
    lm_head: Linear,
    /// Whether the frozen products run in bf16 ([`CausalLm::bf16_base`]).
    bf16: bool,
}

impl CausalLm {
    /// Builds the model from any weight source, checking every tensor's shape.
    pub fn load(config: ModelConfig, src: &dyn WeightSource, device: &Device) -> Result<Self> {
        Self::load_within(config, src, device, dense_copy_limit(), false)
    }

    /// [`CausalLm::load`], keeping f32 copies beside quantized blocks only while they take
    /// at most `dense_limit` bytes (0: the blocks alone); with `bf16`, each frozen
    /// projection and the head stored in bf16 as it is read ([`CausalLm::bf16_base`] on
    /// the way, not after: the f32 weights are never all held at once).
    pub fn load_within(config: ModelConfig, src: &dyn WeightSource, device: &Device, dense_limit: usize, bf16: bool) -> Result<Self> {
        let c = &config;
        let tensor = |name: &str, expect: &[usize]| -> Result<HostTensor> {
            let (shape, data) = src.require(name)?;
            if shape != expect {
                return Err(EngineError::Unsupported {
                    path: src.origin().into(),
                    field: format!("tensor `{name}` shape"),
                    detail: format!("{shape:?}, but the config implies {expect:?}"),
                });
            }
            Ok((shape, data))
        };
        let t2 = |name: &str, rows: usize, cols: usize| -> Result<Tensor<2>> {
            let (_, data) = tensor(name, &[rows, cols])?;
            Ok(Tensor::from_data(TensorData::new(data, [rows, cols]), device))
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            let (_, data) = tensor(name, &[c.hidden_size])?;
            Ok(RmsNorm {
                weight: Tensor::from_data(TensorData::new(data.clone(), [c.hidden_size]), device),
                host: data,
                eps: c.rms_norm_eps,
            })
        };
        // The quantized kernel runs on host memory: only where tensors live there too.
        let on_cpu = *device == Device::flex();
        let packed = |name: &str| -> Result<Option<QMatrix>> {
            if on_cpu { src.packed(name) } else { Ok(None) }
        };
        // Past the limit, a tensor that comes in blocks is never expanded, not even while
        // loading.
        let f32_bytes: usize = c.tensor_shapes().iter().map(|(_, shape)| 4 * shape.iter().product::<usize>()).sum();
        let blocks_alone = |name: &str, out: usize, inp: usize| -> Result<Option<Arc<QMatrix>>> {
            if f32_bytes <= dense_limit {
                return Ok(None);
            }
            let Some(q) = packed(name)? else { return Ok(None) };
            if [q.rows(), q.cols()] != [out, inp] {
                return Err(EngineError::Unsupported {
                    path: src.origin().into(),
                    field: format!("tensor `{name}` shape"),
                    detail: format!("{:?}, but the config implies {:?}", [q.rows(), q.cols()], [out, inp]),
                });
            }
            Ok(Some(Arc::new(q)))
        };
        let lin = |name: &str, out: usize, inp: usize| {
            if let Some(q) = blocks_alone(name, out, inp)? {
                return Ok(Linear { weight: None, packed: Some(q) });
            }
            let (_, data) = tensor(name, &[out, inp])?;
            let mut l = Linear::from_hf_host(&data, out, inp, device, packed(name)?);
            if bf16 {
                l.store_bf16();
            }
            Ok(l)
        };
        let (h, q_dim, kv_dim) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: lin(&format!("{p}.self_attn.q_proj.weight"), q_dim, h)?,
                    k_proj: lin(&format!("{p}.self_attn.k_proj.weight"), kv_dim, h)?,
                    v_proj: lin(&format!("{p}.self_attn.v_proj.weight"), kv_dim, h)?,
                    o_proj: lin(&format!("{p}.self_attn.o_proj.weight"), h, q_dim)?,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: lin(&format!("{p}.mlp.gate_proj.weight"), c.intermediate_size, h)?,
                    up_proj: lin(&format!("{p}.mlp.up_proj.weight"), c.intermediate_size, h)?,
                    down_proj: lin(&format!("{p}.mlp.down_proj.weight"), h, c.intermediate_size)?,
                },
            });
        }
        let embed_tokens = match blocks_alone("model.embed_tokens.weight", c.vocab_size, h)? {
            Some(q) => Embedding::Packed(q),
            None => Embedding::Dense(t2("model.embed_tokens.weight", c.vocab_size, h)?),
        };
        let mut lm_head = match (&embed_tokens, c.tie_word_embeddings) {
            (_, false) => lin("lm_head.weight", c.vocab_size, h)?,
            (Embedding::Packed(q), true) => Linear {
                weight: None,
                packed: Some(q.clone()),
            },
            (Embedding::Dense(t), true) => Linear::from_hf(t.clone(), packed("model.embed_tokens.weight")?),
        };
        if bf16 {
            // A tied head's bf16 copy beside the f32 embedding, as `bf16_base` makes it.
            lm_head.store_bf16();
        }
        Ok(Self {
            inv_freq: config.rope_inv_freq(),
            norm: norm("model.norm.weight")?,
            config,
            device: device.clone(),
            native_gqa: on_cpu,
            bf16,
            embed_tokens,
            layers,
            lm_head,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of dense projection weights held (f32 copies beside quantized blocks, or
    /// weights that came dense): 0 for a model loaded with its blocks alone.
    pub fn dense_projection_bytes(&self) -> usize {
        let dense = |l: &Linear| l.weight.as_ref().map_or(0, |w| w.shape().num_elements() * w.dtype().size());
        self.projections().chain([&self.lm_head]).map(dense).sum()
    }

    /// Every weight copied to the host under its Hugging Face name (`[out, in]`
    /// projections), for export and merging.
    pub fn to_memory_weights(&self) -> MemoryWeights {
        let mut tensors = std::collections::BTreeMap::new();
        let host = |t: &Tensor<1>| t.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 weights");
        let mut put = |name: String, lin: &Linear| {
            let [i, o] = lin.dims();
            tensors.insert(name, (vec![o, i], lin.to_hf_host()));
        };
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            let m = &l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                put(format!("{p}.{name}.weight"), lin);
            }
        }
        if !self.config.tie_word_embeddings {
            put("lm_head.weight".into(), &self.lm_head);
        }
        let c = &self.config;
        for (i, l) in self.layers.iter().enumerate() {
            for (name, norm) in [("input_layernorm", &l.input_layernorm), ("post_attention_layernorm", &l.post_attention_layernorm)] {
                tensors.insert(format!("model.layers.{i}.{name}.weight"), (vec![c.hidden_size], host(&norm.weight)));
            }
        }
        tensors.insert("model.norm.weight".into(), (vec![c.hidden_size], host(&self.norm.weight)));
        let embed = match &self.embed_tokens {
            Embedding::Dense(t) => t.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 weights"),
            Embedding::Packed(q) => q.dequantize(),
        };
        tensors.insert("model.embed_tokens.weight".into(), (vec![c.vocab_size, c.hidden_size], embed));
        MemoryWeights {
            tensors,
            origin: "model".into(),
        }
    }

    /// Runs one step, appending its keys and values to `cache`, and returns logits
    /// `[batch, seq or 1, vocab]`.
    pub fn forward(&self, step: &Step, cache: &mut KvCache, which: Logits) -> Tensor<3> {
        in_pool(|| self.forward_with(step, cache, which, None))
    }

    /// [`forward`](Self::forward) through a LoRA adapter (inference: no dropout).
    pub fn forward_with(&self, step: &Step, cache: &mut KvCache, which: Logits, adapter: Option<&Adapter>) -> Tensor<3> {
        let x = self.hidden(step, cache, adapter, false);
        let x = match which {
            Logits::All => x,
            Logits::Last => {
                let s = x.dims()[1];
                x.narrow(1, s - 1, 1)
            }
        };
        self.head(x)
    }

    /// The output head: final norm, then the projection to the vocabulary.
    /// Whether the model's tensors live in host memory (burn's CPU backend), where steps
    /// run on host buffers and the quantized kernels.
    pub fn on_host(&self) -> bool {
        self.device == Device::flex()
    }

    /// The output projection, `[hidden, vocab]`.
    pub(crate) fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    pub fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.lm_head.forward(self.norm.forward(hidden))
    }

    /// Keeps the seven projections of every layer as 4-bit blocks only (the GGUF's own
    /// Q4/Q8 blocks, or `ty` for dense weights), expanded on each use: QLoRA's frozen
    /// base. Returns the bytes the dense copies held.
    pub fn quantize_base(&mut self, ty: crate::gguf::GgmlType) -> Result<usize> {
        let mut freed = 0;
        for lin in self.projections_mut() {
            if lin.weight.is_some() {
                let [i, o] = lin.dims();
                freed += i * o * 4;
            }
            lin.drop_dense(ty)?;
        }
        Ok(freed)
    }

    /// The seven frozen projections of every decoder layer (the head excluded).
    fn projections(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
        })
    }

    /// [`CausalLm::projections`], to change them.
    fn projections_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|l| {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
        })
    }

    /// Readies the frozen base a training run asks for, after [`crate::training_loader`]'s
    /// load: with `qlora` the projections become 4-bit blocks ([`Self::quantize_base`],
    /// Q4_0 for dense weights), then with `bf16` whatever is still f32 goes to bf16
    /// ([`Self::bf16_base`]; nothing where it loaded in bf16, QLoRA's blocks stay blocks).
    /// Returns the bytes QLoRA's blocks freed.
    pub fn training_base(&mut self, qlora: bool, bf16: bool) -> Result<usize> {
        let freed = if qlora { self.quantize_base(crate::gguf::GgmlType::Q4_0)? } else { 0 };
        if bf16 {
            self.bf16_base();
        }
        Ok(freed)
    }

    /// Mixed precision for training: the frozen projections and the output head are
    /// stored in bf16 and multiply in bf16 (accumulating in f32); norms, attention, the
    /// loss and the LoRA weights (the trainable master copies) stay f32. Returns the bytes
    /// the projections' f32 copies took beyond their bf16 ones (a tied head's f32 copy
    /// stays, as the embedding). Projections kept only as quantized blocks (QLoRA) stay
    /// blocks; the CPU's training step expands them to bf16 for its products where it
    /// multiplies on AMX tiles (QLoRA's usual 4-bit storage with bf16 compute).
    pub fn bf16_base(&mut self) -> usize {
        self.bf16 = true;
        let freed: usize = self.projections_mut().map(Linear::store_bf16).sum();
        let head = self.lm_head.store_bf16();
        freed + if self.config.tie_word_embeddings { 0 } else { head }
    }

    /// Whether [`CausalLm::bf16_base`] made the frozen products bf16.
    pub fn bf16_products(&self) -> bool {
        self.bf16
    }

    /// The masks and rotary tables of a fresh (uncached) step, for running layers one by
    /// one ([`layer`](Self::layer)).
    pub fn layer_context(&self, step: &Step) -> LayerContext {
        let (b, s) = (step.batch, step.seq);
        let cache = KvCache {
            layers: Vec::new(),
            positions: (0..b).map(|r| step.positions[r * s..(r + 1) * s].to_vec()).collect(),
            valid: (0..b).map(|r| step.valid[r * s..(r + 1) * s].to_vec()).collect(),
        };
        let mask = self.attention_mask(&cache, 0, s);
        let (cos, sin) = self.rope_tables(&step.positions, b, s);
        LayerContext { mask, cos, sin }
    }

    /// The token embeddings of a step, `[batch, seq, hidden]`.
    pub fn embed(&self, step: &Step) -> Tensor<3> {
        match &self.embed_tokens {
            Embedding::Dense(t) => {
                let ids: Vec<i64> = step.tokens.iter().map(|&t| i64::from(t)).collect();
                let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [step.batch, step.seq]), &self.device);
                embedding(t.clone(), ids)
            }
            Embedding::Packed(q) => {
                let rows: Vec<f32> = step.tokens.iter().flat_map(|&t| q.row(t as usize)).collect();
                Tensor::from_data(TensorData::new(rows, [step.batch, step.seq, q.cols()]), &self.device)
            }
        }
    }

    /// Decoder layer `i` on `x` without a KV cache (training, layer by layer).
    pub fn layer(&self, i: usize, x: Tensor<3>, ctx: &LayerContext, adapter: Option<&Adapter>, train: bool) -> Tensor<3> {
        self.decoder_layer(i, x, ctx, &mut None, adapter, train)
    }

    fn decoder_layer(
        &self,
        i: usize,
        x: Tensor<3>,
        ctx: &LayerContext,
        kv: &mut Option<(Tensor<4>, Tensor<4>)>,
        adapter: Option<&Adapter>,
        train: bool,
    ) -> Tensor<3> {
        let layer = &self.layers[i];
        let dropout = match (adapter, train) {
            (Some(a), true) => a.config.dropout,
            _ => 0.0,
        };
        let lora = Lora::whole(adapter, i, dropout);
        let h = layer.input_layernorm.forward(x.clone());
        let h = self.attention(&layer.self_attn, h, &ctx.cos, &ctx.sin, &ctx.mask, kv, &lora);
        let x = x + h;
        let h = layer.mlp.forward(layer.post_attention_layernorm.forward(x.clone()), &lora);
        x + h
    }

    /// Runs one step and returns the last layer's hidden states `[batch, seq, hidden]`
    /// (before the final norm). With `train`, the adapter applies its dropout.
    pub fn hidden(&self, step: &Step, cache: &mut KvCache, adapter: Option<&Adapter>, train: bool) -> Tensor<3> {
        let (b, s) = (step.batch, step.seq);
        assert_eq!(step.tokens.len(), b * s, "step tokens must be batch × seq");
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        if cache.valid.is_empty() {
            cache.positions = vec![Vec::new(); b];
            cache.valid = vec![Vec::new(); b];
        }
        assert_eq!(cache.valid.len(), b, "cache batch size differs from the step's");
        let past = cache.len();
        for r in 0..b {
            cache.positions[r].extend_from_slice(&step.positions[r * s..(r + 1) * s]);
            cache.valid[r].extend_from_slice(&step.valid[r * s..(r + 1) * s]);
        }
        let mask = self.attention_mask(cache, past, s);
        let (cos, sin) = self.rope_tables(&step.positions, b, s);
        let ctx = LayerContext { mask, cos, sin };
        let mut x = self.embed(step);
        for (i, kv) in cache.layers.iter_mut().enumerate() {
            x = self.decoder_layer(i, x, &ctx, kv, adapter, train);
        }
        x
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        attn: &Attention,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Tensor<4, Bool>,
        kv: &mut Option<(Tensor<4>, Tensor<4>)>,
        lora: &Lora<'_>,
    ) -> Tensor<3> {
        let c = &self.config;
        let [b, s, _] = x.dims();
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, c.head_dim]).swap_dims(1, 2);
        let xd = lora.input(&x);
        let q = heads(lora.apply(&attn.q_proj, Target::Q, x.clone(), &xd), c.num_heads);
        let k = heads(lora.apply(&attn.k_proj, Target::K, x.clone(), &xd), c.num_kv_heads);
        let v = heads(lora.apply(&attn.v_proj, Target::V, x, &xd), c.num_kv_heads);
        let q = apply_rope(q, cos, sin);
        let k = apply_rope(k, cos, sin);
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        // The autodiff backend differentiates attention through plain matmuls, which do
        // not group heads either.
        let (k, v, mask) = if self.native_gqa && !q.is_autodiff() {
            (k, v, mask.clone())
        } else {
            let rep = c.num_heads / c.num_kv_heads;
            let [_, _, s_q, total] = mask.dims();
            (repeat_kv(k, rep), repeat_kv(v, rep), mask.clone().expand([b, c.num_heads, s_q, total]))
        };
        // Through autodiff, attention keeps its inputs rather than every layer's
        // probabilities, and recomputes them in the backward pass.
        let out = if q.is_autodiff() {
            attention::attention(q, k, v, mask)
        } else {
            burn::tensor::module::attention(q, k, v, Some(mask), None, AttentionModuleOptions::default())
        };
        let out = out.swap_dims(1, 2).reshape([b, s, c.num_heads * c.head_dim]);
        let od = lora.input(&out);
        lora.apply(&attn.o_proj, Target::O, out, &od)
    }

    /// `[batch, 1, seq, past + seq]`, true where a query must not see a key: a later
    /// position, padding (except the query itself, so no row is fully masked), or a key
    /// outside Mistral's sliding window.
    fn attention_mask(&self, cache: &KvCache, past: usize, s: usize) -> Tensor<4, Bool> {
        let b = cache.valid.len();
        let total = past + s;
        let window = self.config.sliding_window.map(|w| w as i64);
        let mut m = Vec::with_capacity(b * s * total);
        for r in 0..b {
            let (pos, valid) = (&cache.positions[r], &cache.valid[r]);
            for i in 0..s {
                let qi = past + i;
                for j in 0..total {
                    let outside = window.is_some_and(|w| pos[qi] - pos[j] >= w);
                    m.push(j > qi || (j != qi && (!valid[j] || outside)));
                }
            }
        }
        Tensor::from_data(TensorData::new(m, [b, 1, s, total]), &self.device)
    }

    /// Rotary cos/sin for each token, `[batch, 1, seq, head_dim]` (halves repeated, as
    /// Hugging Face lays them out).
    fn rope_tables(&self, positions: &[i64], b: usize, s: usize) -> (Tensor<4>, Tensor<4>) {
        let hd = self.config.head_dim;
        let mut cos = Vec::with_capacity(b * s * hd);
        let mut sin = Vec::with_capacity(b * s * hd);
        for &p in positions {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    // f32 angle as Hugging Face computes it, then cos/sin.
                    let angle = (p as f32) * (f as f32);
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let t = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [b, 1, s, hd]), &self.device);
        (t(cos), t(sin))
    }
}

/// `[b, kv_heads, t, d]` → `[b, kv_heads · rep, t, d]`, each key/value head repeated for
/// the `rep` query heads that share it.
fn repeat_kv(x: Tensor<4>, rep: usize) -> Tensor<4> {
    if rep == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, kvh, rep, t, d]).reshape([b, kvh * rep, t, d])
}

fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// `x · m` on the host for rows of `x` (`[n, k]`) and `m` (`[k, w]`): each output one chain
/// of fused multiply-adds over `k` in order, so a row's bits do not depend on the rows
/// beside it (the adapters' factors, as [`QMatrix::matmul_exact`] is for the base: burn's
/// gemm sums a row differently by the number of rows).
fn exact_product(x: &[f32], m: &[f32], w: usize) -> Vec<f32> {
    #[inline(always)]
    fn body(x: &[f32], m: &[f32], w: usize) -> Vec<f32> {
        let k = m.len() / w;
        let mut out = vec![0f32; x.len() / k * w];
        for (x, out) in x.chunks_exact(k).zip(out.chunks_exact_mut(w)) {
            let mut j = 0;
            while j < w {
                j += match w - j {
                    r if r >= 64 => outputs::<64>(x, m, w, j, out),
                    r if r >= 16 => outputs::<16>(x, m, w, j, out),
                    r if r >= 8 => outputs::<8>(x, m, w, j, out),
                    _ => outputs::<1>(x, m, w, j, out),
                };
            }
        }
        out
    }
    /// One row's outputs `j..j + J`, their sums kept in registers over `k` (a sum carried
    /// through memory waits on a store at every term), the widest `J` that fits: several
    /// chains in flight where the outputs allow.
    #[inline(always)]
    fn outputs<const J: usize>(x: &[f32], m: &[f32], w: usize, j: usize, out: &mut [f32]) -> usize {
        let mut acc = [0f32; J];
        for (kk, &xv) in x.iter().enumerate() {
            let row: &[f32; J] = m[kk * w + j..][..J].try_into().expect("J columns");
            for (a, &mv) in acc.iter_mut().zip(row) {
                *a = xv.mul_add(mv, *a);
            }
        }
        out[j..j + J].copy_from_slice(&acc);
        J
    }
    /// `body` with the fused multiply-add instruction, eight lanes at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn fma(x: &[f32], m: &[f32], w: usize) -> Vec<f32> {
        body(x, m, w)
    }
    assert!(w > 0 && m.len().is_multiple_of(w) && x.len().is_multiple_of(m.len() / w), "x is [n, k] and m [k, w]");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features `fma` is compiled for.
        #[allow(unsafe_code)]
        return unsafe { fma(x, m, w) };
    }
    body(x, m, w)
}

/// A CPU tensor's values, row-major.
fn to_host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 values")
}

/// Runs `f` on a worker of rayon's global pool. A parallel loop started from outside the
/// pool wakes a worker and parks the caller until it is done; a decode step runs a few
/// hundred small ones (every projection of every layer), so from outside, the wake-ups
/// cost more than the arithmetic. From inside, the caller's thread takes part in each loop.
pub(crate) fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() { f() } else { rayon::scope(|_| f()) }
}

#[cfg(test)]
mod tests {
    /// Every output of the adapters' product is one fused multiply-add per term in `k`'s
    /// order, whatever the width's chunks (64, 16, 8, 1) and the number of rows.
    #[test]
    fn the_exact_product_is_one_fused_chain_per_output() {
        let vals = |n: usize, seed: u32| -> Vec<f32> { (0..n as u32).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32 / 1000.0 - 1.0).collect() };
        for (n, k, w) in [(1, 576, 16), (3, 576, 8), (5, 16, 576), (2, 40, 93), (1, 7, 1)] {
            let (x, m) = (vals(n * k, 1), vals(k * w, 2));
            let got = super::exact_product(&x, &m, w);
            for i in 0..n {
                for j in 0..w {
                    let want = (0..k).fold(0f32, |acc, kk| x[i * k + kk].mul_add(m[kk * w + j], acc));
                    assert_eq!(got[i * w + j].to_bits(), want.to_bits(), "n={n} k={k} w={w} [{i},{j}]");
                }
            }
            let alone = super::exact_product(&x[..k], &m, w);
            assert_eq!(alone, got[..w], "a row alone");
        }
    }
}
