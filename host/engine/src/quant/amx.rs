//! Matrix products on Intel AMX tiles, where the CPU has them (Xeon Sapphire Rapids and
//! later) and Linux grants the tile state: a prompt's products from quantized weights
//! ([`super::QMatrix::matmul_exact`], driven by `QMatrix::matmul_tiles`), and the CPU
//! training step's products with a bf16 base ([`rows_times`], [`cols_times`]: the weights
//! are bf16 already, so the activations are rounded to bf16 once, as autocast does, and
//! each product is one tile product). An f32 base stays on the gemm crate: split into
//! halves per product, its step did not gain (BENCHMARKS.md, "Prompts on AMX tiles").
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
//!
//! A bf16 base's products also run where the CPU has AVX-512 BF16 but no tiles (AMD Zen 4,
//! Intel Cooper Lake, or `LATHE_CPU_KERNEL=avx512`): [`Engine::Dots`] multiplies the same
//! tiles in memory with `vdpbf16ps`, which sums a pair of bf16 products into each of 16 f32
//! lanes, twice the multiply-adds of an f32 FMA, and takes the same pairs in the same order
//! as a tile multiply. Without it the step widened every weight to f32 and ran slower than
//! an f32 base (BENCHMARKS.md, "A bf16 base on AVX-512 BF16, without tiles").
#![allow(unsafe_code)]

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Whether this process can multiply on AMX tiles: the CPU has AMX-BF16, AVX-512 BF16 and BW,
/// and the kernel grants this process the tile state. Asked once.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that has AVX-512, checked first.
        let amx = is_x86_feature_detected!("avx512f") && (unsafe { __cpuid_count(7, 0) }.edx & (1 << 22 | 1 << 24)) == (1 << 22 | 1 << 24);
        amx && is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw") && request_tiles()
    })
}

/// Whether this CPU has AVX-512 BF16's dot products (`vdpbf16ps`), with the F and BW
/// instructions the operands are laid out with: where [`Engine::Dots`] runs.
pub(super) fn dots_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw"))
}

/// What multiplies the tiles of [`rows_times`] and [`cols_times`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    /// AMX tile multiplies ([`dot_pair`], [`dot_quad`]).
    Tiles,
    /// AVX-512 BF16 dot products on the same tiles ([`dot_pair_dots`]).
    Dots,
}

impl Engine {
    /// The one this process runs: tiles where [`super::tiles`] allows them, else AVX-512
    /// BF16 where [`super::bf16_products`] does.
    fn here() -> Self {
        if super::tiles() {
            Self::Tiles
        } else {
            assert!(super::bf16_products(), "bf16 products need AMX tiles or AVX-512 BF16 and the AVX-512 kernel");
            Self::Dots
        }
    }

    fn available(self) -> bool {
        match self {
            Self::Tiles => available(),
            Self::Dots => dots_available(),
        }
    }
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
/// matrix) by `nkb` blocks of 32 along `k`; tile `(b, kb)` at `(b·nkb + kb)·512`. Unsplit
/// ([`Tiles::left`] without `split`: the left operands of [`rows_times`] and
/// [`cols_times`]), the values are rounded to bf16 once and `lo` stays empty. The buffers
/// are kept between uses (every element is written each time).
#[derive(Default)]
pub(super) struct Tiles {
    hi: Vec<Bf16>,
    lo: Vec<Bf16>,
    blocks: usize,
    nkb: usize,
}

impl Tiles {
    fn reset(&mut self, blocks: usize, k: usize, split: bool) {
        assert!(k.is_multiple_of(32), "k is a multiple of 32, not {k}");
        (self.blocks, self.nkb) = (blocks, k / 32);
        let len = blocks * k * 16;
        self.hi.resize(len, 0);
        self.lo.resize(if split { len } else { 0 }, 0);
    }

    /// Whether `lo` holds the second halves.
    fn split(&self) -> bool {
        !self.lo.is_empty()
    }

