//! AVX2 + FMA dot products for [`super::QMatrix`] rows. The portable loops in `mod.rs`
//! compute the same sums; LLVM does not vectorize them well (it packs the unrolled block
//! into 128-bit pairs), so the hot path spells out the 256-bit version here.
//!
//! Every function requires AVX2 and FMA (the K-quant ones F16C too, the `_vnni` ones
//! AVX-VNNI), which the caller checks once with `is_x86_feature_detected!`; every load
//! reads inside a slice whose length the `chunks_exact` iterators fix.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::Meta;

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
pub(super) unsafe fn dot_nibbles<const R: usize>(qs: &[u8], scales: Meta<'_>, mins: Meta<'_>, xs: [&[f32]; R]) -> [f32; R] {
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (b, ((q, d), m)) in qs.chunks_exact(16).zip(scales.iter()).zip(mins.iter()).enumerate() {
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
pub(super) unsafe fn dot_bytes<const R: usize>(qs: &[u8], scales: Meta<'_>, xs: [&[f32]; R]) -> [f32; R] {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (b, (q, d)) in qs.chunks_exact(32).zip(scales.iter()).enumerate() {
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

/// One block of 4-bit codes (16 bytes: low nibbles are values 0..16, high ones 16..32)
/// expanded to its 32 weights `q·d + m`, a multiply and then an add as the GGUF reader
/// rounds them (a prompt's panels, `QMatrix::matmul_panels`).
///
/// # Safety
/// The CPU must support AVX2. (The lengths are checked.)
#[target_feature(enable = "avx2")]
pub(super) unsafe fn expand_nibbles(q: &[u8], d: f32, m: f32, out: &mut [f32]) {
    assert!(q.len() == 16 && out.len() == 32);
    // SAFETY: 16 bytes at q and 32 floats at out (asserted).
    unsafe {
        let v = _mm_loadu_si128(q.as_ptr().cast());
        let mask = _mm_set1_epi8(0x0f);
        let (lo, hi) = (_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask));
        let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
        let o = out.as_mut_ptr();
        // No closure: it would not inherit AVX2.
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d), m));
        _mm256_storeu_ps(o.add(8), _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d), m));
        _mm256_storeu_ps(o.add(16), _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d), m));
        _mm256_storeu_ps(o.add(24), _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d), m));
    }
}

/// `V` tiles of eight activation rows (`xs[v]`: `[cols, 8]`, a column's eight values side
/// by side, as `super::pack_rows` lays them) times `R` expanded weight rows (`ws[j]`,
/// `cols` floats each): `acc[j][v][l] += Σ_k ws[j][k] · xs[v][8k + l]` for the first eight
/// lanes (from zero when `start`), each output one chain of fused multiply-adds in column
/// order, continued across calls over successive blocks of columns. That is the arithmetic
/// of `super::panel_tile_portable`, so both give the same bits, and an activation row's
/// result does not depend on its tile or on what else the call multiplies.
///
/// # Safety
/// The CPU must support AVX2 and FMA. (The lengths are checked.)
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panel_tile<const R: usize, const V: usize>(ws: [&[f32]; R], xs: [&[f32]; V], acc: &mut super::TileAcc, start: bool) {
    let cols = ws[0].len();
    for w in ws {
        assert_eq!(w.len(), cols);
    }
    for x in xs {
        assert_eq!(x.len(), 8 * cols);
    }
    let mut sums = [[_mm256_setzero_ps(); V]; R];
    // SAFETY: every weight row holds `cols` floats and every tile `8 · cols` (asserted);
    // `acc[j][v]` is a `[f32; 16]` (indexing checked), room for the lanes loaded and stored.
    unsafe {
        if !start {
            for j in 0..R {
                for v in 0..V {
                    sums[j][v] = _mm256_loadu_ps(acc[j][v].as_ptr());
                }
            }
        }
        for k in 0..cols {
            let mut x = [_mm256_setzero_ps(); V];
            for v in 0..V {
                x[v] = _mm256_loadu_ps(xs[v].as_ptr().add(8 * k));
            }
            for j in 0..R {
                let w = _mm256_set1_ps(*ws[j].get_unchecked(k));
                for v in 0..V {
                    sums[j][v] = _mm256_fmadd_ps(w, x[v], sums[j][v]);
                }
            }
        }
        for j in 0..R {
            for v in 0..V {
                _mm256_storeu_ps(acc[j][v].as_mut_ptr(), sums[j][v]);
            }
        }
    }
}

