//! Attention whose backward pass recomputes its probabilities, as FlashAttention's does.
//!
//! burn's autodiff differentiates attention through its unfused fallback, so every layer's
//! scores and probabilities (`[batch, heads, seq, seq]` each) stay alive until the
//! backward pass: at 8 × 1024 tokens and 32 heads that is 1 GiB a tensor, several a layer,
//! and the 1.1B step did not fit on an 80 GB GPU (BENCHMARKS.md, session 26). Here the
//! forward pass runs the backend's own attention on plain tensors (on CUDA, cubecl's
//! unfused kernels: its flash kernels are chosen only under burn's autotuning, which this
//! build leaves off), whose scores are freed once the output exists, and keeps only the
//! queries, keys, values, mask and output; the backward pass recomputes one layer's
//! probabilities from them, in f32 whatever the inputs' type, so the `seq²` tensors live
//! during that layer's backward pass alone.
//!
//! Without autodiff, [`attention`] is the backend's attention itself.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, FloatDType, Tensor};

/// `softmax(q·kᵀ/√d + mask)·v` over `[batch, heads, seq, head_dim]` queries and
/// `[batch, heads, keys, head_dim]` keys and values (heads already repeated for grouped
/// queries); `mask` (`[batch, heads, seq, keys]`) is true where a query must not see a key.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4, Bool>) -> Tensor<4> {
    let out = <Dispatch as RecomputingAttention>::recomputing_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), mask.into_dispatch());
    Tensor::from_dispatch(out)
}

/// The operation on each backend: the backend's attention, and on autodiff a backward pass
/// of its own.
#[backend_extension(Flex, Cube: cfg(any(feature = "cuda", feature = "wgpu")), Autodiff)]
pub trait RecomputingAttention: Backend {
    fn recomputing_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>) -> FloatTensor<Self> {
        Self::attention(q, k, v, Some(mask), None, AttentionModuleOptions::default())
    }
}

impl RecomputingAttention for burn::backend::Flex {}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl RecomputingAttention for burn::backend::Cube {}

/// What the backward pass keeps: the inputs (as checkpointed nodes), the output and the mask.
type Kept<B> = (NodeId, NodeId, NodeId, FloatTensor<B>, BoolTensor<B>);

#[derive(Debug)]
struct Recompute;

impl<B: Backend> Backward<B, 3> for Recompute {
    type State = Kept<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let (q, k, v, out, mask) = ops.state;
        let (q, k, v) = (checkpointer.retrieve_node_output(q), checkpointer.retrieve_node_output(k), checkpointer.retrieve_node_output(v));
        for (node, grad) in ops.parents.into_iter().zip(input_grads::<B>(q, k, v, out, mask, dout)) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: RecomputingAttention, C: CheckpointStrategy> RecomputingAttention for Autodiff<B, C> {
    fn recomputing_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: BoolTensor<Self>) -> FloatTensor<Self> {
        match Recompute.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let (qs, ks, vs) = (prep.checkpoint(&q), prep.checkpoint(&k), prep.checkpoint(&v));
                let out = B::recomputing_attention(q.into_primitive(), k.into_primitive(), v.into_primitive(), mask.clone());
                prep.finish((qs, ks, vs, out.clone(), mask), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::recomputing_attention(q.into_primitive(), k.into_primitive(), v.into_primitive(), mask)),
        }
    }
}

/// The gradients of `q`, `k` and `v` from that of the output: with `P` the probabilities
/// recomputed, `dv = Pᵀ·dout`, `dS = P ∘ (dout·vᵀ − rowsum(dout ∘ out))`,
/// `dq = dS·k/√d`, `dk = dSᵀ·q/√d`. Computed in f32 and returned in the inputs' type, as
/// the backends' forward passes compute bf16 attention in f32: in bf16, `P` and `dP` would
/// be rounder than the `rowsum` term, and each row of `dS` would no longer sum to zero.
fn input_grads<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, out: FloatTensor<B>, mask: BoolTensor<B>, dout: FloatTensor<B>) -> [FloatTensor<B>; 3] {
    let dtype = q.dtype();
    if dtype != DType::F32 {
        let f32 = |t| B::float_cast(t, FloatDType::F32);
        let back = |t| B::float_cast(t, FloatDType::from(dtype));
        return input_grads::<B>(f32(q), f32(k), f32(v), f32(out), mask, f32(dout)).map(back);
    }
    let scale = 1.0 / (q.shape().dims::<4>()[3] as f64).sqrt();
    let p = probabilities::<B>(q.clone(), k.clone(), mask, scale);
    let dv = B::float_matmul(B::float_transpose(p.clone()), dout.clone());
    let dp = B::float_matmul(dout.clone(), B::float_transpose(v));
    let delta = B::float_sum_dim(B::float_mul(dout, out), 3);
    let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, delta)), scale.into());
    let dq = B::float_matmul(ds.clone(), k);
    let dk = B::float_matmul(B::float_transpose(ds), q);
    [dq, dk, dv]
}

