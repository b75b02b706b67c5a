//! AVX2 + FMA dot products for [`super::QMatrix`] rows. The portable loops in `mod.rs`
//! compute the same sums; LLVM does not vectorize them well (it packs the unrolled block
//! into 128-bit pairs), so the hot path spells out the 256-bit version here.
//!
//! Every function requires AVX2 and FMA, which the caller checks once with
//! `is_x86_feature_detected!`; every load reads inside a slice whose length the
//! `chunks_exact` iterators fix.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

#[inline(always)]
fn hsum256(v: __m256) -> f32 {
    // SAFETY: only reached from the AVX2 functions below.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// Σ_blocks d · Σ q·x over 4-bit codes (16 bytes per block: low nibbles are values
/// 0..16, high nibbles 16..32).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `qs.len() == 16 · scales.len()` and
/// `x.len() == 32 · scales.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_nibbles(qs: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    for ((q, &d), xb) in qs.chunks_exact(16).zip(scales).zip(x.chunks_exact(32)) {
        // SAFETY: q holds 16 bytes and xb 32 floats (chunks_exact), so every load is in bounds.
        unsafe {
            let v = _mm_loadu_si128(q.as_ptr().cast());
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            let w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            let w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            let w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            let p = xb.as_ptr();
            let mut s = _mm256_mul_ps(w0, _mm256_loadu_ps(p));
            s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.add(8)), s);
            s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p.add(16)), s);
            s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p.add(24)), s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
        }
    }
    hsum256(acc)
}

/// Σ_blocks d · Σ q·x over signed 8-bit codes (32 bytes per block).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `qs.len() == x.len() == 32 · scales.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bytes(qs: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for ((q, &d), xb) in qs.chunks_exact(32).zip(scales).zip(x.chunks_exact(32)) {
        // SAFETY: q holds 32 bytes and xb 32 floats (chunks_exact), so every load is in bounds.
        unsafe {
            let (qp, p) = (q.as_ptr(), xb.as_ptr());
            let code = |i: usize| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.add(8 * i).cast())));
            let mut s = _mm256_mul_ps(code(0), _mm256_loadu_ps(p));
            s = _mm256_fmadd_ps(code(1), _mm256_loadu_ps(p.add(8)), s);
            s = _mm256_fmadd_ps(code(2), _mm256_loadu_ps(p.add(16)), s);
            s = _mm256_fmadd_ps(code(3), _mm256_loadu_ps(p.add(24)), s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
        }
    }
    hsum256(acc)
}
