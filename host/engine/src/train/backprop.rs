//! The LoRA training step on the CPU, written out by hand on host buffers.
//!
//! burn's autodiff records every small tensor op of the step and allocates each result;
//! here the forward pass keeps only what the backward pass reads, the backward pass
//! computes only what the adapters' gradients need (the frozen base gets none), and every
//! product is one call to the `gemm` crate across the thread pool, reading the frozen
//! weights where the model keeps them (no copy). On AVX-512 and AVX2 a projection's frozen
//! product and its adapter's share are one product instead (`panels`): `x·W + s·u·B`
//! forward, and backward `Σ dy·Wᵀ + mask ∘ (du·Aᵀ)` over the projections that read one
//! input. A bf16 base (mixed precision) is multiplied where it lies on AMX tiles where the
//! CPU has them (`quant::amx`), else widened to f32 one layer at a time. A batch's examples
//! are packed end to end instead of padded, each attending only to its own tokens.
//!
//! Attention keeps no probabilities: the forward pass stores each query's log-sum-exp and
//! the backward pass recomputes the scores from the queries and keys (as FlashAttention
//! does), so memory grows with the tokens, not with their square.
//!
//! Dropout masks come from a counter-based generator keyed by (step seed, layer, input)
//! and are kept as bits for the backward pass.

use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};
use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use super::{Encoded, mix};
use crate::lora::{Adapter, Target, host_vec};
use crate::model::paged::Rope;
use crate::model::{CausalLm, Linear, RmsNorm, Step};
use crate::quant::exp;

/// A matrix in a borrowed buffer: element `(i, j)` at `off + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    pub(super) data: &'a [f32],
    pub(super) off: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `[rows, cols]` matrix filling `data`.
    fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "a dense matrix fills its buffer");
        Self { data, off: 0, rs: cols, cs: 1, rows, cols }
    }

    /// `rows × cols` starting at `off`, rows `rs` apart, columns adjacent.
    fn strided(data: &'a [f32], off: usize, rs: usize, rows: usize, cols: usize) -> Self {
        Self { data, off, rs, cs: 1, rows, cols }
    }

    fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            rows: self.cols,
            cols: self.rows,
            ..self
        }
    }

    /// Whether every element lies inside the buffer (checked before each product).
    pub(super) fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// Products smaller than this (multiply-adds) run on the calling thread.
const PARALLEL_MACS: usize = 1 << 16;

/// `out = beta·a·b`, or `out += beta·a·b` with `accumulate`; `out` is row-major
/// `[a.rows, b.cols]`. `parallel` spreads it over the thread pool (never from inside a task
/// already running on it).
fn matmul(out: &mut [f32], a: Mat<'_>, b: Mat<'_>, beta: f32, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions agree");
    assert_eq!(out.len(), m * n, "the output holds [{m}, {n}]");
    assert!(a.in_bounds() && b.in_bounds(), "operands lie inside their buffers");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    if !parallel || threads == 1 || m * n * k < PARALLEL_MACS {
        return product(out, a, b, beta, accumulate, gemm::Parallelism::None);
    }
    if m >= threads * MIN_ROWS {
        // One block of rows per thread, each a whole product on its own: the gemm crate's
        // own split gained 1.4x from a second core here.
        let rows = m.div_ceil(threads);
        out.par_chunks_mut(rows * n).enumerate().for_each(|(i, o)| {
            let block = Mat {
                off: a.off + i * rows * a.rs,
                rows: o.len() / n,
                ..a
            };
            product(o, block, b, beta, accumulate, gemm::Parallelism::None);
        });
    } else {
        product(out, a, b, beta, accumulate, gemm::Parallelism::Rayon(threads));
    }
}

/// Rows per thread below which a product is not split by rows.
const MIN_ROWS: usize = 32;

/// [`matmul`] in one call to the gemm crate; operands checked by the caller.
fn product(out: &mut [f32], a: Mat<'_>, b: Mat<'_>, beta: f32, accumulate: bool, par: gemm::Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert!(a.in_bounds() && b.in_bounds() && out.len() == m * n && k == b.rows);
    // SAFETY: every index the product reads is inside `a.data` or `b.data` (the caller
    // checked that the last element of each lies inside), and it writes the `m × n`
    // elements of `out`, row-major, whose length is checked.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// A frozen projection's weight `[in, out]` as the step reads it: a view of the CPU
/// tensor's storage, the quantized blocks expanded for this use (QLoRA), or a bf16 base
/// (mixed precision): multiplied where it lies in bf16 (AMX tiles or AVX-512 BF16,
/// [`crate::quant::bf16_products`]), else widened to f32 for this use; QLoRA's blocks under
/// a bf16 base are expanded to bf16 for those products.
enum Frozen {
    View(FlexTensor),
    /// Hugging Face `[out, in]`, row-major.
    Expanded(Vec<f32>),
    /// A bf16 weight's storage widened to f32, read through the tensor's layout.
    Widened(Vec<f32>, FlexTensor),
    /// A bf16 weight in whole tiles, on a CPU with AMX or AVX-512 BF16.
    #[cfg(target_arch = "x86_64")]
    Tiles(FlexTensor),
    /// Quantized blocks expanded to bf16 for the bf16 products: `[out, in]` row-major (bf16
    /// bits).
    #[cfg(target_arch = "x86_64")]
    ExpandedTiles { w: Vec<u16>, out: usize, inp: usize },
}

/// A `[rows, cols]` view's storage as a [`Mat`].
fn view<'a>(data: &'a [f32], t: &FlexTensor, rows: usize, cols: usize) -> Mat<'a> {
    let l = t.layout();
    let (s, st) = (l.shape(), l.strides());
    assert_eq!([s[0], s[1]], [rows, cols], "the projection's shape");
    assert!(st[0] >= 0 && st[1] >= 0, "no flipped views");
    Mat {
        data,
        off: l.start_offset(),
        rs: st[0] as usize,
        cs: st[1] as usize,
        rows,
        cols,
    }
}

impl Frozen {
    /// The weight of `lin`; `bf16` when the model's frozen products are bf16
    /// ([`CausalLm::bf16_products`]).
    fn of(lin: &Linear, bf16: bool) -> Option<Self> {
        match lin.parts() {
            (Some(w), _) => {
                let t = w.clone().try_into_primitive::<Flex>().ok()?;
                if t.layout().num_dims() != 2 {
                    return None;
                }
                match t.dtype() {
                    DType::F32 => Some(Self::View(t)),
                    DType::BF16 => {
                        #[cfg(target_arch = "x86_64")]
                        if crate::quant::bf16_products() && Self::rows(&t).is_some_and(|m| crate::quant::amx::fits(m.rows, m.cols)) {
                            return Some(Self::Tiles(t));
                        }
                        let wide = t.storage::<half::bf16>().iter().map(|v| v.to_f32()).collect();
                        Some(Self::Widened(wide, t))
                    }
                    _ => None,
                }
            }
            (None, Some(q)) => {
                #[cfg(target_arch = "x86_64")]
                if bf16 && crate::quant::bf16_products() && crate::quant::amx::fits(q.rows(), q.cols()) {
                    let w = q.expand_with(|v| half::bf16::from_f32(v).to_bits());
                    return Some(Self::ExpandedTiles { w, out: q.rows(), inp: q.cols() });
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = bf16;
                Some(Self::Expanded(q.expand_with(|v| v)))
            }
            (None, None) => None,
        }
    }

    /// The bf16 matrix the tiles read and whether its rows are the inputs (`[in, out]`,
    /// else `[out, in]`); None off the tiles.
    #[cfg(target_arch = "x86_64")]
    fn on_tiles(&self) -> Option<(crate::quant::amx::Bf16Rows<'_>, bool)> {
        match self {
            Self::Tiles(t) => Some((Self::rows(t).expect("`of` checked the layout"), true)),
            &Self::ExpandedTiles { ref w, out, inp } => Some((crate::quant::amx::Bf16Rows { data: w, rows: out, cols: inp, stride: inp }, false)),
            _ => None,
        }
    }

    /// A bf16 `[in, out]` tensor whose storage holds it row by row (as `bf16_base`'s cast
    /// leaves every weight) as that matrix; None for other layouts.
    #[cfg(target_arch = "x86_64")]
    fn rows(t: &FlexTensor) -> Option<crate::quant::amx::Bf16Rows<'_>> {
        use half::slice::HalfFloatSliceExt;
        let l = t.layout();
        let (s, st) = (l.shape(), l.strides());
        (st[1] == 1 && st[0] >= s[1] as isize).then(|| crate::quant::amx::Bf16Rows {
            data: &t.storage::<half::bf16>().reinterpret_cast()[l.start_offset()..],
            rows: s[0],
            cols: s[1],
            stride: st[0] as usize,
        })
    }