/// How far ahead of the block being multiplied the K-quant 8-bit kernels ask for the
/// weight codes (`prefetcht0`), in bytes. Decoding one token reads each weight once, straight from
/// memory: without the hint the loads wait on DRAM (the samples of a profile sit on the
/// instructions after them) and more work per block makes it slower, not the arithmetic.
/// Measured on SmolLM2 Q4_1, one thread: 1024 bytes gave 1.12x, 2048 1.17x, 4096 no more
/// (BENCHMARKS.md). The f32-activation kernels are bound by expanding the blocks instead,
/// and gained nothing from it. The eight-row kernels ask for the next group's codes
/// instead, which lie right after the group's.
const AHEAD: usize = 2048;

/// The 4-byte chunks of eight weight rows' 16 code bytes (row `i` at `p[i]`), turned so
/// that register `c` holds chunk `c` of every row, row `i` in lane `i`: a 4 × 4 transpose of
/// 32-bit words in each 128-bit half (rows 0-3 in the low half, 4-7 in the high).
///
/// # Safety
/// AVX2; 16 readable bytes at each `p[i]`.
#[inline(always)]
unsafe fn chunks8(p: [*const u8; 8]) -> [__m256i; 4] {
    // SAFETY: the caller's promise.
    unsafe {
        let pair = |a: *const u8, b: *const u8| _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(_mm_loadu_si128(a.cast())), _mm_loadu_si128(b.cast()));
        let (r0, r1, r2, r3) = (pair(p[0], p[4]), pair(p[1], p[5]), pair(p[2], p[6]), pair(p[3], p[7]));
        // Rows 0 and 1 (4 and 5), chunks 0-1 and 2-3; rows 2 and 3 (6 and 7) likewise.
        let (t0, t1) = (_mm256_unpacklo_epi32(r0, r1), _mm256_unpackhi_epi32(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_epi32(r2, r3), _mm256_unpackhi_epi32(r2, r3));
        [_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2), _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)]
    }
}

/// Four activation codes at `p` in every 32-bit lane.
///
/// # Safety
/// AVX2; 4 readable bytes at `p`.
#[inline(always)]
unsafe fn spread4(p: *const i8) -> __m256i {
    // SAFETY: the caller's promise.
    unsafe { _mm256_set1_epi32(p.cast::<i32>().read_unaligned()) }
}

/// For a group of eight weight rows of 4-bit codes (16 bytes a block: low nibbles are values
/// 0..16, high nibbles 16..32, each `q·d + m`) and each of `R` rows of 8-bit activations, the
/// dot products, weight row `i` in lane `i` of the result. Per block, each row's 32
/// products are summed exactly in integers (`vpmaddubsw` in 16 bits, where eight pair sums
/// of at most 2·15·127 cannot overflow, then `vpmaddwd` to 32 bits); then, per row, one
/// fused multiply-add by `d·dx` and one by `m·Σx` (the exact f32 sum of the block's
/// activations). That is [`super::dot_q8`]'s arithmetic, lane by lane: the result is the
/// same bits whatever `R`, whichever rows share the call, and on the portable kernel.
///
/// The group's scales and offsets come interleaved (`d[8·b + i]` is row `i`'s scale of
/// block `b`), so a block's eight are one load; the codes of eight rows are turned into
/// lanes by [`chunks8`], once for all `R` rows.
///
/// # Safety
/// The CPU must support AVX2 and FMA. (The lengths are checked: with `nb = xd[0].len()`
/// blocks, every `qs[i]` holds `16·nb` bytes, `d` and `m` `8·nb` values, every `xs[r]`
/// `32·nb` codes and every `xsums[r]` `nb` sums.)
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot8_nibbles_q8<const R: usize>(qs: [&[u8]; 8], d: &[f32], m: &[f32], xs: [&[i8]; R], xd: [&[f32]; R], xsums: [&[f32]; R]) -> [[f32; 8]; R] {
    // SAFETY: the caller's promise.
    unsafe { nibbles_q8::<R, false>(qs, d, m, xs, xd, xsums) }
}

