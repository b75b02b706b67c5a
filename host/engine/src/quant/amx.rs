//! Matrix products on Intel AMX tiles, where the CPU has them (Xeon Sapphire Rapids and
//! later) and Linux grants the tile state: a prompt's products from quantized weights
//! ([`super::QMatrix::matmul_exact`], driven by `QMatrix::matmul_tiles`). (The CPU
//! training step's products were tried on them too: BENCHMARKS.md, "Prompts on AMX tiles".)
//!
//! A tile multiply (`tdpbf16ps`) does 16 × 16 × 32 bf16 multiply-adds into f32 in one
//! instruction, some sixteen times what AVX-512's fused multiply-adds do on f32. bf16 keeps 8
//! bits of a float's 24, so each operand is split in two bf16 halves, `v = hi + lo` (16
//! bits), and a product is three tile products, `aₕ·bₕ + aₕ·bₗ + aₗ·bₕ` (the `aₗ·bₗ` term,
//! about 2⁻¹⁸ of the product, is below the halves' own rounding): within about 1e-5 of the
//! f32 product instead of f32's 1e-7, a hundred times closer than 8-bit activations (the
//! tests bound it). What the split
//! costs is tile loads, which set the speed here, not the multiplies.
//!
//! Every output is one chain in a fixed order (32 values of `k` a step, the three products
//! in that order) whatever else the call multiplies, so a row's result is the same bits
//! however a prompt is cut, as on the FMA kernels; the bits are not theirs
//! (`LATHE_CPU_KERNEL=avx512` gives those).
//!
//! Operands are [`Tiles`]: a matrix split into its halves and cut into the 1 KiB tiles the
//! instructions load, `[16 rows][32 k]` for the left operand and `[16 pairs of k][16
//! columns][2]` for the right one. The activations are laid out once per call (the right
//! operand), the weights per task in panels that stay in L2 (the left).
#![allow(unsafe_code)]

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this process can multiply on AMX tiles: the CPU has AMX-BF16 and AVX-512 BF16,
/// and the kernel grants this process the tile state. Asked once.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that has AVX-512, checked first.
        let amx = is_x86_feature_detected!("avx512f") && (unsafe { __cpuid_count(7, 0) }.edx & (1 << 22 | 1 << 24)) == (1 << 22 | 1 << 24);
        amx && is_x86_feature_detected!("avx512bf16") && request_tiles()
    })
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
/// without it the first tile instruction kills the process. The grant is process-wide.
#[cfg(target_os = "linux")]
fn request_tiles() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: the arch_prctl system call with these arguments changes only which register
    // state the process may use; `syscall` clobbers rcx and r11, declared.
    unsafe {
        asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL as isize => ret, in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tiles() -> bool {
    false
}

/// Weight rows a task's panel holds: six blocks, 590 KB of halves at 1536 values of `k`,
/// in L2 while the activations' tiles go by.
pub(super) const PANEL: usize = 96;

/// bf16 values (their bit patterns).
type Bf16 = u16;

/// One operand of [`product`]: a matrix split into bf16 halves and cut into 1 KiB tiles,
/// `blocks` blocks of 16 (rows of a left operand, columns of a right one, zeros past the
/// matrix) by `nkb` blocks of 32 along `k`; tile `(b, kb)` at `(b·nkb + kb)·512`. The
/// buffers are kept between uses (every element is written each time).
#[derive(Default)]
pub(super) struct Tiles {
    hi: Vec<Bf16>,
    lo: Vec<Bf16>,
    blocks: usize,
    nkb: usize,
}

impl Tiles {
    fn reset(&mut self, blocks: usize, k: usize) {
        assert!(k.is_multiple_of(32), "k is a multiple of 32, not {k}");
        (self.blocks, self.nkb) = (blocks, k / 32);
        let len = blocks * k * 16;
        self.hi.resize(len, 0);
        self.lo.resize(len, 0);
    }

    /// Rows (left) or columns (right) the tiles cover.
    pub(super) fn width(&self) -> usize {
        16 * self.blocks
    }

    /// The left operand `A` (`[rows, k]`) from its rows: `A[r][kk]` at `src[r·stride + kk]`.
    #[cfg(test)]
    fn left(&mut self, src: &[f32], rows: usize, k: usize, stride: usize) {
        assert!(rows == 0 || (rows - 1) * stride + k <= src.len(), "the rows lie inside the buffer");
        self.left_by_rows(rows, k, |r, out| out.copy_from_slice(&src[r * stride..][..k]));
    }

    /// The left operand `A` (`[rows, k]`), row `r` written into the `k` floats `fill(r, ..)`
    /// is given (the weights' blocks expanded one row at a time: a row's 16 KiB at 4096
    /// columns stays in L1 until it is split, where a panel of rows went out to L2 and back).
    pub(super) fn left_by_rows(&mut self, rows: usize, k: usize, mut fill: impl FnMut(usize, &mut [f32])) {
        self.reset(rows.div_ceil(16), k);
        thread_local! {
            static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        ROW.with_borrow_mut(|row| {
            row.resize(k, 0.0);
            for r in 0..self.width() {
                if r < rows {
                    fill(r, row);
                } else if r == rows {
                    row.fill(0.0);
                }
                let (b, lane) = (r / 16, r % 16);
                for (kb, x) in row.chunks_exact(32).enumerate() {
                    let at = (b * self.nkb + kb) * 512 + 32 * lane;
                    // SAFETY: `available` saw AVX-512 F and BF16 before any tiles were made.
                    unsafe { split32(x, &mut self.hi[at..at + 32], &mut self.lo[at..at + 32]) };
                }
            }
        })
    }

    /// The right operand `B` (`[k, cols]`) from its columns: `B[kk][c]` at
    /// `src[c·stride + kk]` (the activations `x` of `x·Wᵀ`, whose rows are `B`'s columns).
    /// Blocks of columns come in pairs ([`product`] takes two at a time).
    pub(super) fn right_from_cols(&mut self, src: &[f32], k: usize, cols: usize, stride: usize) {
        self.reset(cols.div_ceil(32) * 2, k);
        assert!(cols == 0 || (cols - 1) * stride + k <= src.len(), "the columns lie inside the buffer");
        let (mut h, mut l) = (vec![0; k], vec![0; k]);
        for c in 0..self.width() {
            if c < cols {
                for kb in 0..self.nkb {
                    let s = 32 * kb;
                    // SAFETY: `available` saw AVX-512 F and BF16.
                    unsafe { split32(&src[c * stride + s..][..32], &mut h[s..s + 32], &mut l[s..s + 32]) };
                }
            } else if c == cols {
                h.fill(0);
                l.fill(0);
            }
            let (b, lane) = (c / 16, c % 16);
            for kb in 0..self.nkb {
                let tile = (b * self.nkb + kb) * 512 + 2 * lane;
                for p in 0..16 {
                    let (from, to) = (32 * kb + 2 * p, tile + 32 * p);
                    self.hi[to..to + 2].copy_from_slice(&h[from..from + 2]);
                    self.lo[to..to + 2].copy_from_slice(&l[from..from + 2]);
                }
            }
        }
    }
}

/// 32 floats split into bf16 halves, `x ≈ hi + lo` (each rounded to nearest even).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn split32(x: &[f32], hi: &mut [Bf16], lo: &mut [Bf16]) {
    assert!(x.len() == 32 && hi.len() == 32 && lo.len() == 32);
    // SAFETY: 32 values each (asserted); unaligned loads and stores.
    unsafe {
        let (a, b) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
        let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
        // The halves back to f32 (a bf16 is an f32's top 16 bits), and what they miss.
        let back = |half: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
        let l = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, back(_mm512_extracti64x4_epi64(h, 1))), _mm512_sub_ps(a, back(_mm512_castsi512_si256(h))));
        _mm512_storeu_si512(hi.as_mut_ptr().cast(), h);
        _mm512_storeu_si512(lo.as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(l));
    }
}