    /// The weight as `[in, out]`, where it is f32.
    fn mat(&self, inp: usize, out: usize) -> Mat<'_> {
        match self {
            Self::View(t) => view(t.storage::<f32>(), t, inp, out),
            Self::Widened(data, t) => view(data, t, inp, out),
            Self::Expanded(w) => Mat::dense(w, out, inp).t(),
            #[cfg(target_arch = "x86_64")]
            Self::Tiles(_) | Self::ExpandedTiles { .. } => unreachable!("a bf16 weight on tiles is multiplied by `forward` and `backward`"),
        }
    }

    /// `y = x·W` (`y += ` with `accumulate`) for `x` `[n, inp]`, `y` `[n, out]`.
    fn forward(&self, y: &mut [f32], x: &[f32], n: usize, inp: usize, out: usize, accumulate: bool) {
        #[cfg(target_arch = "x86_64")]
        if let Some((m, in_rows)) = self.on_tiles() {
            // y[t][o] = Σᵢ x[t][i]·m[i][o] (`[in, out]` rows), or Σᵢ x[t][i]·m[o][i].
            return if in_rows { crate::quant::amx::cols_times(m, x, n, y, accumulate) } else { crate::quant::amx::rows_times(m, x, n, y, accumulate) };
        }
        matmul(y, Mat::dense(x, n, inp), self.mat(inp, out), 1.0, accumulate, true);
    }

    /// `dx = dy·Wᵀ` (`dx += ` with `accumulate`) for `dy` `[n, out]`, `dx` `[n, inp]`.
    fn backward(&self, dx: &mut [f32], dy: &[f32], n: usize, inp: usize, out: usize, accumulate: bool) {
        #[cfg(target_arch = "x86_64")]
        if let Some((m, in_rows)) = self.on_tiles() {
            // dx[t][i] = Σₒ dy[t][o]·m[i][o] (`[in, out]` rows), or Σₒ dy[t][o]·m[o][i].
            return if in_rows { crate::quant::amx::rows_times(m, dy, n, dx, accumulate) } else { crate::quant::amx::cols_times(m, dy, n, dx, accumulate) };
        }
        matmul(dx, Mat::dense(dy, n, out), self.mat(inp, out).t(), 1.0, accumulate, true);
    }
}

/// One adapted projection's factors on the host.
struct Pair {
    /// `[in, rank]`
    a: Vec<f32>,
    /// `[rank, out]`
    b: Vec<f32>,
}

/// The gradients of one pair, `[in, rank]` and `[rank, out]`.
struct PairGrad {
    a: Vec<f32>,
    b: Vec<f32>,
}

/// The step's shapes.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    d: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    inter: usize,
    rank: usize,
    scale: f32,
    dropout: f32,
}

/// A vector draw of the masks' words.
#[derive(Clone, Copy)]
enum Vector {
    Avx512,
    Avx2,
}

/// A dropout mask over one input: bit `i` is set where element `i` survives. Drawn from
/// a counter-based generator keyed by the input, so a run draws the same masks whatever
/// its threads do; 16 bits of hash per element, so `p` is rounded to a multiple of 2⁻¹⁶.
struct Mask {
    bits: Vec<u64>,
    /// `1 / (1 - p)`, the survivors' scale.
    keep: f32,
}

impl Mask {
    /// The mask of input `key` over `len` elements; None when `p` is zero.
    fn draw(key: u64, p: f32, len: usize) -> Option<Self> {
        if p <= 0.0 {
            return None;
        }
        let threshold = (f64::from(p) * 65536.0).round() as u64;
        let mut bits = vec![0u64; len.div_ceil(64)];
        let vector = Self::vector(threshold);
        bits.par_chunks_mut(1024).enumerate().for_each(|(i, words)| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `vector` checked the CPU's features and the threshold's width.
            #[allow(unsafe_code)]
            match vector {
                Some(Vector::Avx512) => return unsafe { Self::words_avx512(key, threshold, i * 1024, words) },
                Some(Vector::Avx2) => return unsafe { Self::words_avx2(key, threshold, i * 1024, words) },
                None => {}
            }
            let _ = vector;
            Self::words(key, threshold, i * 1024, words);
        });
        Some(Self { bits, keep: 1.0 / (1.0 - p) })
    }

    /// The vector draw that gives [`Self::words`]' words here, if any: for a threshold of
    /// 16 bits, on the AVX-512 kernel with DQ's 64-bit multiplies and BW's 16-bit
    /// compares, else on the AVX2 kernel.
    fn vector(threshold: u64) -> Option<Vector> {
        #[cfg(target_arch = "x86_64")]
        if threshold <= 0xFFFF {
            if crate::quant::avx512() && is_x86_feature_detected!("avx512dq") && is_x86_feature_detected!("avx512bw") {
                return Some(Vector::Avx512);
            }
            if crate::quant::avx2() || crate::quant::avx512() {
                return Some(Vector::Avx2);
            }
        }
        let _ = threshold;
        None
    }

    /// Words `first..` of the mask: word `w`'s bit `4q + s` is set where 16-bit field `s`
    /// of `mix(key, 16w + q)` is at least `threshold`.
    fn words(key: u64, threshold: u64, first: usize, words: &mut [u64]) {
        for (w, word) in (first..).zip(words) {
            *word = 0;
            for q in 0..16 {
                let h = mix(key, (w * 16 + q) as u64);
                for s in 0..4 {
                    if (h >> (16 * s)) & 0xFFFF >= threshold {
                        *word |= 1 << (q * 4 + s);
                    }
                }
            }
        }
    }

    /// [`Self::words`], eight hashes to a register: the 16-bit fields of eight hashes
    /// compared at once give 32 bits in the word's order.
    ///
    /// # Safety
    /// AVX-512 F, DQ and BW; `threshold` fits in 16 bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw")]
    #[allow(unsafe_code)]
    unsafe fn words_avx512(key: u64, threshold: u64, first: usize, words: &mut [u64]) {
        use std::arch::x86_64::*;
        let c = |v: u64| _mm512_set1_epi64(v as i64);
        let mixed = |b: __m512i| {
            let mut z = _mm512_xor_si512(c(key), _mm512_mullo_epi64(b, c(super::MIX[0])));
            z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<30>(z)), c(super::MIX[1]));
            z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<27>(z)), c(super::MIX[2]));
            _mm512_xor_si512(z, _mm512_srli_epi64::<31>(z))
        };
        let at = _mm512_set1_epi16(threshold as i16);
        let lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
        for (w, word) in (first..).zip(words) {
            let b = _mm512_add_epi64(c(w as u64 * 16), lanes);
            let low = _mm512_cmpge_epu16_mask(mixed(b), at);
            let high = _mm512_cmpge_epu16_mask(mixed(_mm512_add_epi64(b, c(8))), at);
            *word = u64::from(low) | u64::from(high) << 32;
        }
    }

    /// [`Self::words`], four hashes to a register. AVX2 has no 64-bit multiply: each is
    /// put together from 32-bit ones. Nor an unsigned 16-bit compare: a field is at least
    /// the threshold where it is its maximum with it.
    ///
    /// # Safety
    /// AVX2; `threshold` fits in 16 bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(unsafe_code)]
    unsafe fn words_avx2(key: u64, threshold: u64, first: usize, words: &mut [u64]) {
        use std::arch::x86_64::*;
        let c = |v: u64| _mm256_set1_epi64x(v as i64);
        // The low 64 bits of `a · m`: lo·lo + (hi·lo + lo·hi) << 32.
        let times = |a: __m256i, m: u64| {
            let (mlo, mhi) = (c(m & 0xFFFF_FFFF), c(m >> 32));
            let cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64::<32>(a), mlo), _mm256_mul_epu32(a, mhi));
            _mm256_add_epi64(_mm256_mul_epu32(a, mlo), _mm256_slli_epi64::<32>(cross))
        };
        let mixed = |b: __m256i| {
            let mut z = _mm256_xor_si256(c(key), times(b, super::MIX[0]));
            z = times(_mm256_xor_si256(z, _mm256_srli_epi64::<30>(z)), super::MIX[1]);
            z = times(_mm256_xor_si256(z, _mm256_srli_epi64::<27>(z)), super::MIX[2]);
            _mm256_xor_si256(z, _mm256_srli_epi64::<31>(z))
        };
        let at = _mm256_set1_epi16(threshold as i16);
        let kept = |h: __m256i| _mm256_cmpeq_epi16(_mm256_max_epu16(h, at), h);
        // 32 bits, one per field of eight hashes in order: the compares narrowed to bytes
        // (the pack interleaves the halves, the permute puts them back).
        let bits = |a: __m256i, b: __m256i| {
            let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(kept(a), kept(b)));
            u64::from(_mm256_movemask_epi8(bytes) as u32)
        };
        let lanes = _mm256_setr_epi64x(0, 1, 2, 3);
        for (w, word) in (first..).zip(words) {
            let b = _mm256_add_epi64(c(w as u64 * 16), lanes);
            let h = [0, 4, 8, 12].map(|q| mixed(_mm256_add_epi64(b, c(q))));
            *word = bits(h[0], h[1]) | bits(h[2], h[3]) << 32;
        }
    }

    fn kept(&self, i: usize) -> bool {
        (self.bits[i >> 6] >> (i & 63)) & 1 == 1
    }

    /// The multipliers of the eight elements from `i`, a multiple of 8: `keep` where an
    /// element survives, else 0. Groups of eight keep the mask's loops vectorized.
    #[inline(always)]
    fn lanes(&self, i: usize) -> [f32; 8] {
        let byte = (self.bits[i >> 6] >> (i & 63)) as u8;
        let ones = &BYTE_LANES[usize::from(byte)];
        std::array::from_fn(|j| ones[j] * self.keep)
    }

    /// `f(out, src, multiplier)` over the elements of `out` and `src`, which start at
    /// element `base` (a multiple of 8) of the masked input.
    #[inline(always)]
    fn zip(&self, base: usize, out: &mut [f32], src: &[f32], f: impl Fn(&mut f32, f32, f32)) {
        let mut os = out.chunks_exact_mut(8);
        let mut ss = src.chunks_exact(8);
        for (g, (o, s)) in (&mut os).zip(&mut ss).enumerate() {
            let k = self.lanes(base + 8 * g);
            for j in 0..8 {
                f(&mut o[j], s[j], k[j]);
            }
        }
        let tail = base + src.len() / 8 * 8;
        for (j, (o, &v)) in os.into_remainder().iter_mut().zip(ss.remainder()).enumerate() {
            f(o, v, if self.kept(tail + j) { self.keep } else { 0.0 });
        }
    }

    /// `x` with the mask applied and the survivors scaled; `x` itself without a mask.
    fn apply<'a>(mask: &Option<Self>, x: &'a [f32]) -> Cow<'a, [f32]> {
        let Some(m) = mask else { return Cow::Borrowed(x) };
        Cow::Owned(rows_map(x, x.len(), |base, out: &mut [f32], src: &[f32]| {
            m.zip(base, out, src, |o, v, k| *o = v * k);
        }))
    }

    /// `dx += ∂apply/∂x · dxd`.
    fn backward(mask: &Option<Self>, dx: &mut [f32], dxd: &[f32]) {
        let Some(m) = mask else { return add(dx, dxd) };
        par_rows(dx, |base, dx| m.zip(base, dx, &dxd[base..base + dx.len()], |g, v, k| *g += v * k));
    }
}

