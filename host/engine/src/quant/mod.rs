//! Block-quantized matrices and the CPU kernel that multiplies by them without expanding
//! the weights to f32.
//!
//! Decoding a token reads every weight once, so its speed is set by how many bytes the
//! weights take: SmolLM2 is 540 MB as f32 but 97 MB as its GGUF's Q4_1/Q8_0 blocks.
//! [`QMatrix`] keeps those blocks (4- or 8-bit codes plus an f32 scale and, for Q4_1, an
//! f32 offset per 32 values) and [`QMatrix::matmul`] computes `x · Wᵀ` for a few rows of
//! `x` straight from them. The activations stay f32, so the result equals the dense
//! product up to summation order: `Σ (q·d + m)·x = d·Σ q·x + m·Σ x` per block.
//!
//! On x86-64 with AVX2 and FMA (checked at run time) the dot products run on explicit
//! 256-bit code (`avx2.rs`); elsewhere on the portable loops below, which compute the same.

use rayon::prelude::*;

use crate::gguf::GgmlType;

/// How many rows of `x` the quantized path handles; more rows amortize the weight reads
/// and the dense gemm (which has far better arithmetic intensity) wins.
pub const MAX_ROWS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codes {
    /// Unsigned 4-bit codes, value `q·d + m` (Q4_0 is `m = −8d`).
    Nibbles,
    /// Signed 8-bit codes, value `q·d`.
    Bytes,
}

/// A `[rows, cols]` matrix (Hugging Face `[out, in]` layout) in blocks of 32 along `cols`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    codes: Codes,
    /// Per row: `cols / 32` blocks of 16 (nibbles) or 32 (bytes) code bytes.
    qs: Vec<u8>,
    /// Per block.
    scales: Vec<f32>,
    /// Per block; empty for `Bytes`.
    mins: Vec<f32>,
}

impl QMatrix {
    /// Repacks GGUF blocks (`Q4_0`, `Q4_1`, `Q8_0`) of a `[rows, cols]` matrix; None for
    /// other types, which stay dense.
    pub fn from_ggml(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(32) {
            return None;
        }
        let f16 = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let blocks = rows * cols / 32;
        let (codes, block_len) = match ty {
            GgmlType::Q4_0 => (Codes::Nibbles, 18),
            GgmlType::Q4_1 => (Codes::Nibbles, 20),
            GgmlType::Q8_0 => (Codes::Bytes, 34),
            _ => return None,
        };
        if bytes.len() != blocks * block_len {
            return None;
        }
        let mut m = QMatrix {
            rows,
            cols,
            codes,
            qs: Vec::with_capacity(blocks * if codes == Codes::Bytes { 32 } else { 16 }),
            scales: Vec::with_capacity(blocks),
            mins: Vec::with_capacity(if codes == Codes::Nibbles { blocks } else { 0 }),
        };
        for b in bytes.chunks_exact(block_len) {
            let d = f16(b, 0);
            m.scales.push(d);
            match ty {
                GgmlType::Q4_0 => {
                    m.mins.push(-8.0 * d);
                    m.qs.extend_from_slice(&b[2..18]);
                }
                GgmlType::Q4_1 => {
                    m.mins.push(f16(b, 2));
                    m.qs.extend_from_slice(&b[4..20]);
                }
                _ => m.qs.extend_from_slice(&b[2..34]),
            }
        }
        Some(m)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the kernel reads per full pass over the matrix.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.scales.len() + self.mins.len())
    }

    /// `x · Wᵀ` for `n` rows of `x` (`[n, cols]`, row-major): `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "x must be n × cols");
        let nb = self.cols / 32;
        // Σx per block of 32, for the offset term.
        let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
        let mut out_t = vec![0f32; self.rows * n];
        const ROWS_PER_TASK: usize = 64;
        let kernel = Kernel::detect();
        let per_row = if self.codes == Codes::Bytes { 32 } else { 16 } * nb;
        out_t
            .par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(|(task, out)| {
                for (k, out_row) in out.chunks_exact_mut(n).enumerate() {
                    let r = task * ROWS_PER_TASK + k;
                    let qs = &self.qs[r * per_row..(r + 1) * per_row];
                    let scales = &self.scales[r * nb..(r + 1) * nb];
                    kernel.dots(self.codes, qs, scales, x, self.cols, out_row);
                    if self.codes == Codes::Nibbles {
                        let mins = &self.mins[r * nb..(r + 1) * nb];
                        for (i, o) in out_row.iter_mut().enumerate() {
                            *o += dot_f32(mins, &xsum[i * nb..(i + 1) * nb]);
                        }
                    }
                }
            });
        // out_t is [rows, n]; callers want [n, rows].
        let mut out = vec![0f32; n * self.rows];
        for r in 0..self.rows {
            for i in 0..n {
                out[i * self.rows + r] = out_t[r * n + i];
            }
        }
        out
    }

    /// The matrix expanded to f32 (for checks and dense fallbacks).
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.cols / 32;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for blk in 0..self.rows * nb {
            let d = self.scales[blk];
            match self.codes {
                Codes::Bytes => out.extend(self.qs[blk * 32..blk * 32 + 32].iter().map(|&q| f32::from(q as i8) * d)),
                Codes::Nibbles => {
                    let (qs, m) = (&self.qs[blk * 16..blk * 16 + 16], self.mins[blk]);
                    out.extend(qs.iter().map(|&q| f32::from(q & 15) * d + m));
                    out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
                }
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;

/// The dot products of one row of blocks with one row of `x`, on the best kernel the CPU
/// has.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    /// One weight row's dot products with every activation row of `x` (`out.len()` rows
    /// of `cols`). The AVX2 kernel unpacks each block once for up to four rows.
    #[inline(always)]
    fn dots(self, codes: Codes, qs: &[u8], scales: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
        assert_eq!(cols, 32 * scales.len());
        assert_eq!(x.len(), cols * out.len());
        assert_eq!(qs.len(), scales.len() * if codes == Codes::Bytes { 32 } else { 16 });
        let row = |i: usize| &x[i * cols..(i + 1) * cols];
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                let mut i = 0;
                while i < out.len() {
                    let left = out.len() - i;
                    // SAFETY: `detect` saw AVX2 and FMA; the asserts above are the length
                    // contract (every row has `cols` = 32 · blocks floats).
                    #[allow(unsafe_code)]
                    unsafe {
                        macro_rules! rows {
                            ($r:literal) => {{
                                let xs: [&[f32]; $r] = std::array::from_fn(|k| row(i + k));
                                let got = match codes {
                                    Codes::Bytes => avx2::dot_bytes::<$r>(qs, scales, xs),
                                    Codes::Nibbles => avx2::dot_nibbles::<$r>(qs, scales, xs),
                                };
                                out[i..i + $r].copy_from_slice(&got);
                                i += $r;
                            }};
                        }
                        match left {
                            1 => rows!(1),
                            2 => rows!(2),
                            3 => rows!(3),
                            _ => rows!(4),
                        }
                    }
                }
            }
            Kernel::Portable => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = match codes {
                        Codes::Bytes => dot_bytes(qs, scales, row(i)),
                        Codes::Nibbles => dot_nibbles(qs, scales, row(i)),
                    };
                }
            }
        }
    }
}

