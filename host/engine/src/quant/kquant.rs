//! Products from K-quant super-blocks (`Q4_K`, `Q5_K`, `Q6_K`) as the GGUF stores them.
//!
//! The weights stay at their file's size in memory. For one row of `x` (decoding a single
//! stream) each weight is rebuilt in a register and multiplied at once; for more rows each
//! super-block of 256 is expanded once into a buffer on the stack, then multiplied by every
//! row, so the expansion is paid once per step. The same loops are compiled three times,
//! for AVX-512, for AVX2 with FMA, and for the baseline, and the widest the CPU runs is
//! called (the loops are written so the compiler vectorizes them).
#![allow(unsafe_code)]

use super::{Kernel, QMatrix};
use crate::gguf::{GgmlType, k_scales_mins};

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
        Kernel::Portable => rows_body::<false>(ty, m, first, x, n, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn rows_avx512(ty: GgmlType, m: &QMatrix, first: usize, x: &[f32], n: usize, out: &mut [f32]) {
    rows_body::<true>(ty, m, first, x, n, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_avx2(ty: GgmlType, m: &QMatrix, first: usize, x: &[f32], n: usize, out: &mut [f32]) {
    rows_body::<true>(ty, m, first, x, n, out)
}

/// Whole super-blocks (`blocks`, rows after one another) expanded to f32 into `out`, as
/// [`crate::gguf::dequantize`] expands them.
pub(super) fn expand(kernel: Kernel, ty: GgmlType, blocks: &[u8], out: &mut [f32]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::available` saw AVX-512 F (and AVX2, FMA) on this CPU.
        Kernel::Avx512 => unsafe { expand_avx512(ty, blocks, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::available` saw AVX2 and FMA on this CPU.
        Kernel::Avx2 => unsafe { expand_avx2(ty, blocks, out) },
        Kernel::Portable => expand_body(ty, blocks, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn expand_avx512(ty: GgmlType, blocks: &[u8], out: &mut [f32]) {
    expand_body(ty, blocks, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn expand_avx2(ty: GgmlType, blocks: &[u8], out: &mut [f32]) {
    expand_body(ty, blocks, out)
}

/// Unfused multiply-adds, so every value equals the GGUF reader's.
#[inline(always)]
fn expand_body(ty: GgmlType, blocks: &[u8], out: &mut [f32]) {
    let (_, bytes) = ty.block();
    assert_eq!(blocks.len() / bytes * SUPER, out.len(), "out holds the blocks' values");
    for (block, w) in blocks.chunks_exact(bytes).zip(out.chunks_exact_mut(SUPER)) {
        expand_super::<false>(ty, block, w.try_into().expect("a super-block of values"));
    }
}

/// One super-block expanded into `w`.
#[inline(always)]
fn expand_super<const FMA: bool>(ty: GgmlType, block: &[u8], w: &mut [f32; SUPER]) {
    match ty {
        GgmlType::Q4_K => expand_k::<FMA, false>(block, w),
        GgmlType::Q5_K => expand_k::<FMA, true>(block, w),
        GgmlType::Q6_K => expand_q6_k(block, w),
        _ => unreachable!("{ty:?} is not a K-quant"),
    }
}

#[inline(always)]
fn rows_body<const FMA: bool>(
    ty: GgmlType,
    m: &QMatrix,
    first: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let (_, bytes) = ty.block();
    let per_row = m.cols / SUPER * bytes;
    let row = |k: usize| &m.qs[(first + k) * per_row..][..per_row];
    let x_block = |i: usize, b: usize| -> &[f32; SUPER] {
        x[i * m.cols + b * SUPER..][..SUPER]
            .try_into()
            .expect("a super-block of x")
    };
    // Plain loops around the arithmetic: written as `map(..).sum()` over the blocks, this
    // path measured 25× slower (0.9 tokens/s), as if the closure had lost the function's
    // target features and its `mul_add` had become a libm call.
    if n == 1 {
        for (k, o) in out.iter_mut().enumerate() {
            // One set of lanes for the whole row, summed across once at its end.
            let mut acc = [0f32; 16];
            for (b, block) in row(k).chunks_exact(bytes).enumerate() {
                match ty {
                    GgmlType::Q4_K => dot_k::<FMA, false>(block, x_block(0, b), &mut acc),
                    GgmlType::Q5_K => dot_k::<FMA, true>(block, x_block(0, b), &mut acc),
                    _ => dot_q6_k::<FMA>(block, x_block(0, b), &mut acc),
                }
            }
            *o = acc.iter().sum();
        }
        return;
    }
    let mut w = [0f32; SUPER];
    let mut accs = vec![[0f32; 16]; n];
    for (k, out_row) in out.chunks_exact_mut(n).enumerate() {
        accs.fill([0.0; 16]);
        for (b, block) in row(k).chunks_exact(bytes).enumerate() {
            expand_super::<FMA>(ty, block, &mut w);
            for (i, acc) in accs.iter_mut().enumerate() {
                dot::<FMA>(&w, x_block(i, b), acc);
            }
        }
        for (o, acc) in out_row.iter_mut().zip(&accs) {
            *o = acc.iter().sum();
        }
    }
}

/// `a·b + c`, fused where the CPU has FMA (a software fused multiply-add would be slow).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Σ w·x over one super-block, added into 16 lanes.
#[inline(always)]
fn dot<const FMA: bool>(w: &[f32; SUPER], x: &[f32; SUPER], acc: &mut [f32; 16]) {
    for (w, x) in w.chunks_exact(16).zip(x.chunks_exact(16)) {
        for j in 0..16 {
            acc[j] = madd::<FMA>(w[j], x[j], acc[j]);
        }
    }
}

/// The half float at byte `i` of a block.
#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Each sub-block's scale and offset in a Q4_K or Q5_K super-block, `w = s·q − o`:
/// `(d·sc, dmin·m)`, decoded once for the super-block.
#[inline(always)]
fn k_factors(b: &[u8]) -> [(f32, f32); 8] {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = k_scales_mins(&b[4..16]);
    std::array::from_fn(|j| (d * f32::from(sc[j]), dmin * f32::from(m[j])))
}

/// The 32 code bytes of sub-block pair `pair` of a Q4_K (or with `FIVE` a Q5_K)
/// super-block: the first sub-block in the low nibbles.
#[inline(always)]
fn k_codes<const FIVE: bool>(b: &[u8], pair: usize) -> &[u8; 32] {
    let at = if FIVE { 48 } else { 16 } + 32 * pair;
    b[at..at + 32].try_into().expect("32 code bytes")
}

/// Code `l` (< 32) of sub-block `2·pair + sub` of a Q4_K super-block, or with `FIVE` of a
/// Q5_K one: the pair's nibble, and for Q5_K bit `2·pair + sub` of byte `l` of the 32
/// bytes before the nibbles, worth 16.
#[inline(always)]
fn k_code<const FIVE: bool>(b: &[u8], q: &[u8; 32], pair: usize, sub: usize, l: usize) -> u8 {
    let nibble = (q[l] >> (4 * sub)) & 0x0f;
    if FIVE { nibble | (((b[16 + l] >> (2 * pair + sub)) & 1) << 4) } else { nibble }
}

/// A Q4_K (or with `FIVE` a Q5_K) super-block expanded: `d·sc·q − dmin·m` per sub-block
/// of 32, the layout of [`crate::gguf::dequantize`].
#[inline(always)]
fn expand_k<const FMA: bool, const FIVE: bool>(b: &[u8], w: &mut [f32; SUPER]) {
    let f = k_factors(b);
    for pair in 0..4 {
        let (q, (s0, o0), (s1, o1)) = (k_codes::<FIVE>(b, pair), f[2 * pair], f[2 * pair + 1]);
        let (lo, hi) = w[64 * pair..64 * pair + 64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = madd::<FMA>(s0, f32::from(k_code::<FIVE>(b, q, pair, 0, l)), -o0);
            hi[l] = madd::<FMA>(s1, f32::from(k_code::<FIVE>(b, q, pair, 1, l)), -o1);
        }
    }
}

/// Σ w·x over one Q4_K (or with `FIVE` Q5_K) super-block, added into 16 lanes, each
/// weight rebuilt in a register as it is used. The values go in their order, as
/// [`expand_k`] and [`dot`] take them (the low nibbles' sub-block, then the high ones'), so
/// a row's result does not depend on how many rows share its step.
#[inline(always)]
fn dot_k<const FMA: bool, const FIVE: bool>(b: &[u8], x: &[f32; SUPER], acc: &mut [f32; 16]) {
    let f = k_factors(b);
    for pair in 0..4 {
        let q = k_codes::<FIVE>(b, pair);
        for sub in 0..2 {
            let (s, o) = f[2 * pair + sub];
            let xs = &x[64 * pair + 32 * sub..64 * pair + 32 * sub + 32];
            for h in 0..2 {
                for j in 0..16 {
                    let w = madd::<FMA>(s, f32::from(k_code::<FIVE>(b, q, pair, sub, 16 * h + j)), -o);
                    acc[j] = madd::<FMA>(w, xs[16 * h + j], acc[j]);
                }
            }
        }
    }
}

/// The Q6_K code of value `32·g + l` (group `g` of four, `l` < 32) in one half of a block:
/// low nibbles of `ql` for groups 0 and 1, high for 2 and 3, two bits of `qh` on top; as a
/// signed value, `q − 32`.
#[inline(always)]
fn q6_k_code(ql: &[u8; 64], qh: &[u8; 32], g: usize, l: usize) -> i8 {
    let low = ql[32 * (g % 2) + l];
    let nibble = if g < 2 { low & 0x0f } else { low >> 4 };
    (nibble | (((qh[l] >> (2 * g)) & 3) << 4)) as i8 - 32
}

/// A Q6_K super-block's halves: 64 low bytes, 32 high-bit bytes, 8 signed scales.
#[inline(always)]
fn q6_k_half(b: &[u8], half: usize) -> (&[u8; 64], &[u8; 32], &[u8]) {
    (
        b[64 * half..64 * half + 64]
            .try_into()
            .expect("64 low bytes"),
        b[128 + 32 * half..128 + 32 * half + 32]
            .try_into()
            .expect("32 high bytes"),
        &b[192 + 8 * half..192 + 8 * half + 8],
    )
}

/// A Q6_K super-block expanded: `d·sc·(q − 32)` per sub-block of 16, the layout of
/// [`crate::gguf::dequantize`].
#[inline(always)]
fn expand_q6_k(b: &[u8], w: &mut [f32; SUPER]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let (ql, qh, sc) = q6_k_half(b, half);
        for g in 0..4 {
            for l in 0..32 {
                let s = d * f32::from(sc[2 * g + l / 16] as i8);
                w[128 * half + 32 * g + l] = s * f32::from(q6_k_code(ql, qh, g, l));
            }
        }
    }
}

/// Σ w·x over one Q6_K super-block, added into 16 lanes, each weight rebuilt in a
/// register as it is used.
#[inline(always)]
fn dot_q6_k<const FMA: bool>(b: &[u8], x: &[f32; SUPER], acc: &mut [f32; 16]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let (ql, qh, sc) = q6_k_half(b, half);
        for g in 0..4 {
            for h in 0..2 {
                // Sixteen values of one sub-block share a scale.
                let s = d * f32::from(sc[2 * g + h] as i8);
                // An index loop: written with `iter_mut().enumerate()` the compiler kept
                // `acc` on the stack and decoding ran 2.5× slower.
                #[allow(clippy::needless_range_loop)]
                for j in 0..16 {
                    let l = 16 * h + j;
                    acc[j] = madd::<FMA>(s * f32::from(q6_k_code(ql, qh, g, l)), x[128 * half + 32 * g + l], acc[j]);
                }
            }
        }
    }
}