/// `BYTE_LANES[b][j]` is 1 where bit `j` of `b` is set, else 0: a mask byte as eight
/// multipliers.
static BYTE_LANES: [[f32; 8]; 256] = {
    let mut t = [[0f32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            if (b >> j) & 1 == 1 {
                t[b][j] = 1.0;
            }
            j += 1;
        }
        b += 1;
    }
    t
};

/// Elements per task of the elementwise loops.
const CHUNK: usize = 1 << 14;

/// `len` zeros, written by the thread pool a [`CHUNK`] per task. `vec![0.0; len]` zeroes
/// memory the allocator reuses on the calling thread alone while the other threads wait:
/// the step's buffers took 3 % of its samples that way at 2 threads.
fn zeros(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len].par_chunks_mut(CHUNK).for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first `len` elements were written just above.
    #[allow(unsafe_code)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// `f()`, compiled for AVX2 and FMA where the CPU kernel runs them, so that the loops of an
/// `#[inline(always)]` closure run eight lanes a register; the crate is built for baseline
/// x86-64, whose loops run four. The same operations in the same order: the same bits.
/// The loops over `exp` (SiLU, softmax) ran 1.4-1.5x faster; the masks' loops did not.
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if crate::quant::avx2() || crate::quant::avx512() {
            // SAFETY: the CPU kernel runs AVX2 and FMA.
            #[allow(unsafe_code)]
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Runs `f(offset, chunk)` over [`CHUNK`]-element chunks of `x` in parallel.
fn par_rows(x: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    x.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| f(i * CHUNK, c));
}

/// A new buffer of `len` elements filled chunk by chunk from `src` by `f(offset, out, src)`.
fn rows_map(src: &[f32], len: usize, f: impl Fn(usize, &mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = zeros(len);
    out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(i, (o, s))| f(i * CHUNK, o, s));
    out
}

/// RMSNorm over rows of width `w.len()`: the normalized, scaled rows and each row's
/// inverse root mean square.
fn rms_forward(x: &[f32], norm: &RmsNorm) -> (Vec<f32>, Vec<f32>) {
    let (w, eps) = norm.host();
    let d = w.len();
    let inv: Vec<f32> = x.par_chunks(d).map(|r| 1.0 / (crate::quant::dot_f32(r, r) / d as f32 + eps).sqrt()).collect();
    (rms_apply(x, &inv, w), inv)
}

/// `x · inv · w`, row by row.
fn rms_apply(x: &[f32], inv: &[f32], w: &[f32]) -> Vec<f32> {
    let d = w.len();
    let mut out = zeros(x.len());
    out.par_chunks_mut(d).zip(x.par_chunks(d)).zip(inv).for_each(|((o, r), &s)| {
        for ((o, &v), &w) in o.iter_mut().zip(r).zip(w) {
            *o = v * s * w;
        }
    });
    out
}

/// `dx += ∂(x·inv·w)/∂x · dy`: with `g = dy·w`, `dx = inv·g − x·inv³·(g·x)/d`.
fn rms_backward(dx: &mut [f32], dy: &[f32], x: &[f32], inv: &[f32], w: &[f32]) {
    let d = w.len();
    dx.par_chunks_mut(d).zip(dy.par_chunks(d).zip(x.par_chunks(d))).zip(inv).for_each(|((dx, (dy, x)), &s)| {
        let gx = dot3(dy, w, x);
        let c = s * s * s * gx / d as f32;
        for (((o, &g), &w), &x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
            *o += s * g * w - x * c;
        }
    });
}

/// Where each packed example's tokens lie.
struct Packing {
    /// `(first token, length)` per example.
    spans: Vec<(usize, usize)>,
    window: Option<usize>,
}

impl Packing {
    /// The keys of its example that query `i` sees: those up to `i`, within the window.
    fn seen(&self, i: usize) -> Range<usize> {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))..i + 1
    }
}

/// One attention task: the query heads of key/value head `g` over one example.
#[derive(Clone, Copy)]
struct Task {
    span: (usize, usize),
    g: usize,
}

fn tasks(pack: &Packing, kv: usize) -> Vec<Task> {
    // Longest examples first, so the pool does not wait on one at the end.
    let mut spans = pack.spans.clone();
    spans.sort_by_key(|s| std::cmp::Reverse(s.1));
    spans.iter().flat_map(|&span| (0..kv).map(move |g| Task { span, g })).collect()
}

/// Query rows per block of attention's products. A block's products reach only the keys
/// that its queries see, so causal attention skips the blocks above the diagonal (3/8 of
/// the work at 128 tokens, near half at 1024). 32 rows took 8 % less time than 64 here.
const QUERY_BLOCK: usize = 32;

/// The blocks of an example of `l` tokens: each one's queries and the keys any of them sees.
fn blocks(pack: &Packing, l: usize) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
    (0..l).step_by(QUERY_BLOCK).map(move |r0| {
        let r1 = (r0 + QUERY_BLOCK).min(l);
        (r0..r1, pack.seen(r0).start..r1)
    })
}

/// The keys query `i` sees, counted from the first of `keys` (its block's).
fn seen_in(pack: &Packing, i: usize, keys: &Range<usize>) -> Range<usize> {
    let seen = pack.seen(i);
    seen.start - keys.start..seen.end - keys.start
}

/// Zeros a block's row of probabilities past the keys its query sees (`seen`).
fn unseen(row: &mut [f32], seen: &Range<usize>) {
    row[..seen.start].fill(0.0);
    row[seen.end..].fill(0.0);
}