/// [`dot8_nibbles_q8`] with AVX-VNNI: one `vpdpbusd` sums four products of a lane into 32
/// bits where AVX2 takes `vpmaddubsw`, an add and, per block, `vpmaddwd`. The integer sums
/// are the same, so the results are the same bits.
///
/// # Safety
/// The CPU must support AVX2, FMA and AVX-VNNI. (The lengths are checked.)
#[target_feature(enable = "avx2,fma,avxvnni")]
pub unsafe fn dot8_nibbles_q8_vnni<const R: usize>(qs: [&[u8]; 8], d: &[f32], m: &[f32], xs: [&[i8]; R], xd: [&[f32]; R], xsums: [&[f32]; R]) -> [[f32; 8]; R] {
    // SAFETY: the caller's promise.
    unsafe { nibbles_q8::<R, true>(qs, d, m, xs, xd, xsums) }
}

/// The body of [`dot8_nibbles_q8`] and [`dot8_nibbles_q8_vnni`], inlined into each.
///
/// # Safety
/// As theirs.
#[inline(always)]
unsafe fn nibbles_q8<const R: usize, const VNNI: bool>(qs: [&[u8]; 8], d: &[f32], m: &[f32], xs: [&[i8]; R], xd: [&[f32]; R], xsums: [&[f32]; R]) -> [[f32; 8]; R] {
    let nb = xd[0].len();
    assert!(qs.iter().all(|q| q.len() == 16 * nb) && d.len() == 8 * nb && m.len() == 8 * nb);
    assert!((0..R).all(|r| xs[r].len() == 32 * nb && xd[r].len() == nb && xsums[r].len() == nb));
    // SAFETY: AVX, by the caller's promise.
    let (mask, ones, mut acc) = unsafe { (_mm256_set1_epi8(0x0f), _mm256_set1_epi16(1), [_mm256_setzero_ps(); R]) };
    for b in 0..nb {
        // SAFETY: b < nb, so every read is inside the lengths asserted above; a prefetch may
        // point anywhere.
        unsafe {
            // The group's rows lie one after another: ask for the next group's codes, two
            // lines a block, as this group's are read.
            let next = qs[7].as_ptr().wrapping_add(16 * nb + 128 * b);
            _mm_prefetch::<_MM_HINT_T0>(next.cast());
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64).cast());
            let c = chunks8(qs.map(|q| q.as_ptr().add(16 * b)));
            // Register j holds values 4j..4j+4 of each row: the low nibbles of chunks 0-3,
            // then their high nibbles (values 16..32).
            let w = [
                _mm256_and_si256(c[0], mask),
                _mm256_and_si256(c[1], mask),
                _mm256_and_si256(c[2], mask),
                _mm256_and_si256(c[3], mask),
                _mm256_and_si256(_mm256_srli_epi16(c[0], 4), mask),
                _mm256_and_si256(_mm256_srli_epi16(c[1], 4), mask),
                _mm256_and_si256(_mm256_srli_epi16(c[2], 4), mask),
                _mm256_and_si256(_mm256_srli_epi16(c[3], 4), mask),
            ];
            let (dv, mv) = (_mm256_loadu_ps(d.as_ptr().add(8 * b)), _mm256_loadu_ps(m.as_ptr().add(8 * b)));
            for r in 0..R {
                let x = xs[r].as_ptr().add(32 * b);
                let s = if VNNI {
                    let mut s = _mm256_setzero_si256();
                    for (j, &wj) in w.iter().enumerate() {
                        s = _mm256_dpbusd_avx_epi32(s, wj, spread4(x.add(4 * j)));
                    }
                    s
                } else {
                    let mut s = _mm256_maddubs_epi16(w[0], spread4(x));
                    for (j, &wj) in w.iter().enumerate().skip(1) {
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wj, spread4(x.add(4 * j))));
                    }
                    _mm256_madd_epi16(s, ones)
                };
                let sum = _mm256_cvtepi32_ps(s);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(*xd[r].get_unchecked(b))), sum, acc[r]);
                acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*xsums[r].get_unchecked(b)), acc[r]);
            }
        }
    }
    let mut out = [[0f32; 8]; R];
    for r in 0..R {
        // SAFETY: 8 floats into an array of 8.
        unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
    out
}

