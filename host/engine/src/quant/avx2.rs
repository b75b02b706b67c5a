//! AVX2 + FMA dot products for [`super::QMatrix`] rows. The portable loops in `mod.rs`
//! compute the same sums; LLVM does not vectorize them well (it packs the unrolled block
//! into 128-bit pairs), so the hot path spells out the 256-bit version here.
//!
//! Every function requires AVX2 and FMA, which the caller checks once with
//! `is_x86_feature_detected!`; every load reads inside a slice whose length the
//! `chunks_exact` iterators fix.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx")]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// One block's 32 weights (already scaled) times one row's 32 activations, added into the
/// row's two accumulators (two chains, so consecutive blocks need not wait on one another):
/// the same operations in the same order for every row, so a row's sum does not depend on
/// how many rows share the call.
#[inline(always)]
unsafe fn block_fma(w: &[__m256; 4], p: *const f32, acc: &mut [__m256; 2]) {
    // SAFETY: the caller passes 32 readable floats at `p`.
    unsafe {
        acc[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(p), acc[0]);
        acc[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(p.add(8)), acc[1]);
        acc[0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(p.add(16)), acc[0]);
        acc[1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(p.add(24)), acc[1]);
    }
}

/// The horizontal sum of each row's two accumulators.
#[inline]
#[target_feature(enable = "avx")]
fn row_sums<const R: usize>(acc: &[[__m256; 2]; R]) -> [f32; R] {
    let mut out = [0.0; R];
    for i in 0..R {
        out[i] = hsum256(_mm256_add_ps(acc[i][0], acc[i][1]));
    }
    out
}

/// For each of `R` activation rows, the dot product with one weight row of 4-bit codes (16
/// bytes per block: low nibbles are values 0..16, high nibbles 16..32, each `q·d + m`).
/// Each block is expanded to its 32 f32 weights once for all `R` rows, which then take
/// four fused multiply-adds each.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `qs.len() == 16 · scales.len()`, `mins` as long as
/// `scales`, and every `xs[i].len() == 32 · scales.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_nibbles<const R: usize>(qs: &[u8], scales: &[f32], mins: &[f32], xs: [&[f32]; R]) -> [f32; R] {
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (b, ((q, &d), &m)) in qs.chunks_exact(16).zip(scales).zip(mins).enumerate() {
        // SAFETY: q holds 16 bytes (chunks_exact) and each row 32 floats from 32·b on (the
        // length contract above), so every load is in bounds.
        unsafe {
            let v = _mm_loadu_si128(q.as_ptr().cast());
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
            let w = [
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m),
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m),
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m),
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m),
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
/// The CPU must support AVX2 and FMA; `qs.len() == 32 · scales.len()` and every
/// `xs[i].len() == 32 · scales.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bytes<const R: usize>(qs: &[u8], scales: &[f32], xs: [&[f32]; R]) -> [f32; R] {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (b, (q, &d)) in qs.chunks_exact(32).zip(scales).enumerate() {
        // SAFETY: q holds 32 bytes (chunks_exact) and each row 32 floats from 32·b on.
        unsafe {
            // No closures here: they would not inherit AVX2 and every intrinsic would become a call.
            let qp = q.as_ptr();
            let d = _mm256_set1_ps(d);
            let w = [
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.cast()))), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.add(8).cast()))), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.add(16).cast()))), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.add(24).cast()))), d),
            ];
            for i in 0..R {
                block_fma(&w, xs[i].as_ptr().add(32 * b), &mut acc[i]);
            }
        }
    }
    row_sums(&acc)
}

/// How far ahead of the block being multiplied the 8-bit kernels ask for the weight codes
/// (`prefetcht0`), in bytes. Decoding one token reads each weight once, straight from
/// memory: without the hint the loads wait on DRAM (the samples of a profile sit on the
/// instructions after them) and more work per block makes it slower, not the arithmetic.
/// Measured on SmolLM2 Q4_1, one thread: 1024 bytes gave 1.12x, 2048 1.17x, 4096 no more
/// (BENCHMARKS.md). The f32-activation kernels are bound by expanding the blocks instead,
/// and gained nothing from it.
const AHEAD: usize = 2048;

/// `Σ_b m_b · s_b`: the offset term of 4-bit blocks (each block's min times the exact sum of
/// its activations), eight blocks at a time and then the tail in order. A function of the
/// two slices alone, so a row's offset is the same whichever rows share its call.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn offset_dot(mins: &[f32], sums: &[f32]) -> f32 {
    debug_assert_eq!(mins.len(), sums.len());
    let (m, s) = (mins.chunks_exact(8), sums.chunks_exact(8));
    let (m_tail, s_tail) = (m.remainder(), s.remainder());
    let mut acc = _mm256_setzero_ps();
    for (m, s) in m.zip(s) {
        // SAFETY: both chunks hold 8 floats.
        acc = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(m.as_ptr()), _mm256_loadu_ps(s.as_ptr()), acc) };
    }
    let mut total = hsum256(acc);
    for (m, s) in m_tail.iter().zip(s_tail) {
        total = m.mul_add(*s, total);
    }
    total
}