/// `scores[i][j] = scale · q_i · k_j` for one head over one example's `rows` of queries
/// and `keys` (`[rows, keys]`); a caller reads only the keys each query sees.
fn scores(dm: &Dims, q: &[f32], k: &[f32], task: Task, h: usize, rows: &Range<usize>, keys: &Range<usize>) -> Vec<f32> {
    let a = task.span.0;
    let (qw, kw) = (dm.heads * dm.hd, dm.kv * dm.hd);
    let mut s = vec![0.0; rows.len() * keys.len()];
    let qm = Mat::strided(q, (a + rows.start) * qw + h * dm.hd, qw, rows.len(), dm.hd);
    let km = Mat::strided(k, (a + keys.start) * kw + task.g * dm.hd, kw, keys.len(), dm.hd);
    matmul(&mut s, qm, km.t(), 1.0 / (dm.hd as f32).sqrt(), false, false);
    s
}

/// One query head's attention over one example: `[len, hd]` outputs and each query's
/// log-sum-exp.
struct HeadOut {
    o: Vec<f32>,
    lse: Vec<f32>,
}

/// One task's gradients: `[len, hd]` for each of its query heads, its keys and values.
struct TaskGrads {
    task: Task,
    dq: Vec<Vec<f32>>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Attention's forward pass: `[tokens, heads·hd]` outputs and each query's log-sum-exp
/// (`[tokens, heads]`).
fn attention_forward(dm: &Dims, pack: &Packing, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let group = dm.heads / dm.kv;
    let (qw, kw) = (dm.heads * dm.hd, dm.kv * dm.hd);
    let parts: Vec<(Task, Vec<HeadOut>)> = tasks(pack, dm.kv)
        .into_par_iter()
        .map(|task| {
            let (a, l) = task.span;
            let per_head = (task.g * group..(task.g + 1) * group)
                .map(|h| {
                    let mut o = vec![0.0; l * dm.hd];
                    let mut lse = vec![0.0; l];
                    for (rows, keys) in blocks(pack, l) {
                        let mut p = scores(dm, q, k, task, h, &rows, &keys);
                        // Over the keys a query sees; the others' probabilities are 0.
                        for (i, row) in rows.clone().zip(p.chunks_exact_mut(keys.len())) {
                            let seen = seen_in(pack, i, &keys);
                            let (top, sum) = wide(
                                #[inline(always)]
                                || {
                                    let (top, sum) = softmax(&mut row[seen.clone()]);
                                    let inv = 1.0 / sum;
                                    row[seen.clone()].iter_mut().for_each(|x| *x *= inv);
                                    (top, sum)
                                },
                            );
                            unseen(row, &seen);
                            lse[i] = top + sum.ln();
                        }
                        let vm = Mat::strided(v, (a + keys.start) * kw + task.g * dm.hd, kw, keys.len(), dm.hd);
                        matmul(&mut o[rows.start * dm.hd..rows.end * dm.hd], Mat::dense(&p, rows.len(), keys.len()), vm, 1.0, false, false);
                    }
                    HeadOut { o, lse }
                })
                .collect();
            (task, per_head)
        })
        .collect();
    let mut out = zeros(dm.n * qw);
    let mut lse = vec![0.0; dm.n * dm.heads];
    for (task, per_head) in parts {
        let (a, l) = task.span;
        for (k, HeadOut { o, lse: s }) in per_head.into_iter().enumerate() {
            let h = task.g * group + k;
            for i in 0..l {
                out[(a + i) * qw + h * dm.hd..][..dm.hd].copy_from_slice(&o[i * dm.hd..][..dm.hd]);
                lse[(a + i) * dm.heads + h] = s[i];
            }
        }
    }
    (out, lse)
}

/// Attention's backward pass from the output gradient `dout` (`[tokens, heads·hd]`):
/// the gradients of the (rotated) queries, keys and values.
#[allow(clippy::too_many_arguments)]
fn attention_backward(dm: &Dims, pack: &Packing, q: &[f32], k: &[f32], v: &[f32], lse: &[f32], dout: &[f32]) -> [Vec<f32>; 3] {
    let group = dm.heads / dm.kv;
    let (qw, kw) = (dm.heads * dm.hd, dm.kv * dm.hd);
    let scale = 1.0 / (dm.hd as f32).sqrt();
    let parts: Vec<TaskGrads> = tasks(pack, dm.kv)
        .into_par_iter()
        .map(|task| {
            let (a, l) = task.span;
            let (mut dk, mut dv) = (vec![0.0; l * dm.hd], vec![0.0; l * dm.hd]);
            let dqs = (task.g * group..(task.g + 1) * group)
                .map(|h| {
                    let mut dq = vec![0.0; l * dm.hd];
                    for (rows, keys) in blocks(pack, l) {
                        let (n, w) = (rows.len(), keys.len());
                        // P from the stored log-sum-exp.
                        let mut p = scores(dm, q, k, task, h, &rows, &keys);
                        for (i, row) in rows.clone().zip(p.chunks_exact_mut(w)) {
                            let (m, seen) = (lse[(a + i) * dm.heads + h], seen_in(pack, i, &keys));
                            wide(
                                #[inline(always)]
                                || row[seen.clone()].iter_mut().for_each(|x| *x = exp(*x - m)),
                            );
                            unseen(row, &seen);
                        }
                        let at = |rs: usize, i: usize, g: usize| (a + i) * rs + g * dm.hd;
                        let dom = Mat::strided(dout, at(qw, rows.start, h), qw, n, dm.hd);
                        let (km, vm) = (Mat::strided(k, at(kw, keys.start, task.g), kw, w, dm.hd), Mat::strided(v, at(kw, keys.start, task.g), kw, w, dm.hd));
                        let key_rows = keys.start * dm.hd..keys.end * dm.hd;
                        // dV += Pᵀ·dO
                        matmul(&mut dv[key_rows.clone()], Mat::dense(&p, n, w).t(), dom, 1.0, true, false);
                        // dS = P ∘ (dO·Vᵀ − rowsum(P ∘ dO·Vᵀ))
                        let mut ds = vec![0.0; n * w];
                        matmul(&mut ds, dom, vm.t(), 1.0, false, false);
                        wide(
                            #[inline(always)]
                            || {
                                for (dsr, pr) in ds.chunks_exact_mut(w).zip(p.chunks_exact(w)) {
                                    let dot = crate::quant::dot_f32(dsr, pr);
                                    for (x, &pv) in dsr.iter_mut().zip(pr) {
                                        *x = pv * (*x - dot);
                                    }
                                }
                            },
                        );
                        let dsm = Mat::dense(&ds, n, w);
                        // dQ = scale·dS·K, dK += scale·dSᵀ·Q
                        matmul(&mut dq[rows.start * dm.hd..rows.end * dm.hd], dsm, km, scale, false, false);
                        matmul(&mut dk[key_rows], dsm.t(), Mat::strided(q, at(qw, rows.start, h), qw, n, dm.hd), scale, true, false);
                    }
                    dq
                })
                .collect();
            TaskGrads { task, dq: dqs, dk, dv }
        })
        .collect();
    let (mut dq, mut dk, mut dv) = (zeros(dm.n * qw), zeros(dm.n * kw), zeros(dm.n * kw));
    for TaskGrads { task, dq: dqs, dk: dkt, dv: dvt } in parts {
        let (a, l) = task.span;
        for (j, part) in dqs.iter().enumerate() {
            let h = task.g * group + j;
            for i in 0..l {
                dq[(a + i) * qw + h * dm.hd..][..dm.hd].copy_from_slice(&part[i * dm.hd..][..dm.hd]);
            }
        }
        for i in 0..l {
            let at = (a + i) * kw + task.g * dm.hd;
            dk[at..at + dm.hd].copy_from_slice(&dkt[i * dm.hd..][..dm.hd]);
            dv[at..at + dm.hd].copy_from_slice(&dvt[i * dm.hd..][..dm.hd]);
        }
    }
    [dq, dk, dv]
}

/// The adapters' `A` factors of projections that read one input, side by side:
/// `[in, rank × adapted]` (borrowed when one or none is adapted).
fn a_side_by_side<'p>(inp: usize, rank: usize, pairs: &[&'p Pair]) -> Cow<'p, [f32]> {
    match pairs {
        [] => return Cow::Borrowed(&[]),
        [one] => return Cow::Borrowed(&one.a),
        _ => {}
    }
    let width = rank * pairs.len();
    let mut a = vec![0.0; inp * width];
    for (row, out) in a.chunks_exact_mut(width).enumerate() {
        for (p, o) in pairs.iter().zip(out.chunks_exact_mut(rank)) {
            o.copy_from_slice(&p.a[row * rank..][..rank]);
        }
    }
    Cow::Owned(a)
}

#[cfg(target_arch = "x86_64")]
use super::panels::masks;
#[cfg(not(target_arch = "x86_64"))]
fn masks(_: usize, _: usize) -> bool {
    false
}