/// As [`dot8_nibbles_q8`] for a group of eight weight rows of signed 8-bit codes (32 bytes a
/// block, each `q·d`). `vpmaddubsw` takes one unsigned operand, so the codes lend their
/// sign to the activations (|q| · sign(q)·x = q·x); a pair sum may reach 2·128·127, so each
/// goes to 32 bits before the next is added.
///
/// # Safety
/// The CPU must support AVX2 and FMA. (The lengths are checked: every `qs[i]` holds `32·nb`
/// bytes, `d` `8·nb` values, every `xs[r]` `32·nb` codes.)
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot8_bytes_q8<const R: usize>(qs: [&[u8]; 8], d: &[f32], xs: [&[i8]; R], xd: [&[f32]; R]) -> [[f32; 8]; R] {
    // SAFETY: the caller's promise.
    unsafe { bytes_q8::<R, false>(qs, d, xs, xd) }
}

/// [`dot8_bytes_q8`] with AVX-VNNI (`vpdpbusd` on the codes' magnitudes and the signed
/// activations): the same integer sums, the same bits.
///
/// # Safety
/// The CPU must support AVX2, FMA and AVX-VNNI. (The lengths are checked.)
#[target_feature(enable = "avx2,fma,avxvnni")]
pub unsafe fn dot8_bytes_q8_vnni<const R: usize>(qs: [&[u8]; 8], d: &[f32], xs: [&[i8]; R], xd: [&[f32]; R]) -> [[f32; 8]; R] {
    // SAFETY: the caller's promise.
    unsafe { bytes_q8::<R, true>(qs, d, xs, xd) }
}

/// The body of [`dot8_bytes_q8`] and [`dot8_bytes_q8_vnni`], inlined into each.
///
/// # Safety
/// As theirs.
#[inline(always)]
unsafe fn bytes_q8<const R: usize, const VNNI: bool>(qs: [&[u8]; 8], d: &[f32], xs: [&[i8]; R], xd: [&[f32]; R]) -> [[f32; 8]; R] {
    let nb = xd[0].len();
    assert!(qs.iter().all(|q| q.len() == 32 * nb) && d.len() == 8 * nb);
    assert!((0..R).all(|r| xs[r].len() == 32 * nb && xd[r].len() == nb));
    // SAFETY: AVX, by the caller's promise.
    let (ones, mut acc) = unsafe { (_mm256_set1_epi16(1), [_mm256_setzero_ps(); R]) };
    for b in 0..nb {
        // SAFETY: as in `dot8_nibbles_q8`.
        unsafe {
            let next = qs[7].as_ptr().wrapping_add(32 * nb + 256 * b);
            for line in [0, 64, 128, 192] {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line).cast());
            }
            let (lo, hi) = (chunks8(qs.map(|q| q.as_ptr().add(32 * b))), chunks8(qs.map(|q| q.as_ptr().add(32 * b + 16))));
            let w = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
            let magnitude = w.map(|q| _mm256_sign_epi8(q, q));
            let dv = _mm256_loadu_ps(d.as_ptr().add(8 * b));
            for r in 0..R {
                let x = xs[r].as_ptr().add(32 * b);
                let mut s = _mm256_setzero_si256();
                for j in 0..8 {
                    let signed = _mm256_sign_epi8(spread4(x.add(4 * j)), w[j]);
                    s = if VNNI {
                        _mm256_dpbusd_avx_epi32(s, magnitude[j], signed)
                    } else {
                        _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude[j], signed), ones))
                    };
                }
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(*xd[r].get_unchecked(b))), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
    }
    let mut out = [[0f32; 8]; R];
    for r in 0..R {
        // SAFETY: 8 floats into an array of 8.
        unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
    out
}