    /// Tile `(b, kb)` of the high halves (or of the values, unsplit).
    fn hi_tile(&self, b: usize, kb: usize) -> *const Bf16 {
        self.hi[(b * self.nkb + kb) * 512..][..512].as_ptr()
    }

    /// Rows (left) or columns (right) the tiles cover.
    pub(super) fn width(&self) -> usize {
        16 * self.blocks
    }

    /// The left operand `A` (`[rows, k]`) from its rows: `A[r][kk]` at `src[r·stride + kk]`,
    /// split into halves or (without `split`) rounded to bf16 once; blocks of rows in
    /// parallel.
    pub(super) fn left(&mut self, src: &[f32], rows: usize, k: usize, stride: usize, split: bool) {
        assert!(rows == 0 || (rows - 1) * stride + k <= src.len(), "the rows lie inside the buffer");
        self.reset(rows.div_ceil(16), k, split);
        let nkb = self.nkb;
        // Block `b`'s tiles, `[nkb][16 rows][32]`, from rows 16b.. (zeros past the matrix).
        let fill = |b: usize, hi: &mut [Bf16], mut lo: Option<&mut [Bf16]>| {
            let zeros = [0f32; 32];
            for lane in 0..16 {
                let r = 16 * b + lane;
                for kb in 0..nkb {
                    let x = if r < rows { &src[r * stride + 32 * kb..][..32] } else { &zeros[..] };
                    let at = kb * 512 + 32 * lane;
                    // SAFETY: `available` saw AVX-512 F and BF16 before any tiles were made.
                    unsafe { split32(x, &mut hi[at..at + 32], lo.as_deref_mut().map(|lo| &mut lo[at..at + 32])) };
                }
            }
        };
        let block = (nkb * 512).max(1);
        if split {
            self.hi.par_chunks_mut(block).zip(self.lo.par_chunks_mut(block)).enumerate().for_each(|(b, (hi, lo))| fill(b, hi, Some(lo)));
        } else {
            self.hi.par_chunks_mut(block).enumerate().for_each(|(b, hi)| fill(b, hi, None));
        }
    }