/// Whether the products with these frozen weights run fused ([`panels`]): on AVX-512 or
/// AVX2, with f32 weights (a bf16 base multiplied in bf16 keeps its own products).
fn fused<'f>(frozen: impl IntoIterator<Item = &'f Frozen>) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::panels::available() && frozen.into_iter().all(|w| w.on_tiles().is_none());
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = frozen;
        false
    }
}

/// `y = x·W + scale·(xd·A)·B` for each projection reading `x`; returns the outputs and,
/// where any is adapted, `xd·[A₁ A₂ …]` (`[n, rank × adapted]`, the adapted projections'
/// `xd·A` side by side in `projs` order), kept for the backward pass. Projections that
/// share an input share one product for their `A`s: a rank-16 product alone runs the gemm
/// crate's narrow tiles. Fused, each output is written once, its `(xd·A)·B` summed with
/// `x·W` in the same tiles.
fn project(dm: &Dims, x: &[f32], xd: &[f32], projs: &[(&Frozen, usize, Option<&Pair>)]) -> (Vec<Vec<f32>>, Option<Vec<f32>>) {
    let inp = x.len() / dm.n;
    let pairs: Vec<&Pair> = projs.iter().filter_map(|p| p.2).collect();
    let (r, width) = (dm.rank, dm.rank * pairs.len());
    let u = (!pairs.is_empty()).then(|| {
        let mut u = zeros(dm.n * width);
        matmul(&mut u, Mat::dense(xd, dm.n, inp), Mat::dense(&a_side_by_side(inp, r, &pairs), inp, width), 1.0, false, true);
        u
    });
    let fused = fused(projs.iter().map(|p| p.0));
    let mut adapted = 0;
    let ys = projs
        .iter()
        .map(|&(w, out, pair)| {
            let mut y = zeros(dm.n * out);
            // This projection's `xd·A` (columns `at..at + r` of `u`) and its `B`.
            let lora = pair.map(|pair| {
                adapted += 1;
                (u.as_deref().expect("adapted projections have xd·A"), (adapted - 1) * r, Mat::dense(&pair.b, r, out))
            });
            #[cfg(target_arch = "x86_64")]
            if fused {
                let frozen = super::panels::Term { x, xs: inp, w: w.mat(inp, out), scale: 1.0 };
                let lora = lora.map(|(u, at, b)| super::panels::Term { x: &u[at..], xs: width, w: b, scale: dm.scale });
                super::panels::times(&mut y, dm.n, &[Some(frozen), lora].into_iter().flatten().collect::<Vec<_>>(), false, None);
                return y;
            }
            w.forward(&mut y, x, dm.n, inp, out, false);
            if let Some((u, at, b)) = lora {
                matmul(&mut y, Mat::strided(u, at, width, dm.n, r), b, dm.scale, true, true);
            }
            y
        })
        .collect();
    (ys, u)
}

/// The backward pass of [`project`] over projections that read one input: from each
/// projection's `dy`, adds `dy·Wᵀ` to `dx`, and the adapters' share (the gradient of their
/// input `xd`, dropped out by `mask`) as `mask`'s backward pass; returns each pair's
/// gradients in `projs` order. `u` is what [`project`] kept. Fused, `dx` is written once:
/// the adapters' share is masked in the tiles, then the frozen products are added to it.
fn project_backward(dm: &Dims, xd: &[f32], u: Option<&[f32]>, projs: &[(&[f32], &Frozen, Option<&Pair>)], mask: &Option<Mask>, dx: &mut [f32]) -> Vec<Option<PairGrad>> {
    let inp = dx.len() / dm.n;
    let pairs: Vec<&Pair> = projs.iter().filter_map(|p| p.2).collect();
    let (r, width) = (dm.rank, dm.rank * pairs.len());
    // Per pair: dB = s·uᵀ·dy, du = s·dy·Bᵀ; then for all at once: dA = xdᵀ·du, dxd = du·Aᵀ.
    let mut db = Vec::with_capacity(pairs.len());
    let mut du = zeros(dm.n * width);
    let mut du_one = vec![0.0; dm.n * r];
    for (j, (dy, pair)) in projs.iter().filter_map(|&(dy, _, pair)| Some((dy, pair?))).enumerate() {
        let u = u.expect("adapted projections kept xd·A");
        let out = dy.len() / dm.n;
        let dym = Mat::dense(dy, dm.n, out);
        let mut g = vec![0.0; r * out];
        matmul(&mut g, Mat::strided(u, j * r, width, dm.n, r).t(), dym, dm.scale, false, true);
        db.push(g);
        matmul(&mut du_one, dym, Mat::dense(&pair.b, r, out).t(), dm.scale, false, true);
        for (row, src) in du.chunks_exact_mut(width).zip(du_one.chunks_exact(r)) {
            row[j * r..][..r].copy_from_slice(src);
        }
    }
    let a = a_side_by_side(inp, r, &pairs);
    let fused = fused(projs.iter().map(|p| p.1)) && (mask.is_none() || masks(width, inp));
    #[cfg(target_arch = "x86_64")]
    if fused {
        use super::panels::{Dropped, Term};
        let lora = (!pairs.is_empty()).then(|| Term { x: &du, xs: width, w: Mat::dense(&a, inp, width).t(), scale: 1.0 });
        let frozen = projs.iter().map(|&(dy, w, _)| {
            let out = dy.len() / dm.n;
            Term { x: dy, xs: out, w: w.mat(inp, out).t(), scale: 1.0 }
        });
        let terms: Vec<Term<'_>> = lora.into_iter().chain(frozen).collect();
        let dropped = mask.as_ref().filter(|_| !pairs.is_empty()).map(|m| Dropped { bits: &m.bits, keep: m.keep });
        super::panels::times(dx, dm.n, &terms, true, dropped);
    }
    if !fused {
        for &(dy, w, _) in projs {
            w.backward(dx, dy, dm.n, inp, dy.len() / dm.n, true);
        }
        if !pairs.is_empty() {
            let mut dxd = zeros(dm.n * inp);
            matmul(&mut dxd, Mat::dense(&du, dm.n, width), Mat::dense(&a, inp, width).t(), 1.0, false, true);
            Mask::backward(mask, dx, &dxd);
        }
    }
    if pairs.is_empty() {
        return projs.iter().map(|_| None).collect();
    }
    let mut da = vec![0.0; inp * width];
    matmul(&mut da, Mat::dense(xd, dm.n, inp).t(), Mat::dense(&du, dm.n, width), 1.0, false, true);
    let mut grads = db.into_iter().enumerate().map(|(j, b)| PairGrad {
        a: da.chunks_exact(width).flat_map(|row| &row[j * r..][..r]).copied().collect(),
        b,
    });
    projs.iter().map(|p| p.2.map(|_| grads.next().expect("one gradient per pair"))).collect()
}

/// What one decoder layer's forward pass keeps for its backward pass.
struct Saved {
    /// The layer's input and its residual stream after attention, `[n, d]`.
    x: Vec<f32>,
    x2: Vec<f32>,
    inv1: Vec<f32>,
    inv2: Vec<f32>,
    /// Rotated queries and keys, values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lse: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Per adapter input (as `masks`), what [`project`] kept: its adapted projections'
    /// `xd·A` side by side.
    u: [Option<Vec<f32>>; 4],
    /// The dropout masks of the adapters' four inputs.
    masks: [Option<Mask>; 4],
    /// Those inputs as the adapters read them (dropout applied), where an adapter reads
    /// them: kept rather than recomputed, as memory is what the step has to spare.
    xd: [Option<Vec<f32>>; 4],
}

/// One decoder layer's frozen weights and adapter, ready for the step.
struct LayerWeights<'m> {
    norm1: &'m RmsNorm,
    norm2: &'m RmsNorm,
    /// In [`Target::ALL`] order.
    frozen: [Frozen; 7],
    pairs: &'m [Option<Pair>; 7],
}

impl<'m> LayerWeights<'m> {
    fn new(model: &'m CausalLm, l: usize, pairs: &'m [Option<Pair>; 7]) -> Option<Self> {
        let layer = &model.layers[l];
        let (a, m) = (&layer.self_attn, &layer.mlp);
        let frozen = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj].map(|lin| Frozen::of(lin, model.bf16_products()));
        let [q, k, v, o, g, u, d] = frozen;
        Some(Self {
            norm1: &layer.input_layernorm,
            norm2: &layer.post_attention_layernorm,
            frozen: [q?, k?, v?, o?, g?, u?, d?],
            pairs,
        })
    }

    fn pair(&self, t: Target) -> Option<&Pair> {
        self.pairs[t as usize].as_ref()
    }
}

/// Output widths in [`Target::ALL`] order.
fn widths(dm: &Dims) -> [usize; 7] {
    let (q, kv) = (dm.heads * dm.hd, dm.kv * dm.hd);
    [q, kv, kv, dm.d, dm.inter, dm.inter, dm.d]
}