/// `softmax(q·kᵀ·scale, masked)` as burn's fallback computes it in the forward pass, so a
/// row the mask hides entirely gets zeros rather than NaN.
fn probabilities<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, mask: BoolTensor<B>, scale: f64) -> FloatTensor<B> {
    let scores = B::float_mul_scalar(B::float_matmul(q, B::float_transpose(k)), scale.into());
    let scores = B::float_mask_fill(scores, mask, f32::NEG_INFINITY.into());
    let finfo = scores.dtype().finfo().expect("a float tensor");
    let max = B::float_clamp_min(B::float_max_dim(scores.clone(), 3), finfo.min.into());
    let e = B::float_exp(B::float_sub(scores, max));
    let sum = B::float_clamp_min(B::float_sum_dim(e.clone(), 3), finfo.min_positive.into());
    B::float_div(e, sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::attention as fallback;
    use burn::tensor::{Device, Distribution, TensorData};

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// The output and the gradients of `q`, `k` and `v` are those of burn's fallback (which
    /// autodiff differentiates op by op), with a causal mask, a padded key and a row hidden
    /// but for its own key, as the model's masks are: at 7 positions, and at 600 (where the
    /// CPU backend's own attention takes its tiled path). In bf16 they are the f32 ones
    /// within bf16's rounding; at 600 positions only because the backward pass computes in
    /// f32 (in bf16 the rows of `dS` drift off zero and the test fails).
    #[test]
    fn gradients_equal_the_differentiated_fallback() {
        let device = Device::default();
        for ((b, h, s, d), dtype) in [((2, 3, 7, 8), FloatDType::F32), ((1, 2, 600, 8), FloatDType::F32), ((2, 3, 7, 8), FloatDType::BF16), ((1, 2, 600, 8), FloatDType::BF16)] {
            let rand = |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            // The bf16 case's reference reads the same (rounded) values in f32.
            let rounded = |t: Tensor<4>| t.cast(dtype).cast(FloatDType::F32);
            let (q, k, v, w) = (rounded(rand([b, h, s, d])), rounded(rand([b, h, s, d])), rounded(rand([b, h, s, d])), rand([b, h, s, d]));
            let mask: Vec<bool> = (0..b * h)
                .flat_map(|r| (0..s).flat_map(move |i| (0..s).map(move |j| j > i || (j != i && r % 2 == 1 && j == 0))))
                .collect();
            let mask = Tensor::<4, Bool>::from_data(TensorData::new(mask, [b, h, s, s]), &device);

            let run = |dtype: FloatDType, f: &dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>| {
                let [q, k, v] = [&q, &k, &v].map(|t| t.clone().cast(dtype).autodiff().require_grad());
                let out = f(q.clone(), k.clone(), v.clone());
                let grads = (out.clone().cast(FloatDType::F32) * w.clone().autodiff()).sum().backward();
                let grad = |t: &Tensor<4>| t.grad(&grads).expect("a tracked input has a gradient").cast(FloatDType::F32);
                (out.inner().cast(FloatDType::F32), [grad(&q), grad(&k), grad(&v)])
            };
            let (ours, our_grads) = run(dtype, &|q, k, v| attention(q, k, v, mask.clone()));
            let (theirs, their_grads) = run(FloatDType::F32, &|q, k, v| fallback(q, k, v, Some(mask.clone()), None, AttentionModuleOptions::default()));
            // bf16 keeps 8 bits of mantissa: the output and gradients round to a few parts in 1000.
            let tolerance = if dtype == FloatDType::F32 { 1e-4 } else { 2e-2 };
            let what = format!("{dtype:?} at {s} positions");
            assert!(max_diff(ours, theirs) < tolerance, "{what}: output");
            for (name, (a, b)) in ["q", "k", "v"].into_iter().zip(our_grads.into_iter().zip(their_grads)) {
                let scale = b.clone().abs().max().into_scalar::<f32>();
                let diff = max_diff(a, b);
                assert!(scale > 1e-2, "{what}: d{name} is not trivially zero");
                assert!(diff < tolerance * scale, "{what}: d{name} off by {diff} (largest {scale})");
            }
        }
    }
}
