//! AVX-512 dot products for [`super::QMatrix`] rows with f32 activations, chosen at run
//! time where the CPU has AVX-512 F. They compute what the AVX2 ones in `avx2.rs` do, on
//! twice the width: a block's 32 weights fill two 16-lane registers, so each activation row
//! takes two fused multiply-adds per block instead of four, each of its two accumulator
//! chains waits on one FMA per block instead of two (decode at one row is bound by that
//! latency), and the 32 registers hold the accumulators of eight rows, so a block is
//! expanded once for eight rows instead of four.
//!
//! As in `avx2.rs`, every row goes through the same operations in the same order whatever
//! the number of rows in the call, so a row's result does not depend on its batch. The sums
//! are in another order than the AVX2 kernel's, so the two differ by float rounding. (The
//! 8-bit path stays on AVX2: `vpdpbusd` measured no faster than `vpmaddubsw` + `vpmaddwd`,
//! see BENCHMARKS.md.)
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::Meta;

/// One block's 32 weights (two registers) times one row's 32 activations, into the row's
/// two accumulators.
#[inline(always)]
unsafe fn block_fma(w: &[__m512; 2], p: *const f32, acc: &mut [__m512; 2]) {
    // SAFETY: the caller passes 32 readable floats at `p`.
    unsafe {
        acc[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(p), acc[0]);
        acc[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(p.add(16)), acc[1]);
    }
}

/// The horizontal sum of each row's two accumulators (a loop: closures would not inherit
/// the target features).
#[inline(always)]
fn row_sums<const R: usize>(acc: &[[__m512; 2]; R]) -> [f32; R] {
    let mut out = [0.0; R];
    for i in 0..R {
        // SAFETY: only reached from the AVX-512 functions below.
        out[i] = unsafe { _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) };
    }
    out
}

/// For each of `R` activation rows, the dot product with one weight row of 4-bit codes (16
/// bytes per block: low nibbles are values 0..16, high nibbles 16..32, each `q·d + m`),
/// each block expanded to f32 once for all rows.
///
/// # Safety
/// The CPU must support AVX-512 F; `qs.len() == 16 · scales.len()`, `mins` as long as
/// `scales`, and every `xs[i].len() == 32 · scales.len()`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dot_nibbles<const R: usize>(qs: &[u8], scales: Meta<'_>, mins: Meta<'_>, xs: [&[f32]; R]) -> [f32; R] {
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for (b, ((q, d), m)) in qs.chunks_exact(16).zip(scales.iter()).zip(mins.iter()).enumerate() {
        // SAFETY: q holds 16 bytes (chunks_exact) and each row 32 floats from 32·b on (the
        // length contract above), so every load is in bounds.
        unsafe {
            let v = _mm_loadu_si128(q.as_ptr().cast());
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
            let w = [
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m),
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m),
            ];
            for i in 0..R {
                block_fma(&w, xs[i].as_ptr().add(32 * b), &mut acc[i]);
            }
        }
    }
    row_sums(&acc)
}

/// For each of `R` activation rows, the dot product with one weight row of signed 8-bit
/// codes (32 bytes per block, each `q·d`), each block expanded once for all rows.
///
/// # Safety
/// The CPU must support AVX-512 F; `qs.len() == 32 · scales.len()` and every
/// `xs[i].len() == 32 · scales.len()`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dot_bytes<const R: usize>(qs: &[u8], scales: Meta<'_>, xs: [&[f32]; R]) -> [f32; R] {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for (b, (q, d)) in qs.chunks_exact(32).zip(scales.iter()).enumerate() {
        // SAFETY: q holds 32 bytes (chunks_exact) and each row 32 floats from 32·b on.
        unsafe {
            let qp = q.as_ptr();
            let d = _mm512_set1_ps(d);
            let w = [
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.cast()))), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(16).cast()))), d),
            ];
            for i in 0..R {
                block_fma(&w, xs[i].as_ptr().add(32 * b), &mut acc[i]);
            }
        }
    }
    row_sums(&acc)
}

/// [`super::avx2::panel_tile`] on sixteen activation rows a register: `xs[v]` is
/// `[cols, 16]`, and `acc[j][v][l] += Σ_k ws[j][k] · xs[v][16k + l]` (from zero when
/// `start`). Each lane is the same chain of fused multiply-adds in column order as on eight
/// lanes, continued across calls over successive blocks of columns, so the bits are the
/// AVX2 and portable kernels' (tested); each instruction does twice the work.
///
/// # Safety
/// The CPU must support AVX-512 F. (The lengths are checked.)
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn panel_tile<const R: usize, const V: usize>(ws: [&[f32]; R], xs: [&[f32]; V], acc: &mut super::TileAcc, start: bool) {
    let cols = ws[0].len();
    for w in ws {
        assert_eq!(w.len(), cols);
    }
    for x in xs {
        assert_eq!(x.len(), 16 * cols);
    }
    let mut sums = [[_mm512_setzero_ps(); V]; R];
    // SAFETY: every weight row holds `cols` floats and every tile `16 · cols` (asserted);
    // `acc[j][v]` is a `[f32; 16]` (indexing checked), room for the lanes loaded and stored.
    unsafe {
        if !start {
            for j in 0..R {
                for v in 0..V {
                    sums[j][v] = _mm512_loadu_ps(acc[j][v].as_ptr());
                }
            }
        }
        for k in 0..cols {
            let mut x = [_mm512_setzero_ps(); V];
            for v in 0..V {
                x[v] = _mm512_loadu_ps(xs[v].as_ptr().add(16 * k));
            }
            for j in 0..R {
                let w = _mm512_set1_ps(*ws[j].get_unchecked(k));
                for v in 0..V {
                    sums[j][v] = _mm512_fmadd_ps(w, x[v], sums[j][v]);
                }
            }
        }
        for j in 0..R {
            for v in 0..V {
                _mm512_storeu_ps(acc[j][v].as_mut_ptr(), sums[j][v]);
            }
        }
    }
}