/// The dropout masks of each adapter input of layer `l`: attention's, `o_proj`'s, the MLP's and
/// `down_proj`'s.
fn draw_masks(dm: &Dims, seed: u64, l: usize) -> [Option<Mask>; 4] {
    let widths = [dm.d, dm.heads * dm.hd, dm.d, dm.inter];
    [0, 1, 2, 3].map(|i| Mask::draw(mix(seed, (l * 4 + i) as u64), dm.dropout, dm.n * widths[i]))
}

/// The dropped-out copy of an adapter input; None without a mask, when the adapters read
/// the input itself (and the backward pass keeps it rather than a copy).
fn dropped(mask: &Option<Mask>, x: &[f32]) -> Option<Vec<f32>> {
    match Mask::apply(mask, x) {
        Cow::Owned(v) => Some(v),
        Cow::Borrowed(_) => None,
    }
}

fn layer_forward(dm: &Dims, pack: &Packing, rope: &Rope, lw: &LayerWeights<'_>, seed: u64, l: usize, x: Vec<f32>) -> (Vec<f32>, Saved) {
    let masks = draw_masks(dm, seed, l);
    use Target::*;
    let wd = widths(dm);
    let f = &lw.frozen;
    let (h1, inv1) = rms_forward(&x, lw.norm1);
    let xd1 = dropped(&masks[0], &h1);
    let (mut qkv, u1) = project(
        dm,
        &h1,
        xd1.as_deref().unwrap_or(&h1),
        &[(&f[0], wd[0], lw.pair(Q)), (&f[1], wd[1], lw.pair(K)), (&f[2], wd[2], lw.pair(V))],
    );
    let xd1 = xd1.unwrap_or(h1);
    let v = qkv.pop().expect("three projections");
    let mut k = qkv.pop().expect("three projections");
    let mut q = qkv.pop().expect("three projections");
    rope.apply(&mut q, dm.hd);
    rope.apply(&mut k, dm.hd);
    let (attn, lse) = attention_forward(dm, pack, &q, &k, &v);
    let xdo = dropped(&masks[1], &attn);
    let (mut o, uo) = project(dm, &attn, xdo.as_deref().unwrap_or(&attn), &[(&f[3], wd[3], lw.pair(O))]);
    let xdo = xdo.unwrap_or(attn);
    let mut x2 = o.pop().expect("one projection");
    add(&mut x2, &x);
    let (h2, inv2) = rms_forward(&x2, lw.norm2);
    let xd2 = dropped(&masks[2], &h2);
    let (mut gu, u2) = project(dm, &h2, xd2.as_deref().unwrap_or(&h2), &[(&f[4], wd[4], lw.pair(Gate)), (&f[5], wd[5], lw.pair(Up))]);
    let xd2 = xd2.unwrap_or(h2);
    let up = gu.pop().expect("two projections");
    let gate = gu.pop().expect("two projections");
    let act = silu_mul(&gate, &up);
    let xda = dropped(&masks[3], &act);
    let (mut dn, ua) = project(dm, &act, xda.as_deref().unwrap_or(&act), &[(&f[6], wd[6], lw.pair(Down))]);
    let xda = xda.unwrap_or(act);
    let mut out = dn.pop().expect("one projection");
    add(&mut out, &x2);
    let u = [u1, uo, u2, ua];
    // Each input kept where an adapter reads it.
    let read = |ts: &[Target]| ts.iter().any(|&t| lw.pair(t).is_some());
    let xd = [(xd1, read(&[Q, K, V])), (xdo, read(&[O])), (xd2, read(&[Gate, Up])), (xda, read(&[Down]))].map(|(v, read)| read.then_some(v));
    let saved = Saved { x, x2, inv1, inv2, q, k, v, lse, gate, up, u, masks, xd };
    (out, saved)
}

/// The layer's backward pass: from the gradient of its output, the gradient of its input
/// and of each adapted projection's pair (in [`Target::ALL`] order).
fn layer_backward(dm: &Dims, pack: &Packing, rope: &Rope, lw: &LayerWeights<'_>, s: Saved, dout: Vec<f32>) -> (Vec<f32>, [Option<PairGrad>; 7]) {
    use Target::*;
    let wd = widths(dm);
    let f = &lw.frozen;
    let mut grads: [Option<PairGrad>; 7] = Default::default();
    let u = |i: usize| s.u[i].as_deref();
    // An input no adapter reads is not kept, and only adapters read it here.
    let xd = |i: usize| s.xd[i].as_deref().unwrap_or(&[]);

    // The MLP: out = x2 + down(silu(gate)·up).
    let mut dact = zeros(dm.n * dm.inter);
    [grads[Down as usize]] = grads_of(project_backward(dm, xd(3), u(3), &[(&dout, &f[6], lw.pair(Down))], &s.masks[3], &mut dact));
    let (dgate, dup) = silu_mul_backward(&s.gate, &s.up, &dact);
    drop(dact);
    let (w2, _) = lw.norm2.host();
    let mut dh2 = zeros(dm.n * dm.d);
    [grads[Gate as usize], grads[Up as usize]] =
        grads_of(project_backward(dm, xd(2), u(2), &[(&dgate, &f[4], lw.pair(Gate)), (&dup, &f[5], lw.pair(Up))], &s.masks[2], &mut dh2));
    drop((dgate, dup));
    let mut dx2 = dout;
    rms_backward(&mut dx2, &dh2, &s.x2, &s.inv2, w2);
    drop(dh2);

    // Attention: x2 = x + o_proj(attention(rope(q), rope(k), v)).
    let mut dattn = zeros(dm.n * wd[0]);
    [grads[O as usize]] = grads_of(project_backward(dm, xd(1), u(1), &[(&dx2, &f[3], lw.pair(O))], &s.masks[1], &mut dattn));
    let [mut dq, mut dk, dv] = attention_backward(dm, pack, &s.q, &s.k, &s.v, &s.lse, &dattn);
    drop(dattn);
    rope.apply_transposed(&mut dq, dm.hd);
    rope.apply_transposed(&mut dk, dm.hd);
    let (w1, _) = lw.norm1.host();
    let mut dh1 = zeros(dm.n * dm.d);
    [grads[Q as usize], grads[K as usize], grads[V as usize]] = grads_of(project_backward(
        dm,
        xd(0),
        u(0),
        &[(&dq, &f[0], lw.pair(Q)), (&dk, &f[1], lw.pair(K)), (&dv, &f[2], lw.pair(V))],
        &s.masks[0],
        &mut dh1,
    ));
    drop((dq, dk, dv));
    let mut dx = dx2;
    rms_backward(&mut dx, &dh1, &s.x, &s.inv1, w1);
    (dx, grads)
}

/// `N` gradients from [`project_backward`] over `N` projections.
fn grads_of<const N: usize>(grads: Vec<Option<PairGrad>>) -> [Option<PairGrad>; N] {
    grads.try_into().unwrap_or_else(|_| unreachable!("one gradient per projection"))
}

fn add(x: &mut [f32], y: &[f32]) {
    par_rows(x, |base, x| {
        for (a, &b) in x.iter_mut().zip(&y[base..]) {
            *a += b;
        }
    });
}

/// Replaces `row` with `exp(row - max)`; returns the max and the new sum.
#[inline(always)]
fn softmax(row: &mut [f32]) -> (f32, f32) {
    let top = lanes(row, f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp(*x - top);
    }
    (top, lanes(row, 0.0, |a, b| a + b))
}

/// `Σ a·b·c` over eight interleaved lanes, so it vectorizes (a sum in order waits on each
/// add), as [`crate::quant::dot_f32`] does for two; the slices have one length.
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for ((a, b), c) in a.chunks_exact(8).zip(b.chunks_exact(8)).zip(c.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += a[j] * b[j] * c[j];
        }
    }
    let tail = a.len() / 8 * 8;
    let rest: f32 = (tail..a.len()).map(|i| a[i] * b[i] * c[i]).sum();
    acc.iter().sum::<f32>() + rest
}

/// A reduction over eight interleaved lanes, so it vectorizes.
#[inline(always)]
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    rest.iter().fold(acc.into_iter().fold(init, &f), |a, &x| f(a, x))
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `silu(gate) · up`, elementwise.
fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    rows_map(gate, gate.len(), |base, out, g| {
        wide(
            #[inline(always)]
            || {
                for ((o, &g), &u) in out.iter_mut().zip(g).zip(&up[base..]) {
                    *o = g * sigmoid(g) * u;
                }
            },
        )
    })
}

