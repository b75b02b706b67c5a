//! Products from K-quant super-blocks (`Q4_K`, `Q5_K`, `Q6_K`) as the GGUF stores them.
//!
//! Each super-block of 256 weights is expanded once into a buffer on the stack, then
//! multiplied by every row of `x`: the weights stay at their file's size in memory, and the
//! expansion is paid once per step whatever the number of rows. The same loops are compiled
//! three times, for AVX-512, for AVX2 with FMA, and for the baseline, and the widest the
//! CPU runs is called (the loops are written so the compiler vectorizes them).
#![allow(unsafe_code)]

use super::{Kernel, QMatrix};
use crate::gguf::{GgmlType, dequantize_into, k_scale_min};

const SUPER: usize = 256;

/// Rows `first..` of a K-quant matrix times the `n` rows of `x`, into `out` (`[rows, n]`).
pub(super) fn rows(
    kernel: Kernel,
    ty: GgmlType,
    m: &QMatrix,
    first: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(x.len(), n * m.cols, "x must be n × cols");
    assert_eq!(out.len() % n.max(1), 0);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::available` saw AVX-512 F (and AVX2, FMA) on this CPU.
        Kernel::Avx512 => unsafe { rows_avx512(ty, m, first, x, n, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::available` saw AVX2 and FMA on this CPU.
        Kernel::Avx2 => unsafe { rows_avx2(ty, m, first, x, n, out) },
        Kernel::Portable => rows_body(ty, m, first, x, n, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn rows_avx512(ty: GgmlType, m: &QMatrix, first: usize, x: &[f32], n: usize, out: &mut [f32]) {
    rows_body(ty, m, first, x, n, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_avx2(ty: GgmlType, m: &QMatrix, first: usize, x: &[f32], n: usize, out: &mut [f32]) {
    rows_body(ty, m, first, x, n, out)
}

#[inline(always)]
fn rows_body(ty: GgmlType, m: &QMatrix, first: usize, x: &[f32], n: usize, out: &mut [f32]) {
    let (_, bytes) = ty.block();
    let per_row = m.cols / SUPER * bytes;
    let mut w = [0f32; SUPER];
    let mut spill = Vec::new();
    for (k, out_row) in out.chunks_exact_mut(n).enumerate() {
        let row = &m.qs[(first + k) * per_row..][..per_row];
        for (b, block) in row.chunks_exact(bytes).enumerate() {
            match ty {
                GgmlType::Q4_K => expand_q4_k(block, &mut w),
                GgmlType::Q6_K => expand_q6_k(block, &mut w),
                _ => {
                    spill.clear();
                    dequantize_into(ty, block, &mut spill);
                    w.copy_from_slice(&spill);
                }
            }
            for (i, o) in out_row.iter_mut().enumerate() {
                *o += dot(
                    &w,
                    x[i * m.cols + b * SUPER..][..SUPER]
                        .try_into()
                        .expect("a super-block of x"),
                );
            }
        }
    }
}

/// Σ w·x over one super-block, in 16 lanes.
#[inline(always)]
fn dot(w: &[f32; SUPER], x: &[f32; SUPER]) -> f32 {
    let mut acc = [0f32; 16];
    for (w, x) in w.chunks_exact(16).zip(x.chunks_exact(16)) {
        for j in 0..16 {
            acc[j] += w[j] * x[j];
        }
    }
    acc.iter().sum()
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// A Q4_K super-block: `d·sc·q − dmin·m` per sub-block of 32, the layout of
/// [`crate::gguf::dequantize`].
#[inline(always)]
fn expand_q4_k(b: &[u8], w: &mut [f32; SUPER]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for pair in 0..4 {
        let q: &[u8; 32] = qs[32 * pair..32 * pair + 32]
            .try_into()
            .expect("32 code bytes");
        let (sc0, m0) = k_scale_min(2 * pair, scales);
        let (sc1, m1) = k_scale_min(2 * pair + 1, scales);
        let (s0, o0, s1, o1) = (
            d * f32::from(sc0),
            dmin * f32::from(m0),
            d * f32::from(sc1),
            dmin * f32::from(m1),
        );
        let (lo, hi) = w[64 * pair..64 * pair + 64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = s0 * f32::from(q[l] & 0x0f) - o0;
            hi[l] = s1 * f32::from(q[l] >> 4) - o1;
        }
    }
}

/// A Q6_K super-block: `d·sc·(q − 32)` per sub-block of 16, the layout of
/// [`crate::gguf::dequantize`].
#[inline(always)]
fn expand_q6_k(b: &[u8], w: &mut [f32; SUPER]) {
    let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
    for half in 0..2 {
        let ql: &[u8; 64] = ql[64 * half..64 * half + 64]
            .try_into()
            .expect("64 low bytes");
        let qh: &[u8; 32] = qh[32 * half..32 * half + 32]
            .try_into()
            .expect("32 high bytes");
        let y = &mut w[128 * half..128 * half + 128];
        for (g, (low, shift)) in [(0usize, 0u32), (32, 2), (0, 4), (32, 6)]
            .into_iter()
            .enumerate()
        {
            // Group g holds values 32g..32g+32: low nibbles of ql[low..] for g < 2, high
            // for g ≥ 2, with bits `shift` of qh on top.
            for l in 0..32 {
                let nibble = if g < 2 {
                    ql[low + l] & 0x0f
                } else {
                    ql[low + l] >> 4
                };
                let q = (nibble | (((qh[l] >> shift) & 3) << 4)) as i8 - 32;
                let s = d * f32::from(sc[8 * half + 2 * g + l / 16] as i8);
                y[32 * g + l] = s * f32::from(q);
            }
        }
    }
}