/// The half floats at bytes `i` and `i + 2` of a block (the second 0 past its end), by
/// F16C: the `half` crate's conversion is a call that asks the CPU for F16C each time.
///
/// # Safety
/// The CPU must support F16C (inlined into the kernels compiled for it).
#[inline(always)]
unsafe fn halves(b: &[u8], i: usize) -> (f32, f32) {
    let lo = u32::from(u16::from_le_bytes([b[i], b[i + 1]]));
    let hi = b.get(i + 2..i + 4).map_or(0, |h| u32::from(u16::from_le_bytes([h[0], h[1]])));
    // SAFETY: the caller's promise.
    unsafe {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((lo | hi << 16) as i32));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }
}

/// Word `k` (0..8) of each 128-bit half of `v` in all eight words of that half.
#[inline(always)]
unsafe fn spread_word(v: __m256i, k: i16) -> __m256i {
    // SAFETY: the caller's CPU has AVX2 (inlined into the kernels compiled for it).
    unsafe { _mm256_shuffle_epi8(v, _mm256_set1_epi16(((2 * k + 1) << 8) | (2 * k))) }
}

/// Each of `R` accumulators' eight lanes summed ([`hsum256`]).
#[inline(always)]
unsafe fn lane_sums<const R: usize>(acc: [__m256; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for r in 0..R {
        // SAFETY: the caller's CPU has AVX (inlined into the kernels compiled for it).
        out[r] = unsafe { hsum256(acc[r]) };
    }
    out
}

/// For each of `R` rows of 8-bit activations in blocks of 256 (one scale `dx` per
/// super-block, the sum of each 16 codes), the dot products with whole rows of Q4_K
/// super-blocks (144 bytes each: `d`, `dmin`, twelve bytes of 6-bit scales and mins, 128
/// bytes of nibbles; each sub-block of 32 is `d·sc·q − dmin·m`), or with `FIVE` of Q5_K
/// ones (176 bytes: 32 bytes of fifth bits before the nibbles, bit `j` of byte `l` on top
/// of value `l` of sub-block `j`), without expanding them; weight row `k`'s products go to
/// `put(k, …)`. Per super-block, in integers: `vpmaddubsw` sums `q·qx` in pairs and
/// `vpmaddwd` multiplies them by each sub-block's scale, eight sub-blocks into one
/// register, then one fused multiply-add by `d·dx`; the mins meet the activations' code
/// sums the same way (`vpmaddwd`, exact), times `−dmin·dx`. A call takes a run of weight
/// rows, so that decoding one token is a call per run, not per row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. (The lengths are checked: every `xd[r]` holds
/// one scale per super-block of a row, every `xs[r]` 256 codes and every `xsums[r]` 16
/// sums per super-block, and `w` whole rows.)
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dots_q4_k_q8<const FIVE: bool, const R: usize>(w: &[u8], xs: [&[i8]; R], xd: [&[f32]; R], xsums: [&[i16]; R], mut put: impl FnMut(usize, [f32; R])) {
    let (bytes, codes) = if FIVE { (176, 48) } else { (144, 16) };
    let supers = xd[0].len();
    for r in 0..R {
        assert!(xs[r].len() == 256 * supers && xd[r].len() == supers && xsums[r].len() == 16 * supers);
    }
    assert!(supers > 0 && w.len().is_multiple_of(bytes * supers), "whole rows of {supers} super-blocks");
    let (mask, bit) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(1));
    for (k, row) in w.chunks_exact(bytes * supers).enumerate() {
        let mut acc = [_mm256_setzero_ps(); R];
        for (s, b) in row.chunks_exact(bytes).enumerate() {
            // SAFETY: this kernel runs where F16C is.
            let (d, dmin) = unsafe { halves(b, 0) };
            let (sc, mn) = crate::gguf::k_scales_mins(&b[4..16]);
            // SAFETY: `b` holds a whole super-block, and each row 256 codes, a scale and 16
            // sums from super-block `s` on (the lengths asserted above); prefetches may
            // point anywhere.
            unsafe {
                for line in [0, 64, 128] {
                    _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(AHEAD + line).cast());
                }
                // The scales as words in both halves; each min twice, against the sums of
                // sixteen codes.
                let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(sc))));
                let mn = _mm_cvtsi64_si128(i64::from_le_bytes(mn));
                let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn, mn));
                // Q5_K's fifth bits, shifted down two sub-blocks a pair (16-bit shifts: the
                // mask keeps each byte's own bit).
                let mut fifth = if FIVE { _mm256_loadu_si256(b.as_ptr().add(16).cast()) } else { _mm256_setzero_si256() };
                let mut sums = [_mm256_setzero_si256(); R];
                for p in 0..4 {
                    let v = _mm256_loadu_si256(b.as_ptr().add(codes + 32 * p).cast());
                    // Sub-block 2p in the low nibbles, 2p + 1 in the high ones.
                    let mut lo = _mm256_and_si256(v, mask);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    if FIVE {
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(fifth, bit), 4));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(fifth, 1), bit), 4));
                        fifth = _mm256_srli_epi16(fifth, 2);
                    }
                    let (s0, s1) = (spread_word(scales, 2 * p as i16), spread_word(scales, 2 * p as i16 + 1));
                    for r in 0..R {
                        let x = xs[r].as_ptr().add(256 * s + 64 * p);
                        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(x.cast())), s0);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256(x.add(32).cast())), s1);
                        sums[r] = _mm256_add_epi32(sums[r], _mm256_add_epi32(p0, p1));
                    }
                }
                for r in 0..R {
                    let dx = *xd[r].get_unchecked(s);
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sums[r]), acc[r]);
                    let offsets = _mm256_madd_epi16(mins, _mm256_loadu_si256(xsums[r].as_ptr().add(16 * s).cast()));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * dx), _mm256_cvtepi32_ps(offsets), acc[r]);
                }
            }
        }
        // SAFETY: this kernel runs where AVX is.
        put(k, unsafe { lane_sums(acc) });
    }
}