/// The gradients of `gate` and `up` from that of `silu(gate) · up`.
fn silu_mul_backward(gate: &[f32], up: &[f32], dact: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dgate, mut dup) = (zeros(gate.len()), zeros(gate.len()));
    dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).enumerate().for_each(|(i, (dg, du))| {
        let r = i * CHUNK..i * CHUNK + dg.len();
        wide(
            #[inline(always)]
            || {
                for ((((dg, du), &g), &u), &da) in dg.iter_mut().zip(du).zip(&gate[r.clone()]).zip(&up[r.clone()]).zip(&dact[r]) {
                    let s = sigmoid(g);
                    *dg = da * u * s * (1.0 + g * (1.0 - s));
                    *du = da * g * s;
                }
            },
        )
    });
    (dgate, dup)
}

/// Target rows per chunk of the output head (a chunk's logits are `rows × vocab`, 48 MiB
/// for SmolLM2). Each thread re-packs the whole head weight for its rows of a chunk, so
/// fewer, larger chunks: 256 rows made the step ~8 % faster than 64 did.
const HEAD_ROWS: usize = 256;

/// The summed negative log-likelihood of `labels` (each `(row, token)`) under the output
/// head on `x` (`[n, d]`, before the final norm), and the gradient of `scale ×` it with
/// respect to `x`.
fn head_backward(model: &CausalLm, x: &[f32], d: usize, labels: &[(usize, u32)], scale: f32) -> (f64, Vec<f32>) {
    let vocab = model.config.vocab_size;
    let head = Frozen::of(model.lm_head(), model.bf16_products()).expect(SUPPORTED);
    let (hf, inv) = rms_forward(x, &model.norm);
    let mut dhf = zeros(x.len());
    let mut nll = 0.0f64;
    // One buffer for every chunk's logits: the product overwrites it.
    let mut buffer = zeros(HEAD_ROWS.min(labels.len()) * vocab);
    for chunk in labels.chunks(HEAD_ROWS) {
        let rows: Vec<f32> = chunk.iter().flat_map(|&(r, _)| hf[r * d..(r + 1) * d].iter().copied()).collect();
        let t = chunk.len();
        let logits = &mut buffer[..t * vocab];
        head.forward(logits, &rows, t, d, vocab, false);
        // Softmax minus the label, per row; the log-likelihood on the way.
        let losses: Vec<f64> = logits
            .par_chunks_mut(vocab)
            .zip(chunk)
            .map(|(row, &(_, label))| {
                let label = label as usize;
                let logit = row[label];
                let (top, sum) = wide(
                    #[inline(always)]
                    || {
                        let (top, sum) = softmax(row);
                        let inv = scale / sum;
                        row.iter_mut().for_each(|x| *x *= inv);
                        (top, sum)
                    },
                );
                row[label] -= scale;
                f64::from(top) + f64::from(sum).ln() - f64::from(logit)
            })
            .collect();
        nll += losses.iter().sum::<f64>();
        let mut drows = vec![0.0; t * d];
        head.backward(&mut drows, logits, t, d, vocab, false);
        for (&(r, _), g) in chunk.iter().zip(drows.chunks_exact(d)) {
            for (a, &b) in dhf[r * d..(r + 1) * d].iter_mut().zip(g) {
                *a += b;
            }
        }
    }
    let mut dx = zeros(x.len());
    let (w, _) = model.norm.host();
    rms_backward(&mut dx, &dhf, x, &inv, w);
    (nll, dx)
}

/// The loss of `examples` (summed over their target tokens) and the gradient of `scale ×`
/// it for every adapter parameter, in [`Adapter::params`] order, computed on host buffers
/// as [`super::layerwise_grads`] computes them through burn. `train` applies the adapter's
/// dropout, drawn from `seed`. With `recompute`, each layer keeps only its input and runs
/// its forward pass again before its backward pass (QLoRA: memory stays near one layer's
/// activations, for a third more arithmetic). None when no example has a target token.
///
/// # Panics
/// When [`supports`] does not hold for `model`.
pub fn host_grads(model: &CausalLm, examples: &[&Encoded], adapter: &Adapter, train: bool, seed: u64, scale: f64, recompute: bool) -> Option<(f64, Vec<Tensor<2>>)> {
    assert!(supports(model), "the host training step needs a model on the CPU backend with f32, bf16 or quantized weights");
    crate::model::in_pool(|| step(model, examples, adapter, train, seed, scale, recompute))
}

const SUPPORTED: &str = "`supports` checked that every weight is readable on the host";

/// Whether [`host_grads`] can train `model`: its weights live on the CPU backend, as f32 or
/// bf16 tensors or quantized blocks.
pub fn supports(model: &CausalLm) -> bool {
    let readable = |lin: &Linear| match lin.parts() {
        (Some(w), _) => matches!(w.dtype(), DType::F32 | DType::BF16),
        (None, packed) => packed.is_some(),
    };
    model.on_host() && readable(model.lm_head()) && model.layers.iter().all(|l| {
        let (a, m) = (&l.self_attn, &l.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj].into_iter().all(readable)
    })
}