    /// The left operand `A` (`[rows, k]`), row `r` written into the `k` floats `fill(r, ..)`
    /// is given (the weights' blocks expanded one row at a time: a row's 16 KiB at 4096
    /// columns stays in L1 until it is split, where a panel of rows went out to L2 and back).
    pub(super) fn left_by_rows(&mut self, rows: usize, k: usize, mut fill: impl FnMut(usize, &mut [f32])) {
        self.reset(rows.div_ceil(16), k, true);
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
                    unsafe { split32(x, &mut self.hi[at..at + 32], Some(&mut self.lo[at..at + 32])) };
                }
            }
        })
    }

    /// The right operand `B` (`[k, cols]`) from its columns: `B[kk][c]` at
    /// `src[c·stride + kk]` (the activations `x` of `x·Wᵀ`, whose rows are `B`'s columns).
    /// Blocks of columns come in pairs ([`product`] takes two at a time).
    pub(super) fn right_from_cols(&mut self, src: &[f32], k: usize, cols: usize, stride: usize) {
        self.reset(cols.div_ceil(32) * 2, k, true);
        assert!(cols == 0 || (cols - 1) * stride + k <= src.len(), "the columns lie inside the buffer");
        let (mut h, mut l) = (vec![0; k], vec![0; k]);
        for c in 0..self.width() {
            if c < cols {
                for kb in 0..self.nkb {
                    let s = 32 * kb;
                    // SAFETY: `available` saw AVX-512 F and BF16.
                    unsafe { split32(&src[c * stride + s..][..32], &mut h[s..s + 32], Some(&mut l[s..s + 32])) };
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

/// 32 floats split into bf16 halves, `x ≈ hi + lo` (each rounded to nearest even), or
/// rounded to bf16 once (`hi`) without `lo`.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn split32(x: &[f32], hi: &mut [Bf16], lo: Option<&mut [Bf16]>) {
    assert!(x.len() == 32 && hi.len() == 32 && lo.as_ref().is_none_or(|lo| lo.len() == 32));
    // SAFETY: 32 values each (asserted); unaligned loads and stores.
    unsafe {
        let (a, b) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
        let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
        _mm512_storeu_si512(hi.as_mut_ptr().cast(), h);
        if let Some(lo) = lo {
            // The halves back to f32 (a bf16 is an f32's top 16 bits), and what they miss.
            let back = |half: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
            let l = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, back(_mm512_extracti64x4_epi64(h, 1))), _mm512_sub_ps(a, back(_mm512_castsi512_si256(h))));
            _mm512_storeu_si512(lo.as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(l));
        }
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
    assert!(a.split() && b.split(), "the operands are split in halves");
    assert!(b.blocks.is_multiple_of(2), "the right operand's blocks come in pairs");
    let (nkb, len) = (a.nkb, |t: &Tiles| t.blocks * t.nkb * 512);
    assert!(a.hi.len() >= len(a) && a.lo.len() >= len(a) && b.hi.len() >= len(b) && b.lo.len() >= len(b));
    thread_local! {
        /// Each left block's two sums (the pair's columns) between chunks of `k`.
        static SUMS: std::cell::RefCell<Vec<PairSums>> = const { std::cell::RefCell::new(Vec::new()) };
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

/// A bf16 matrix where it lies, row-major: `rows × cols`, element `(r, c)` at
/// `data[r·stride + c]` (bf16 bit patterns). The frozen weights of a bf16 base, which the
/// training step multiplies in place ([`rows_times`], [`cols_times`]).
#[derive(Clone, Copy)]
pub(crate) struct Bf16Rows<'a> {
    pub data: &'a [Bf16],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl Bf16Rows<'_> {
    fn check(&self) {
        assert!(fits(self.rows, self.cols), "whole pairs of tiles: {} rows, {} columns", self.rows, self.cols);
        assert!(self.cols <= self.stride && self.stride.is_multiple_of(2), "rows of pairs that do not overlap");
        assert!(self.rows == 0 || (self.rows - 1) * self.stride + self.cols <= self.data.len(), "the rows lie inside the buffer");
    }
}

/// Whether [`rows_times`] and [`cols_times`] take a `rows × cols` matrix: both in pairs of
/// tiles (a tile multiply takes 32 values of `k` and gives 16 columns, two at a time here).
pub(crate) fn fits(rows: usize, cols: usize) -> bool {
    rows.is_multiple_of(32) && cols.is_multiple_of(32)
}

/// The sums of one left block against a pair of right ones, `[pair][16 rows × 16 columns]`.
type PairSums = [[f32; 256]; 2];

/// Adds `Σ_{kb ∈ ks} A(kb)·B₀(kb)` and `A(kb)·B₁(kb)` to the two 16 × 16 sums `c` (from
/// zero when `zero`): one left block against a pair of right ones, bf16 tiles of 64-byte
/// rows, one after the other.
///
/// # Safety
/// The tile configuration [`FULL`] is loaded on this thread, and for each `kb` in `ks`
/// `a(kb)` and `b(kb)`'s two pointers point to 1 KiB tiles.
#[inline]
unsafe fn dot_pair(c: &mut PairSums, zero: bool, ks: std::ops::Range<usize>, a: impl Fn(usize) -> *const Bf16, b: impl Fn(usize) -> [*const Bf16; 2]) {
    // SAFETY: the caller's promise for the tiles; the sums are two 1 KiB arrays, 64-byte
    // rows.
    unsafe {
        if zero {
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        } else {
            asm!(
                "tileloadd tmm0, [{c0} + {s64}*1]",
                "tileloadd tmm1, [{c1} + {s64}*1]",
                c0 = in(reg) c[0].as_ptr(),
                c1 = in(reg) c[1].as_ptr(),
                s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        for kb in ks {
            let [b0, b1] = b(kb);
            asm!(
                "tileloadd tmm2, [{a} + {s64}*1]",
                "tileloadd tmm4, [{b0} + {s64}*1]",
                "tdpbf16ps tmm0, tmm2, tmm4",
                "tileloadd tmm5, [{b1} + {s64}*1]",
                "tdpbf16ps tmm1, tmm2, tmm5",
                a = in(reg) a(kb),
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {s64}*1], tmm0",
            "tilestored [{c1} + {s64}*1], tmm1",
            c0 = in(reg) c[0].as_mut_ptr(),
            c1 = in(reg) c[1].as_mut_ptr(),
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
}

/// [`dot_pair`] for two left blocks at once: four sums, each kb's two left and two right
/// tiles loaded once for four multiplies (where one left block takes three loads for two).
///
/// # Safety
/// As [`dot_pair`]'s, for both left pointers.
#[inline]
unsafe fn dot_quad(c: [&mut PairSums; 2], zero: bool, ks: std::ops::Range<usize>, a: impl Fn(usize) -> [*const Bf16; 2], b: impl Fn(usize) -> [*const Bf16; 2]) {
    let [c0, c1] = c;
    // SAFETY: the caller's promise for the tiles; the sums are four 1 KiB arrays, 64-byte
    // rows.
    unsafe {
        if zero {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        } else {
            asm!(
                "tileloadd tmm0, [{c00} + {s64}*1]",
                "tileloadd tmm1, [{c01} + {s64}*1]",
                "tileloadd tmm2, [{c10} + {s64}*1]",
                "tileloadd tmm3, [{c11} + {s64}*1]",
                c00 = in(reg) c0[0].as_ptr(),
                c01 = in(reg) c0[1].as_ptr(),
                c10 = in(reg) c1[0].as_ptr(),
                c11 = in(reg) c1[1].as_ptr(),
                s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        for kb in ks {
            let ([a0, a1], [b0, b1]) = (a(kb), b(kb));
            // tmm4, tmm5: the left blocks; tmm6, tmm7: the right pair.
            asm!(
                "tileloadd tmm4, [{a0} + {s64}*1]",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s64}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c00} + {s64}*1], tmm0",
            "tilestored [{c01} + {s64}*1], tmm1",
            "tilestored [{c10} + {s64}*1], tmm2",
            "tilestored [{c11} + {s64}*1], tmm3",
            c00 = in(reg) c0[0].as_mut_ptr(),
            c01 = in(reg) c0[1].as_mut_ptr(),
            c10 = in(reg) c1[0].as_mut_ptr(),
            c11 = in(reg) c1[1].as_mut_ptr(),
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
}

/// [`dot_pair`] on AVX-512 BF16 instead of tiles: the same sums from the same tiles in
/// memory. Row `r` of a left tile holds 16 pairs of `k` and row `p` of a right tile the
/// `p`-th pair of each of its 16 columns, so one `vdpbf16ps` of pair `p` of row `r`
/// (broadcast) with row `p` of a right tile adds a tile multiply's products for that row and
/// pair to 16 sums. Eight rows at a time against both right tiles: 16 accumulators, two
/// loads and eight broadcasts for sixteen dot products.
///
/// # Safety
/// The CPU has AVX-512 F and BF16 ([`dots_available`]); for each `kb` in `ks` `a(kb)` and
/// `b(kb)`'s two pointers point to 1 KiB tiles.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_pair_dots(c: &mut PairSums, zero: bool, ks: std::ops::Range<usize>, a: impl Fn(usize) -> *const Bf16, b: impl Fn(usize) -> [*const Bf16; 2]) {
    for half in 0..2 {
        let rows = 8 * half..8 * half + 8;
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        if !zero {
            for (r, acc) in rows.clone().zip(&mut acc) {
                for (h, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: 16 floats of row `r` of sum `h`; an unaligned load.
                    *acc = unsafe { _mm512_loadu_ps(c[h][16 * r..][..16].as_ptr()) };
                }
            }
        }
        for kb in ks.clone() {
            let ([b0, b1], left) = (b(kb), a(kb).wrapping_add(32 * rows.start));
            for p in 0..16 {
                // SAFETY: row `p` of each right tile and pair `p` of each of the left tile's
                // rows lie in the 1 KiB tiles (the caller's promise); unaligned loads. A
                // bf16 vector is 32 bf16 bit patterns.
                unsafe {
                    let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(32 * p).cast()));
                    let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(32 * p).cast()));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let pair = left.add(32 * r + 2 * p).cast::<i32>().read_unaligned();
                        let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                        acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                    }
                }
            }
        }
        for (r, acc) in rows.zip(&acc) {
            for (h, acc) in acc.iter().enumerate() {
                // SAFETY: 16 floats of row `r` of sum `h`; an unaligned store.
                unsafe { _mm512_storeu_ps(c[h][16 * r..][..16].as_mut_ptr(), *acc) };
            }
        }
    }
}

/// Where [`times`]'s tasks put their outputs: `[n, width]` row-major, each task its own
/// columns.
struct Out {
    at: *mut f32,
    n: usize,
    width: usize,
    accumulate: bool,
}

// SAFETY: tasks write disjoint columns through it, and the buffer outlives them.
unsafe impl Sync for Out {}

impl Out {
    /// Block `c` (`c[16·r + l]` for row `row + r`, column `col + l`) into its place, the
    /// rows inside the output.
    ///
    /// # Safety
    /// Columns `col..col + 16` are inside the output, and no other task writes them
    /// meanwhile.
    unsafe fn put(&self, c: &[f32; 256], row: usize, col: usize) {
        debug_assert!(col + 16 <= self.width);
        for (r, src) in c.chunks_exact(16).enumerate().take(self.n.saturating_sub(row)) {
            // SAFETY: row `row + r` < n, columns inside (the caller's promise), written by
            // this task alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.at.add((row + r) * self.width + col), 16) };
            if self.accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// Bytes of sums a task of [`times`] keeps (its column blocks by the activations' row
/// blocks, 1 KiB each): within L2 beside the tiles it reads.
const TASK_SUMS: usize = 512 << 10;

/// `out[t][j] = Σₖ z[t][k]·B[k][j]` (`+=` with `accumulate`) for `z` `[n, k]` and `out`
/// `[n, width]`: `z` rounded to bf16 once and laid out as the left tiles (by the calling
/// thread), `B`'s tiles made by `tile(kb, jb, ..)` (rows `32kb..`, columns `16jb..`, in
/// pairs along `k`) as each task needs them; products in f32. A task takes a run of
/// 32-column pairs of blocks and goes along `k` in its outer loop, each chunk of `B`'s
/// tiles made once and multiplied by every block of `z`'s rows, so `z` is read once per
/// task however long `k` (the output head's vocabulary).
#[allow(clippy::too_many_arguments)]
fn times(on: Engine, z: &[f32], n: usize, k: usize, width: usize, out: &mut [f32], accumulate: bool, tile: impl Fn(usize, usize, &mut [Bf16]) + Sync) {
    assert!(fits(32, k) && fits(32, width));
    assert!(z.len() == n * k && out.len() == n * width, "z is [n, {k}], out [n, {width}]");
    if out.is_empty() {
        return;
    }
    assert!(on.available(), "the {on:?} engine is available on this CPU");
    thread_local! {
        /// The calling thread's left tiles, kept between calls.
        static LEFT: std::cell::RefCell<Tiles> = std::cell::RefCell::new(Tiles::default());
        /// Each task's sums and right tiles (a pair's chunk, `[2][K_CHUNK][512]`), kept likewise.
        static TASK: std::cell::RefCell<(Vec<PairSums>, Vec<Bf16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    LEFT.with_borrow_mut(|zt| {
        zt.left(z, n, k, k, false);
        let (zt, nkb, pairs) = (&*zt, k / 32, width / 32);
        let dst = Out { at: out.as_mut_ptr(), n, width, accumulate };
        let per_task = (TASK_SUMS / (zt.blocks * 2048)).clamp(1, pairs.div_ceil(2 * rayon::current_num_threads()));
        let tasks: Vec<usize> = (0..pairs).step_by(per_task).collect();
        tasks.into_par_iter().for_each(|first| {
            let run = first..(first + per_task).min(pairs);
            TASK.with_borrow_mut(|(sums, bt)| {
                sums.resize(run.len() * zt.blocks, [[0.0; 256]; 2]);
                bt.resize(2 * K_CHUNK * 512, 0);
                if on == Engine::Tiles {
                    // SAFETY: `available` saw AMX-BF16 and got the tile state; the
                    // configuration is valid.
                    unsafe { asm!("ldtilecfg [{}]", in(reg) &FULL, options(nostack, readonly)) };
                }
                for k0 in (0..nkb).step_by(K_CHUNK) {
                    let ks = k0..(k0 + K_CHUNK).min(nkb);
                    for (g, jp) in run.clone().enumerate() {
                        for (h, tiles) in bt.chunks_exact_mut(K_CHUNK * 512).enumerate() {
                            for kb in ks.clone() {
                                tile(kb, 2 * jp + h, &mut tiles[(kb - k0) * 512..][..512]);
                            }
                        }
                        let bt = bt.as_ptr();
                        let b = |kb: usize| [bt.wrapping_add((kb - k0) * 512), bt.wrapping_add((K_CHUNK + kb - k0) * 512)];
                        // Two blocks of `z`'s rows at a time, the last alone when odd.
                        for (two, c) in sums[g * zt.blocks..][..zt.blocks].chunks_mut(2).enumerate() {
                            let i = 2 * two;
                            // SAFETY: the configuration is loaded on tiles, AVX-512 BF16
                            // is there on dots (`on.available()`); `zt`'s tiles (i, kb)
                            // and (i + 1, kb), and the pair's tiles at kb − k0 in `bt`, are
                            // 1 KiB each.
                            unsafe {
                                match (on, c) {
                                    (Engine::Tiles, [c0, c1]) => dot_quad([c0, c1], k0 == 0, ks.clone(), |kb| [zt.hi_tile(i, kb), zt.hi_tile(i + 1, kb)], b),
                                    (Engine::Tiles, [c0]) => dot_pair(c0, k0 == 0, ks.clone(), |kb| zt.hi_tile(i, kb), b),
                                    (Engine::Dots, c) => {
                                        for (h, c) in c.iter_mut().enumerate() {
                                            dot_pair_dots(c, k0 == 0, ks.clone(), |kb| zt.hi_tile(i + h, kb), b);
                                        }
                                    }
                                    _ => unreachable!("chunks of one or two"),
                                }
                            }
                        }
                    }
                }
                if on == Engine::Tiles {
                    // SAFETY: as above.
                    unsafe { asm!("tilerelease", options(nostack, nomem)) };
                }
                for (g, jp) in run.enumerate() {
                    for (i, c) in sums[g * zt.blocks..][..zt.blocks].iter().enumerate() {
                        // SAFETY: the task's own pairs of columns, inside the output.
                        unsafe {
                            dst.put(&c[0], 16 * i, 32 * jp);
                            dst.put(&c[1], 16 * i, 32 * jp + 16);
                        }
                    }
                }
            })
        });
    })
}

/// `out[t][r] = Σ_c x[t][c]·m[r][c]` (`+=` with `accumulate`) for `x` `[n, m.cols]` and
/// `out` `[n, m.rows]`, on tiles ([`times`]): `x·mᵀ`, the product along `m`'s rows.
pub(crate) fn rows_times(m: Bf16Rows<'_>, x: &[f32], n: usize, out: &mut [f32], accumulate: bool) {
    rows_times_on(Engine::here(), m, x, n, out, accumulate);
}

fn rows_times_on(on: Engine, m: Bf16Rows<'_>, x: &[f32], n: usize, out: &mut [f32], accumulate: bool) {
    m.check();
    // SAFETY: either engine's `available` (asserted by `times` first) saw AVX-512 F; the
    // tile lies in `m`.
    times(on, x, n, m.cols, m.rows, out, accumulate, |kb, jb, tile| unsafe { transpose_pairs(m, 16 * jb, 32 * kb, tile) });
}

/// `out[t][c] = Σ_r z[t][r]·m[r][c]` (`+=` with `accumulate`) for `z` `[n, m.rows]` and
/// `out` `[n, m.cols]`, on tiles ([`times`]): `z·m`, the product along `m`'s columns.
pub(crate) fn cols_times(m: Bf16Rows<'_>, z: &[f32], n: usize, out: &mut [f32], accumulate: bool) {
    cols_times_on(Engine::here(), m, z, n, out, accumulate);
}

fn cols_times_on(on: Engine, m: Bf16Rows<'_>, z: &[f32], n: usize, out: &mut [f32], accumulate: bool) {
    m.check();
    // SAFETY: as in `rows_times_on` (either engine's `available` saw AVX-512 BW too).
    times(on, z, n, m.rows, m.cols, out, accumulate, |kb, jb, tile| unsafe { interleave_rows(m, 32 * kb, 16 * jb, tile) });
}

/// The right tile of `mᵀ` at `m`'s rows `r0..r0 + 16` and columns `c0..c0 + 32`: row `p`
/// of the tile holds, for each of the 16 rows of `m`, its values at columns `c0 + 2p` and
/// `c0 + 2p + 1` (the pairs a tile multiply sums): a 16 × 16 transpose of pairs.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_pairs(m: Bf16Rows<'_>, r0: usize, c0: usize, tile: &mut [Bf16]) {
    assert!(tile.len() == 512 && r0 + 16 <= m.rows && c0 + 32 <= m.cols && m.stride.is_multiple_of(2));
    // Lane `q` reads row `r0 + q`, as pairs (32-bit elements).
    let rows: [i32; 16] = std::array::from_fn(|q| (q * m.stride / 2) as i32);
    // SAFETY: rows r0..r0 + 16, columns c0..c0 + 32 lie inside `m` (asserted, `m` checked);
    // each gather reads pair `p` of those 16 rows; unaligned stores of 64 bytes.
    unsafe {
        let idx = _mm512_loadu_si512(rows.as_ptr().cast());
        let base = m.data[r0 * m.stride + c0..].as_ptr().cast::<i32>();
        for p in 0..16 {
            let pairs = _mm512_i32gather_epi32::<4>(idx, base.add(p));
            _mm512_storeu_si512(tile[32 * p..].as_mut_ptr().cast(), pairs);
        }
    }
}

/// The right tile of `m`'s rows `r0..r0 + 32` and columns `c0..c0 + 16`: row `p` of the
/// tile holds, column by column, the values of rows `r0 + 2p` and `r0 + 2p + 1` side by
/// side (the pairs a tile multiply sums).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn interleave_rows(m: Bf16Rows<'_>, r0: usize, c0: usize, tile: &mut [Bf16]) {
    assert!(tile.len() == 512 && r0 + 32 <= m.rows && c0 + 16 <= m.cols);
    // Lane 2c takes column c of the first row, lane 2c + 1 of the second.
    let idx: [u16; 32] = std::array::from_fn(|l| (l / 2 + 16 * (l % 2)) as u16);
    // SAFETY: rows r0.. and columns c0.. are inside `m` (asserted, `m` checked); 16 values
    // a row, unaligned loads and stores.
    unsafe {
        let idx = _mm512_loadu_si512(idx.as_ptr().cast());
        for p in 0..16 {
            let at = (r0 + 2 * p) * m.stride + c0;
            let first = _mm256_loadu_si256(m.data[at..at + 16].as_ptr().cast());
            let second = _mm256_loadu_si256(m.data[at + m.stride..at + m.stride + 16].as_ptr().cast());
            let both = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
            _mm512_storeu_si512(tile[32 * p..].as_mut_ptr().cast(), _mm512_permutexvar_epi16(idx, both));
        }
    }
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
            al.left(&a, m, k, k + 3, true);
            br.right_from_cols(&bt, k, n, k + 5);
            let got = run(&al, &br, false);
            // The transposed product, B as the left operand (its three products in another
            // order, so within the bound rather than the same bits).
            bl.left(&bt, n, k, k + 5, true);
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
    /// [`rows_times`] and [`cols_times`] give the f64 product of the bf16 matrix and the
    /// activations rounded to bf16, within f32 summation (2⁻²⁰ of the terms' sizes), added to
    /// what `out` held with `accumulate`; shapes cross the blocks, pairs and chunks of `k`,
    /// and the rows' stride exceeds their width.
    #[test]
    fn bf16_products_on_tiles_give_the_product_of_the_rounded_activations() {
        let engines: Vec<Engine> = [Engine::Tiles, Engine::Dots].into_iter().filter(|e| e.available()).collect();
        if engines.is_empty() {
            eprintln!("this CPU has neither AMX-BF16 (granted by Linux) nor AVX-512 BF16: nothing to check");
            return;
        }
        for on in engines {
            eprintln!("{on:?}");
            bf16_products_on(on);
        }
    }

    /// The body of the test above on one engine.
    fn bf16_products_on(on: Engine) {
        let bf16 = |v: f32| half::bf16::from_f32(v);
        for (rows, cols, n) in [(32, 32, 1), (64, 96, 17), (32, 32 * (K_CHUNK + 2), 33), (96, 64, 40), (32 * (K_CHUNK + 1), 32, 5), (128, 224, 70)] {
            let stride = cols + 32;
            let w: Vec<Bf16> = values(rows * stride, 3).iter().map(|&v| bf16(v).to_bits()).collect();
            let m = Bf16Rows { data: &w, rows, cols, stride };
            let at = |r: usize, c: usize| f64::from(half::bf16::from_bits(w[r * stride + c]));
            let rounded = |x: &[f32]| x.iter().map(|&v| f64::from(bf16(v))).collect::<Vec<f64>>();
            let check = |what: &str, got: &[f32], before: &[f32], want: &dyn Fn(usize, usize) -> (f64, f64), width: usize| {
                for t in 0..n {
                    for j in 0..width {
                        let (exact, size) = want(t, j);
                        let off = (f64::from(got[t * width + j]) - f64::from(before[t * width + j]) - exact).abs() / size.max(1e-30);
                        assert!(off <= 2f64.powi(-20), "{what} on {on:?} {rows}x{cols}, n={n} [{t},{j}]: off by {off:e} of the terms' sizes");
                    }
                }
            };
            // out[t][r] = Σ_c m[r][c]·x[t][c]
            let x = values(n * cols, 4);
            let xr = rounded(&x);
            let before = values(n * rows, 5);
            for accumulate in [false, true] {
                let mut out = before.clone();
                rows_times_on(on, m, &x, n, &mut out, accumulate);
                let zero = vec![0.0; out.len()];
                let want = |t: usize, r: usize| (0..cols).map(|c| at(r, c) * xr[t * cols + c]).fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                check("rows_times", &out, if accumulate { &before } else { &zero }, &want, rows);
            }
            // out[t][c] = Σ_r z[t][r]·m[r][c]
            let z = values(n * rows, 6);
            let zr = rounded(&z);
            let before = values(n * cols, 7);
            for accumulate in [false, true] {
                let mut out = before.clone();
                cols_times_on(on, m, &z, n, &mut out, accumulate);
                let zero = vec![0.0; out.len()];
                let want = |t: usize, c: usize| (0..rows).map(|r| zr[t * rows + r] * at(r, c)).fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                check("cols_times", &out, if accumulate { &before } else { &zero }, &want, cols);
            }
        }
    }
}