/// As [`dots_q4_k_q8`] over Q6_K super-blocks (210 bytes: 128 of low nibbles, 64 of high
/// bit pairs, sixteen signed 8-bit scales, `d`; each value `d·sc·(q − 32)`, a scale per
/// sixteen). The codes stay unsigned, `vpmaddubsw`'s unsigned operand, and `vpmaddwd`
/// multiplies each sixteen's sums by its own scale; the 32 taken off every code comes off
/// once a super-block, as `32·Σ sc·Σqx` over the activations' sums of sixteen. The whole
/// super-block is summed exactly in 32 bits before one multiply by `d·dx`.
///
/// # Safety
/// As for [`dots_q4_k_q8`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dots_q6_k_q8<const R: usize>(w: &[u8], xs: [&[i8]; R], xd: [&[f32]; R], xsums: [&[i16]; R], mut put: impl FnMut(usize, [f32; R])) {
    const BYTES: usize = 210;
    let supers = xd[0].len();
    for r in 0..R {
        assert!(xs[r].len() == 256 * supers && xd[r].len() == supers && xsums[r].len() == 16 * supers);
    }
    assert!(supers > 0 && w.len().is_multiple_of(BYTES * supers), "whole rows of {supers} super-blocks");
    let (m4, m2) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
    // Scale `j`'s byte in the low eight bytes, `j + 1`'s in the high ones.
    let pick = |j: i64| _mm_set_epi64x((j + 1) * 0x0101_0101_0101_0101, j * 0x0101_0101_0101_0101);
    for (k, row) in w.chunks_exact(BYTES * supers).enumerate() {
        let mut acc = [_mm256_setzero_ps(); R];
        for (s, b) in row.chunks_exact(BYTES).enumerate() {
            // SAFETY: this kernel runs where F16C is.
            let d = unsafe { halves(b, 208) }.0;
            // SAFETY: `b` holds 210 bytes, and each row 256 codes, a scale and 16 sums from
            // super-block `s` on (the lengths asserted above); prefetches may point anywhere.
            unsafe {
                for line in [0, 64, 128, 192] {
                    _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(AHEAD + line).cast());
                }
                let bp = b.as_ptr();
                let sc = _mm_loadu_si128(bp.add(192).cast());
                let mut sums = [_mm256_setzero_si256(); R];
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(bp.add(64 * h).cast());
                    let ql1 = _mm256_loadu_si256(bp.add(64 * h + 32).cast());
                    let qh = _mm256_loadu_si256(bp.add(128 + 32 * h).cast());
                    // Group g of 32 values: low nibbles of ql0, ql1, then their high nibbles;
                    // bits 2g and 2g + 1 of qh on top.
                    let groups = [
                        (_mm256_and_si256(ql0, m4), _mm256_and_si256(qh, m2)),
                        (_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2)),
                        (_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 4), m2)),
                        (_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 6), m2)),
                    ];
                    for (g, &(low, high)) in groups.iter().enumerate() {
                        let q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                        // Sixteen 16-bit pair sums: the first eight of values 0..16 (scale
                        // 2j), the rest of 16..32 (scale 2j + 1).
                        let scales = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, pick(2 * (4 * h + g) as i64)));
                        for r in 0..R {
                            let x = _mm256_loadu_si256(xs[r].as_ptr().add(256 * s + 128 * h + 32 * g).cast());
                            sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), scales));
                        }
                    }
                }
                let scales = _mm256_cvtepi8_epi16(sc);
                for r in 0..R {
                    let offsets = _mm256_madd_epi16(scales, _mm256_loadu_si256(xsums[r].as_ptr().add(16 * s).cast()));
                    let exact = _mm256_sub_epi32(sums[r], _mm256_slli_epi32(offsets, 5));
                    let dx = *xd[r].get_unchecked(s);
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(exact), acc[r]);
                }
            }
        }
        // SAFETY: this kernel runs where AVX is.
        put(k, unsafe { lane_sums(acc) });
    }
}