fn step(model: &CausalLm, examples: &[&Encoded], adapter: &Adapter, train: bool, seed: u64, scale: f64, recompute: bool) -> Option<(f64, Vec<Tensor<2>>)> {
    let c = &model.config;
    // Pack the examples end to end; row t of an example predicts its token t + 1.
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    let mut spans = Vec::new();
    let mut labels = Vec::new();
    for e in examples.iter().filter(|e| !e.tokens.is_empty()) {
        let a = tokens.len();
        for (t, &tok) in e.tokens.iter().enumerate() {
            if t > 0 && e.target[t] {
                labels.push((a + t - 1, tok));
            }
        }
        tokens.extend_from_slice(&e.tokens);
        positions.extend(0..e.tokens.len() as i64);
        spans.push((a, e.tokens.len()));
    }
    if labels.is_empty() {
        return None;
    }
    let n = tokens.len();
    let dm = Dims {
        n,
        d: c.hidden_size,
        heads: c.num_heads,
        kv: c.num_kv_heads,
        hd: c.head_dim,
        inter: c.intermediate_size,
        rank: adapter.config.rank,
        scale: adapter.config.scale() as f32,
        dropout: if train { adapter.config.dropout as f32 } else { 0.0 },
    };
    let pack = Packing { spans, window: c.sliding_window };
    let rope = Rope::new(&c.rope_inv_freq(), &positions);
    let embedded = model.embed(&Step {
        batch: 1,
        seq: n,
        positions,
        valid: vec![true; n],
        tokens,
    });
    let mut x = host_vec(embedded);

    // Every layer's adapter on the host, once for both passes.
    let pairs: Vec<[Option<Pair>; 7]> = adapter
        .layers
        .iter()
        .map(|layer| {
            let mut pairs: [Option<Pair>; 7] = Default::default();
            for (t, p) in &layer.pairs {
                pairs[*t as usize] = Some(Pair {
                    a: host_vec(p.a.clone()),
                    b: host_vec(p.b.clone()),
                });
            }
            pairs
        })
        .collect();
    let layers = model.layers.len();
    // What each layer keeps for the backward pass: all it needs, or its input alone.
    let mut saved = Vec::with_capacity(layers);
    for (l, layer_pairs) in pairs.iter().enumerate() {
        // Expanded QLoRA blocks (and widened bf16 weights) live for one layer's pass and
        // are made again for its backward pass.
        let lw = LayerWeights::new(model, l, layer_pairs).expect(SUPPORTED);
        let input = recompute.then(|| x.clone());
        let (out, s) = layer_forward(&dm, &pack, &rope, &lw, seed, l, x);
        saved.push(match input {
            Some(input) => Err(input),
            None => Ok(s),
        });
        x = out;
    }
    let (loss, mut dx) = head_backward(model, &x, dm.d, &labels, scale as f32);
    drop(x);

    let mut grads: Vec<Option<Tensor<2>>> = vec![None; adapter.params().len()];
    let per_layer = adapter.layers.first().map_or(0, |l| l.pairs.len() * 2);
    let device = model.device();
    for l in (0..layers).rev() {
        let lw = LayerWeights::new(model, l, &pairs[l]).expect(SUPPORTED);
        let s = match saved.pop().expect("one saved pass per layer") {
            Ok(s) => s,
            Err(input) => layer_forward(&dm, &pack, &rope, &lw, seed, l, input).1,
        };
        let (dxl, mut g) = layer_backward(&dm, &pack, &rope, &lw, s, dx);
        dx = dxl;
        for (k, (t, pair)) in adapter.layers[l].pairs.iter().enumerate() {
            let g = g[*t as usize].take().expect("every adapted projection has a gradient");
            let [inp, r] = pair.a.dims();
            let out = pair.b.dims()[1];
            grads[l * per_layer + 2 * k] = Some(Tensor::from_data(TensorData::new(g.a, [inp, r]), device));
            grads[l * per_layer + 2 * k + 1] = Some(Tensor::from_data(TensorData::new(g.b, [r, out]), device));
        }
    }
    Some((loss, grads.into_iter().map(|g| g.expect("every parameter has a gradient")).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loops that run through [`wide`] give the bits of the same arithmetic compiled
    /// for baseline x86-64: no fused multiply-add, no reordered sums.
    #[test]
    fn wide_loops_give_the_baseline_bits() {
        let n = 3 * CHUNK + 77;
        let draw = |s: u64| -> Vec<f32> { (0..n).map(|i| ((mix(s, i as u64) % 40_001) as f32 - 20_000.0) / 997.0).collect() };
        let (gate, up, dact) = (draw(1), draw(2), draw(3));
        let want: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| g * sigmoid(g) * u).collect();
        assert_eq!(silu_mul(&gate, &up), want);
        let (dgate, dup) = silu_mul_backward(&gate, &up, &dact);
        for i in 0..n {
            let (g, u, da) = (gate[i], up[i], dact[i]);
            let s = sigmoid(g);
            assert_eq!((dgate[i], dup[i]), (da * u * s * (1.0 + g * (1.0 - s)), da * g * s), "element {i}");
        }
        let mut row = gate[..1001].to_vec();
        let (top, sum) = wide(
            #[inline(always)]
            || softmax(&mut row),
        );
        let max = gate[..1001].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = gate[..1001].iter().map(|&x| exp(x - max)).collect();
        assert_eq!((top, &row), (max, &exps));
        assert_eq!(sum, lanes(&exps, 0.0, |a, b| a + b));
    }

    /// Attention forward and backward, computed in blocks of queries that skip the keys
    /// they do not see, give the formula's values written out in f64 one query at a time:
    /// over examples longer than a block, causal and within a sliding window that starts
    /// inside a block.
    #[test]
    fn attention_in_blocks_gives_the_formula() {
        let dm = Dims { n: 110, d: 32, heads: 4, kv: 2, hd: 8, inter: 64, rank: 4, scale: 1.0, dropout: 0.0 };
        let (qw, kw, group) = (dm.heads * dm.hd, dm.kv * dm.hd, dm.heads / dm.kv);
        let r = |len: usize, s: u64| -> Vec<f32> { (0..len).map(|i| ((mix(s, i as u64) % 2001) as f32 - 1000.0) / 400.0).collect() };
        let (q, k, v, dout) = (r(dm.n * qw, 1), r(dm.n * kw, 2), r(dm.n * kw, 3), r(dm.n * qw, 4));
        let scale = 1.0 / (dm.hd as f64).sqrt();
        for window in [None, Some(20)] {
            let pack = Packing { spans: vec![(0, 3 * QUERY_BLOCK + 5), (3 * QUERY_BLOCK + 5, dm.n - 3 * QUERY_BLOCK - 5)], window };
            let (out, lse) = attention_forward(&dm, &pack, &q, &k, &v);
            let [dq, dk, dv] = attention_backward(&dm, &pack, &q, &k, &v, &lse, &dout);
            let (mut want_out, mut want_lse) = (vec![0f64; out.len()], vec![0f64; lse.len()]);
            let (mut want_dq, mut want_dk, mut want_dv) = (vec![0f64; dq.len()], vec![0f64; dk.len()], vec![0f64; dv.len()]);
            let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>();
            for &(a, l) in &pack.spans {
                for h in 0..dm.heads {
                    let g = h / group;
                    let row = |m: &[f32], w: usize, t: usize, head: usize| -> Vec<f32> { m[(a + t) * w + head * dm.hd..][..dm.hd].to_vec() };
                    for i in 0..l {
                        let seen: Vec<usize> = (0..=i).filter(|&j| window.is_none_or(|w| i - j < w)).collect();
                        let qi = row(&q, qw, i, h);
                        let s: Vec<f64> = seen.iter().map(|&j| scale * dot(&qi, &row(&k, kw, j, g))).collect();
                        let top = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = s.iter().map(|x| (x - top).exp()).sum();
                        let p: Vec<f64> = s.iter().map(|x| (x - top).exp() / sum).collect();
                        want_lse[(a + i) * dm.heads + h] = top + sum.ln();
                        let doi = row(&dout, qw, i, h);
                        let dp: Vec<f64> = seen.iter().map(|&j| dot(&doi, &row(&v, kw, j, g))).collect();
                        let mean: f64 = p.iter().zip(&dp).map(|(p, d)| p * d).sum();
                        for (c, &j) in seen.iter().enumerate() {
                            let ds = p[c] * (dp[c] - mean) * scale;
                            let (kj, vj) = (row(&k, kw, j, g), row(&v, kw, j, g));
                            for e in 0..dm.hd {
                                want_out[(a + i) * qw + h * dm.hd + e] += p[c] * f64::from(vj[e]);
                                want_dq[(a + i) * qw + h * dm.hd + e] += ds * f64::from(kj[e]);
                                want_dk[(a + j) * kw + g * dm.hd + e] += ds * f64::from(qi[e]);
                                want_dv[(a + j) * kw + g * dm.hd + e] += p[c] * f64::from(doi[e]);
                            }
                        }
                    }
                }
            }
            for (what, got, want) in [("out", &out, &want_out), ("lse", &lse, &want_lse), ("dq", &dq, &want_dq), ("dk", &dk, &want_dk), ("dv", &dv, &want_dv)] {
                let worst = got.iter().zip(want.iter()).map(|(&g, &w)| (f64::from(g) - w).abs() / (1.0 + w.abs())).fold(0.0, f64::max);
                assert!(worst < 1e-5, "window {window:?}: {what} is off by {worst}");
            }
        }
    }

    #[test]
    fn dropout_masks_drop_their_share_and_scale_the_rest() {
        // Not a multiple of 8: the tail past the last group of eight is masked too.
        let len = 100_003;
        let m = Some(Mask::draw(42, 0.1, len).unwrap());
        let mk = m.as_ref().unwrap();
        let kept = (0..len).filter(|&i| mk.kept(i)).count();
        assert!((kept as f64 / len as f64 - 0.9).abs() < 0.005, "{kept} of {len} kept");
        let ones = vec![1.0f32; len];
        let y = Mask::apply(&m, &ones);
        let mean = y.iter().map(|&v| f64::from(v)).sum::<f64>() / len as f64;
        assert!((mean - 1.0).abs() < 0.01, "the mean survives: {mean}");
        // Element by element: a survivor scaled, the rest zero; the backward pass adds the
        // same to the gradient it is given.
        let x: Vec<f32> = (0..len).map(|i| (i % 97) as f32 - 48.0).collect();
        let want: Vec<f32> = (0..len).map(|i| if mk.kept(i) { x[i] * mk.keep } else { 0.0 }).collect();
        assert_eq!(*Mask::apply(&m, &x), want[..]);
        let mut dx = vec![1.0f32; len];
        Mask::backward(&m, &mut dx, &x);
        assert!(dx.iter().zip(&want).all(|(g, w)| *g == 1.0 + w));
        assert!(Mask::draw(42, 0.0, len).is_none());
        let again = Mask::draw(42, 0.1, len).unwrap();
        assert_eq!(again.bits, Mask::draw(42, 0.1, len).unwrap().bits, "a key draws one mask");
        assert_ne!(again.bits, Mask::draw(43, 0.1, len).unwrap().bits);
    }

    /// The vector draws give the scalar draw's words, so a mask is the same on any CPU.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn masks_are_the_same_bits_with_and_without_vectors() {
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") && is_x86_feature_detected!("avx512bw");
        if !is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for (key, p) in [(42, 0.1f32), (7, 0.5), (u64::MAX, 0.3), (3, 1e-5), (5, 0.99998)] {
            let threshold = (f64::from(p) * 65536.0).round() as u64;
            let mut scalar = vec![0u64; 777];
            Mask::words(key, threshold, 5, &mut scalar);
            let mut vector = vec![0u64; 777];
            // SAFETY: the CPU runs AVX2; the threshold fits in 16 bits.
            #[allow(unsafe_code)]
            unsafe {
                Mask::words_avx2(key, threshold, 5, &mut vector)
            };
            assert_eq!(scalar, vector, "AVX2, key {key}, p {p}");
            if avx512 {
                // SAFETY: checked above.
                #[allow(unsafe_code)]
                unsafe {
                    Mask::words_avx512(key, threshold, 5, &mut vector)
                };
                assert_eq!(scalar, vector, "AVX-512, key {key}, p {p}");
            }
        }
    }
}