/// The tile configuration `ldtilecfg` reads (palette 1): eight tiles of 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const FULL: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Blocks of 32 along `k` a right operand's pair of blocks is multiplied over before the
/// next left block's turn: the pair's 24 KiB of tiles stay in L1 (48 KiB on Sapphire Rapids)
/// while the left blocks go by, where whole rows of `k` came from L2 for every tile.
const K_CHUNK: usize = 6;

/// `A·B` block by block: `emit(i, j, c)` for every block `i` of `a`'s rows and `j` of `b`'s
/// columns, with `c[16·r + col] = Σₖ A[16i + r][k] · B[k][16j + col]` summed as the
/// module's notes say. The right operand's pairs of blocks go by in the outer loop, each
/// against every left block, `K_CHUNK` blocks of `k` at a time (the sums in between kept in
/// memory, the same chain of additions).
pub(super) fn product(a: &Tiles, b: &Tiles, mut emit: impl FnMut(usize, usize, &[f32; 256])) {
    assert!(available(), "AMX tiles are available");
    assert_eq!(a.nkb, b.nkb, "the operands share k");
    assert!(b.blocks.is_multiple_of(2), "the right operand's blocks come in pairs");
    let (nkb, len) = (a.nkb, |t: &Tiles| t.blocks * t.nkb * 512);
    assert!(a.hi.len() >= len(a) && a.lo.len() >= len(a) && b.hi.len() >= len(b) && b.lo.len() >= len(b));
    thread_local! {
        /// Each left block's two sums (the pair's columns) between chunks of `k`.
        static SUMS: std::cell::RefCell<Vec<[[f32; 256]; 2]>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SUMS.with_borrow_mut(|sums| {
        sums.resize(a.blocks, [[0.0; 256]; 2]);
        // SAFETY: `available` saw AMX-BF16 and got the tile state. The configuration is
        // valid (palette 1, eight 16 × 64-byte tiles); every tile load reads the 1 KiB tile
        // `(i, kb)` of `a` or `(j, kb)` of `b`, inside the buffers (asserted above), or a
        // 1 KiB array of `sums`; the stores write those arrays.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &FULL, options(nostack, readonly));
            for jp in 0..b.blocks / 2 {
                for k0 in (0..nkb).step_by(K_CHUNK) {
                    for (i, sum) in sums.iter_mut().enumerate() {
                        if k0 == 0 {
                            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                        } else {
                            asm!(
                                "tileloadd tmm0, [{c0} + {s64}*1]",
                                "tileloadd tmm1, [{c1} + {s64}*1]",
                                c0 = in(reg) sum[0].as_ptr(),
                                c1 = in(reg) sum[1].as_ptr(),
                                s64 = in(reg) 64usize,
                                options(nostack, readonly),
                            );
                        }
                        for kb in k0..(k0 + K_CHUNK).min(nkb) {
                            let at = (i * nkb + kb) * 512;
                            let (b0, b1) = ((2 * jp * nkb + kb) * 512, ((2 * jp + 1) * nkb + kb) * 512);
                            // tmm2, tmm3: A's 16 rows, hi and lo; tmm4..7: B's two blocks of
                            // 16 columns, hi then lo. Each output adds aₕ·bₕ, aₕ·bₗ, aₗ·bₕ.
                            asm!(
                                "tileloadd tmm2, [{ah} + {s64}*1]",
                                "tileloadd tmm4, [{bh0} + {s64}*1]",
                                "tdpbf16ps tmm0, tmm2, tmm4",
                                "tileloadd tmm5, [{bh1} + {s64}*1]",
                                "tdpbf16ps tmm1, tmm2, tmm5",
                                "tileloadd tmm6, [{bl0} + {s64}*1]",
                                "tdpbf16ps tmm0, tmm2, tmm6",
                                "tileloadd tmm7, [{bl1} + {s64}*1]",
                                "tdpbf16ps tmm1, tmm2, tmm7",
                                "tileloadd tmm3, [{al} + {s64}*1]",
                                "tdpbf16ps tmm0, tmm3, tmm4",
                                "tdpbf16ps tmm1, tmm3, tmm5",
                                ah = in(reg) a.hi.as_ptr().add(at),
                                al = in(reg) a.lo.as_ptr().add(at),
                                bh0 = in(reg) b.hi.as_ptr().add(b0),
                                bh1 = in(reg) b.hi.as_ptr().add(b1),
                                bl0 = in(reg) b.lo.as_ptr().add(b0),
                                bl1 = in(reg) b.lo.as_ptr().add(b1),
                                s64 = in(reg) 64usize,
                                options(nostack, readonly),
                            );
                        }
                        asm!(
                            "tilestored [{c0} + {s64}*1], tmm0",
                            "tilestored [{c1} + {s64}*1], tmm1",
                            c0 = in(reg) sum[0].as_mut_ptr(),
                            c1 = in(reg) sum[1].as_mut_ptr(),
                            s64 = in(reg) 64usize,
                            options(nostack),
                        );
                    }
                }
                for (i, sum) in sums.iter().enumerate() {
                    emit(i, 2 * jp, &sum[0]);
                    emit(i, 2 * jp + 1, &sum[1]);
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32 / 997.0 - 1.0).collect()
    }

    /// `A·B`, and `(Bᵀ·Aᵀ)ᵀ` with the operands' sides swapped, are within 2⁻¹⁶ of the terms'
    /// sizes of the f64 product (the bf16 high halves alone are some fifty times further
    /// off); shapes cross the blocks' edges (16 rows, 32 columns a pair, `K_CHUNK` blocks of
    /// k) and strides exceed the widths.
    #[test]
    fn both_sides_give_the_product_within_split_bf16() {
        if !available() {
            eprintln!("this CPU has no AMX-BF16 (or Linux did not grant it): nothing to check");
            return;
        }
        for (m, k, n) in [(1, 32, 1), (16, 64, 32), (17, 96, 33), (40, 608, 7), (5, 256, 70), (3, 32 * K_CHUNK, 40), (18, 32 * (K_CHUNK + 1), 2)] {
            let (a, bt) = (values(m * (k + 3), 1), values(n * (k + 5), 2));
            let at = |r: usize, kk: usize| a[r * (k + 3) + kk];
            let bv = |kk: usize, c: usize| bt[c * (k + 5) + kk];
            // `A·B` from `left` and `right` as `[m, n]`, read back from block (i, j) of the
            // product either way round.
            let run = |left: &Tiles, right: &Tiles, swapped: bool| {
                let mut out = vec![f32::NAN; m * n];
                product(left, right, |i, j, c| {
                    for r in 0..16 {
                        for col in 0..16 {
                            let (row, cc) = if swapped { (16 * j + col, 16 * i + r) } else { (16 * i + r, 16 * j + col) };
                            if row < m && cc < n {
                                out[row * n + cc] = c[16 * r + col];
                            }
                        }
                    }
                });
                out
            };
            let (mut al, mut br, mut bl, mut ar) = (Tiles::default(), Tiles::default(), Tiles::default(), Tiles::default());
            al.left(&a, m, k, k + 3);
            br.right_from_cols(&bt, k, n, k + 5);
            let got = run(&al, &br, false);
            // The transposed product, B as the left operand (its three products in another
            // order, so within the bound rather than the same bits).
            bl.left(&bt, n, k, k + 5);
            ar.right_from_cols(&a, k, m, k + 3);
            let transposed = run(&bl, &ar, true);
            for row in 0..m {
                for c in 0..n {
                    let terms = (0..k).map(|kk| f64::from(at(row, kk)) * f64::from(bv(kk, c)));
                    let (exact, size) = terms.fold((0f64, 0f64), |(s, t), x| (s + x, t + x.abs()));
                    for (how, got) in [("A·B", &got), ("(Bᵀ·Aᵀ)ᵀ", &transposed)] {
                        let off = (f64::from(got[row * n + c]) - exact).abs() / size;
                        assert!(off <= 2f64.powi(-16), "{how} {m}x{k}x{n} [{row},{c}]: off by {off:e} of the terms' sizes");
                    }
                }
            }
        }
    }
}