/// Σ_blocks d · Σ q·x over signed bytes, accumulated in 32 lanes with fused multiply-adds
/// (vectorizes; one horizontal sum at the end).
#[inline(always)]
fn dot_bytes(qs: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for ((q, &d), xb) in qs.chunks_exact(32).zip(scales).zip(x.chunks_exact(32)) {
        let q: &[u8; 32] = q.try_into().unwrap();
        let xb: &[f32; 32] = xb.try_into().unwrap();
        let mut w = [0f32; 32];
        for j in 0..32 {
            w[j] = f32::from(q[j] as i8) * d;
        }
        for j in 0..32 {
            acc[j] = w[j].mul_add(xb[j], acc[j]);
        }
    }
    hsum(acc)
}

/// Σ_blocks d · Σ q·x over nibbles (low nibble: value j, high nibble: value j + 16).
#[inline(always)]
fn dot_nibbles(qs: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for ((q, &d), xb) in qs.chunks_exact(16).zip(scales).zip(x.chunks_exact(32)) {
        let q: &[u8; 16] = q.try_into().unwrap();
        let xb: &[f32; 32] = xb.try_into().unwrap();
        let mut w = [0f32; 32];
        for j in 0..16 {
            w[j] = f32::from(q[j] & 15) * d;
            w[j + 16] = f32::from(q[j] >> 4) * d;
        }
        for j in 0..32 {
            acc[j] = w[j].mul_add(xb[j], acc[j]);
        }
    }
    hsum(acc)
}

/// A short f32 dot product in 8 independent lanes (so it vectorizes).
#[inline(always)]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    hsum(acc) + tail
}

/// Pairwise sum of the lanes (N a power of two).
#[inline(always)]
fn hsum<const N: usize>(mut v: [f32; N]) -> f32 {
    let mut w = N;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            v[j] += v[j + w];
        }
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{dequantize, quantize};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
                (h % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_equals_the_dense_product_of_the_dequantized_weights() {
        let (rows, cols) = (48, 96);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let bytes = quantize(ty, &values(rows * cols, 1));
            let w = dequantize(ty, &bytes, rows * cols);
            let q = QMatrix::from_ggml(ty, &bytes, rows, cols).unwrap();
            assert_eq!(q.dequantize(), w, "{ty:?}");
            for n in [1, 3, MAX_ROWS] {
                let x = values(n * cols, 7);
                let got = q.matmul(&x, n);
                for i in 0..n {
                    for r in 0..rows {
                        let want: f32 = (0..cols).map(|c| w[r * cols + c] * x[i * cols + c]).sum();
                        let g = got[i * rows + r];
                        assert!((g - want).abs() <= 1e-4 * (1.0 + want.abs()), "{ty:?} n={n} [{i},{r}]: {g} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn other_types_stay_dense() {
        assert!(QMatrix::from_ggml(GgmlType::F16, &[0; 64], 1, 32).is_none());
        assert!(QMatrix::from_ggml(GgmlType::Q8_0, &[0; 34], 1, 31).is_none());
    }
}