/// `max |x|` of a block of 32 activations.
///
/// # Safety
/// The CPU must support AVX2; `x` holds 32 values.
#[target_feature(enable = "avx2")]
pub unsafe fn amax32(x: &[f32]) -> f32 {
    assert!(x.len() == 32);
    // SAFETY: 32 floats at x (asserted).
    unsafe {
        let p = x.as_ptr();
        let sign = _mm256_set1_ps(-0.0);
        let a = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p)), _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8)))),
            _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(16))), _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(24)))),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
    }
}

/// Rounds 32 activations times `inv` (one over their block's step) to signed 8 bits, as
/// [`super::Q8Rows`]'s portable loop does: to nearest, ties to even, saturating.
///
/// # Safety
/// The CPU must support AVX2; `x` and `out` hold 32 values.
#[target_feature(enable = "avx2")]
pub unsafe fn round32(x: &[f32], inv: f32, out: &mut [i8]) {
    assert!(x.len() == 32 && out.len() == 32);
    // SAFETY: 32 floats at x and 32 bytes at out (asserted).
    unsafe {
        let (p, inv) = (x.as_ptr(), _mm256_set1_ps(inv));
        // cvtps rounds to nearest even (the default rounding mode); the packs saturate.
        let q = [
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p), inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(8)), inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(16)), inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(24)), inv)),
        ];
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        // The packs interleave the 128-bit lanes: put the groups of four back in order.
        let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out.as_mut_ptr().cast(), ordered);
    }
}