/// For `W` weight rows of 4-bit codes and each of `R` rows of 8-bit activations,
/// Σ_blocks (d·dx · Σ q·qx + m · Σx): `vpmaddubsw` multiplies the unsigned codes by the
/// signed activations in pairs, and `vpmaddwd` sums the pairs to 32 bits, exactly
/// (15·127·2 fits in 16 bits). The offsets use the exact f32 sums of the activations
/// (`xsums`).
///
/// Decoding one token asks for `R = 1` and `W = 4`: four independent accumulator chains,
/// one activation load per block for four weight rows. Every output is the same
/// operations in the same order whatever `W` and `R` are, so a row's result does not
/// depend on what shares its call.
///
/// # Safety
/// The CPU must support AVX2 and FMA. (The lengths are checked: with `nb = xd[0].len()`
/// blocks, every `qs[w]` holds `16·nb` bytes, every `xs[r]` `32·nb` codes, and the scales,
/// mins and sums `nb` values each.)
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_nibbles_q8<const W: usize, const R: usize>(
    qs: [&[u8]; W],
    scales: [&[f32]; W],
    mins: [&[f32]; W],
    xs: [&[i8]; R],
    xd: [&[f32]; R],
    xsums: [&[f32]; R],
) -> [[f32; R]; W] {
    let nb = xd[0].len();
    for w in 0..W {
        assert!(qs[w].len() == 16 * nb && scales[w].len() == nb && mins[w].len() == nb);
    }
    for r in 0..R {
        assert!(xs[r].len() == 32 * nb && xd[r].len() == nb && xsums[r].len() == nb);
    }
    let mask = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); R]; W];
    for b in 0..nb {
        // SAFETY: b < nb, so every read is inside the lengths asserted above.
        unsafe {
            let mut x = [_mm256_setzero_si256(); R];
            for r in 0..R {
                x[r] = _mm256_loadu_si256(xs[r].as_ptr().add(32 * b).cast());
            }
            for w in 0..W {
                _mm_prefetch::<_MM_HINT_T0>(qs[w].as_ptr().wrapping_add(16 * b + AHEAD).cast());
                let v = _mm_loadu_si128(qs[w].as_ptr().add(16 * b).cast());
                // Values 0..16 in the low lane, 16..32 in the high one, as the activations lie.
                let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), mask);
                let d = *scales[w].get_unchecked(b);
                for r in 0..R {
                    let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x[r]), ones);
                    acc[w][r] = _mm256_fmadd_ps(_mm256_set1_ps(d * *xd[r].get_unchecked(b)), _mm256_cvtepi32_ps(sums), acc[w][r]);
                }
            }
        }
    }
    let mut out = [[0f32; R]; W];
    for w in 0..W {
        for r in 0..R {
            // SAFETY: AVX2 and FMA are this function's own requirement.
            out[w][r] = hsum256(acc[w][r]) + unsafe { offset_dot(mins[w], xsums[r]) };
        }
    }
    out
}

/// As [`dot_nibbles_q8`] over signed 8-bit codes (no offsets): `vpmaddubsw` takes one
/// unsigned operand, so the codes lend their sign to the activations (|q| · sign(q)·x = q·x).
///
/// # Safety
/// The CPU must support AVX2 and FMA. (The lengths are checked: with `nb = xd[0].len()`,
/// every `qs[w]` and `xs[r]` holds `32·nb` values and every scale row `nb`.)
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bytes_q8<const W: usize, const R: usize>(qs: [&[u8]; W], scales: [&[f32]; W], xs: [&[i8]; R], xd: [&[f32]; R]) -> [[f32; R]; W] {
    let nb = xd[0].len();
    for w in 0..W {
        assert!(qs[w].len() == 32 * nb && scales[w].len() == nb);
    }
    for r in 0..R {
        assert!(xs[r].len() == 32 * nb && xd[r].len() == nb);
    }
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); R]; W];
    for b in 0..nb {
        // SAFETY: b < nb, so every read is inside the lengths asserted above.
        unsafe {
            let mut x = [_mm256_setzero_si256(); R];
            for r in 0..R {
                x[r] = _mm256_loadu_si256(xs[r].as_ptr().add(32 * b).cast());
            }
            for w in 0..W {
                _mm_prefetch::<_MM_HINT_T0>(qs[w].as_ptr().wrapping_add(32 * b + AHEAD).cast());
                let q = _mm256_loadu_si256(qs[w].as_ptr().add(32 * b).cast());
                let magnitude = _mm256_sign_epi8(q, q);
                let d = *scales[w].get_unchecked(b);
                for r in 0..R {
                    let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x[r], q)), ones);
                    acc[w][r] = _mm256_fmadd_ps(_mm256_set1_ps(d * *xd[r].get_unchecked(b)), _mm256_cvtepi32_ps(sums), acc[w][r]);
                }
            }
        }
    }
    let mut out = [[0f32; R]; W];
    for w in 0..W {
        for r in 0..R {
            out[w][r] = hsum256(acc[w][r]);
        }
    }
    out
}

/// `Σ a·b` over two equal-length f32 slices, in two 8-wide accumulators (attention's
/// query-key scores: the portable loop leaves LLVM to pair lanes into 128-bit halves).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [_mm256_setzero_ps(); 2];
    for (x, y) in ca.zip(cb) {
        // SAFETY: both chunks hold 16 floats.
        unsafe {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr()), acc[0]);
            acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(8)), _mm256_loadu_ps(y.as_ptr().add(8)), acc[1]);
        }
    }
    hsum256(_mm256_add_ps(acc[0], acc[1])) + tail
}

/// Rounds a block of 32 activations to signed 8 bits with one scale, `d = max|x| / 127`,
/// as [`super::Q8Rows::quantize`] does (to nearest, ties to even); returns `d`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` and `out` hold 32 values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block(x: &[f32], out: &mut [i8]) -> f32 {
    assert!(x.len() == 32 && out.len() == 32);
    // SAFETY: 32 floats at x and 32 bytes at out (asserted).
    unsafe {
        let p = x.as_ptr();
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let sign = _mm256_set1_ps(-0.0);
        let a = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        // cvtps rounds to nearest even (the default rounding mode); the packs saturate.
        let q = [
            _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)),
        ];
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        // The packs interleave the 128-bit lanes: put the groups of four back in order.
        let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out.as_mut_ptr().cast(), ordered);
        d
    }
}
