//! The training step's products with frozen weights on AVX-512 or AVX2: `out = Σ x·W` over
//! a few terms, each a left operand and a weight, summed in the same register tiles.
//!
//! A general matrix product (the `gemm` crate's) packs the weight into panels for its
//! register tiles on every call, and when the rows of `x` are split between threads, each
//! thread packs the whole weight for its own rows: profiled on the SmolLM2 step, packing
//! took 12 % of the step at 2 threads. Here the weights are packed once per call, a block at
//! a time, by all threads together; then all threads multiply their rows against the block.
//! And a projection's adapter is one more term of its frozen product (`x·W + s·u·B`), so a
//! wide output is written once rather than once more for a rank-16 product; in the
//! backward pass the adapters' term is masked by their dropout in the registers.
//!
//! A panel is 64 columns of the terms' weights for a chunk of their rows (the product's
//! `k`, term after term), laid out row after row, zero-padded past the last column. The
//! register tile is six rows of `x` by a panel's 64 columns (24 accumulators): per `k`,
//! four panel loads and six broadcasts feed 24 fused multiply-adds. On AVX2 (16 registers
//! of 8 lanes) the tile is six rows by 16 of the panel's columns (12 accumulators), four
//! tiles to a panel. Each output sums its `k` terms in order within a chunk of [`KC`] and
//! chunk after chunk, so its value depends neither on the thread count nor on the
//! instruction set.
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::backprop::Mat;

/// Columns of a panel (four AVX-512 registers).
const COLS: usize = 64;
/// Rows of `x` in the register tile.
const ROWS: usize = 6;
/// Rows of the weight per chunk of `k` at most: a panel chunk is up to 96 KiB, read from L2.
const KC: usize = 384;
/// Floats per packed block (1 MiB), shared by the threads from L2 and L3.
const BLOCK: usize = 1 << 18;
/// Terms per product at most (an adapter and three projections reading one input).
const MAX_TERMS: usize = 8;

/// The instructions a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The one the process's CPU kernel runs (`quant::cpu_kernel`): none on the portable one.
    fn here() -> Option<Self> {
        if crate::quant::avx512() {
            Some(Self::Avx512)
        } else if crate::quant::avx2() {
            Some(Self::Avx2)
        } else {
            None
        }
    }
}

/// Whether [`times`] runs here: on the AVX-512 or AVX2 kernel (not under
/// `LATHE_CPU_KERNEL=portable`).
pub(super) fn available() -> bool {
    Isa::here().is_some()
}

/// One term of a product: `scale · x·w` for `x` `[n, k]` (row `t` from `x[t·xs]`) and `w`
/// `[k, c]` in any strides.
#[derive(Clone, Copy)]
pub(super) struct Term<'a> {
    pub(super) x: &'a [f32],
    pub(super) xs: usize,
    pub(super) w: Mat<'a>,
    pub(super) scale: f32,
}

/// A dropout mask over the output `[n, c]`: bit `t·c + j` set where element `(t, j)`
/// survives, scaled by `keep`.
#[derive(Clone, Copy)]
pub(super) struct Dropped<'a> {
    pub(super) bits: &'a [u64],
    pub(super) keep: f32,
}

thread_local! {
    /// The packed block, reused from call to call by the calling thread.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`times`] masks a first term of `k` rows into an output `c` wide: one whose
/// rows all fall in the first chunk (chunks are at least half of [`KC`]).
pub(super) fn masks(k: usize, c: usize) -> bool {
    k <= KC / 2 && c.is_multiple_of(COLS)
}

/// Rows `k0..k0 + len` of term `term`, one piece of a chunk of `k`.
#[derive(Clone, Copy)]
struct Piece {
    term: usize,
    k0: usize,
    len: usize,
}

/// The terms' rows of `k` one after the other, in chunks of at most [`KC`] (as even as
/// they go), each a list of pieces of terms.
fn chunks(terms: &[Term<'_>]) -> Vec<Vec<Piece>> {
    let total: usize = terms.iter().map(|t| t.w.rows).sum();
    if total == 0 {
        return Vec::new();
    }
    let even = total.div_ceil(total.div_ceil(KC));
    let mut all = vec![Vec::new()];
    let mut room = even;
    for (term, t) in terms.iter().enumerate() {
        let mut k0 = 0;
        while k0 < t.w.rows {
            if room == 0 {
                all.push(Vec::new());
                room = even;
            }
            let len = room.min(t.w.rows - k0);
            all.last_mut().expect("a chunk").push(Piece { term, k0, len });
            (k0, room) = (k0 + len, room - len);
        }
    }
    all
}

/// `out = Σ terms` (`out += ` with `accumulate`), `out` `[n, c]` row-major, on the thread
/// pool. The terms' rows of `k` are summed one after the other in the same register
/// tiles, so `out` is read and written once per chunk of [`KC`] rows, not once per term.
/// With `dropped`, the first term is masked: `out (+)= mask ∘ terms[0] + Σ the rest` (the
/// gradient of a dropped-out input meets that of the input itself in one pass); the first
/// term's `k` is then at most half of [`KC`] and `c` a multiple of 64 ([`masks`]).
///
/// # Panics
/// When the shapes disagree, or [`available`] does not hold.
pub(super) fn times(out: &mut [f32], n: usize, terms: &[Term<'_>], accumulate: bool, dropped: Option<Dropped<'_>>) {
    let isa = Isa::here().expect("the panel product runs on AVX-512 or AVX2");
    times_on(isa, out, n, terms, accumulate, dropped);
}

/// [`times`] on `isa`, which the CPU runs.
fn times_on(isa: Isa, out: &mut [f32], n: usize, terms: &[Term<'_>], accumulate: bool, dropped: Option<Dropped<'_>>) {
    let c = out.len() / n.max(1);
    assert_eq!(out.len(), n * c, "the output holds whole rows");
    assert!(terms.len() <= MAX_TERMS, "at most {MAX_TERMS} terms");
    for t in terms {
        let k = t.w.rows;
        assert!(t.w.in_bounds(), "each weight lies inside its buffer");
        assert_eq!(t.w.cols, c, "each term has the output's columns");
        assert!(n == 0 || k == 0 || (n - 1) * t.xs + k <= t.x.len(), "each x holds [{n}, {k}]");
    }
    if let Some(d) = dropped {
        assert!(terms.first().is_some_and(|t| masks(t.w.rows, c)), "a masked term is one chunk of whole panels");
        assert!(d.bits.len() * 64 >= n * c, "the mask covers the output");
    }
    if n == 0 || c == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    // Rows per task: whole register tiles, one range per thread.
    let rows = n.div_ceil(threads).next_multiple_of(ROWS).min(n);
    let panels = c.div_ceil(COLS);
    let chunks = chunks(terms);
    if chunks.is_empty() && !accumulate {
        out.fill(0.0);
    }
    PACKED.with_borrow_mut(|packed| {
        for (ci, pieces) in chunks.iter().enumerate() {
            let kc: usize = pieces.iter().map(|p| p.len).sum();
            let blocks = panels.div_ceil((BLOCK / (COLS * kc)).max(1));
            let per_block = panels.div_ceil(blocks);
            // Panels start on cache lines: a register load that straddles two lines costs two.
            packed.resize(per_block * COLS * kc + 16, 0.0);
            let skew = packed.as_ptr().align_offset(64).min(16);
            let packed = &mut packed[skew..];
            // The mask covers the first piece of the first chunk (all of the first term).
            let mask = dropped.filter(|_| ci == 0);
            let add = accumulate || ci > 0;
            for p0 in (0..panels).step_by(per_block) {
                let np = per_block.min(panels - p0);
                let block = &mut packed[..np * COLS * kc];
                // Each piece of each panel is a task: the threads pack the block together.
                let tasks: Vec<(usize, usize, Piece)> = (0..np).flat_map(|p| pieces.iter().scan(0, move |at, &piece| {
                    let start = *at;
                    *at += piece.len;
                    Some((p, start, piece))
                })).collect();
                let block_ptr = Shared(block.as_mut_ptr());
                tasks.par_iter().for_each(|&(p, start, piece)| {
                    let term = &terms[piece.term];
                    // SAFETY: each task writes its own rows of its own panel, inside `block`.
                    let rows = unsafe { std::slice::from_raw_parts_mut(block_ptr.at((p * kc + start) * COLS), piece.len * COLS) };
                    // SAFETY: the CPU runs `isa`.
                    unsafe { pack(isa, rows, term.w, piece.k0, piece.len, (p0 + p) * COLS, term.scale) }
                });
                let block = &*block;
                out.par_chunks_mut(rows * c).enumerate().for_each(|(t, o)| {
                    // Each piece's x from the task's first row (an array: no allocation per task).
                    let mut sources: [(&[f32], usize, usize); MAX_TERMS] = [(&[], 0, 0); MAX_TERMS];
                    for (s, piece) in sources.iter_mut().zip(pieces) {
                        let term = &terms[piece.term];
                        *s = (&term.x[t * rows * term.xs + piece.k0..], term.xs, piece.len);
                    }
                    let mask = mask.map(|m| (m, t * rows));
                    let sources = &sources[..pieces.len()];
                    // SAFETY: the CPU runs `isa`; the shapes are checked above.
                    unsafe {
                        match isa {
                            Isa::Avx512 => multiply::<Avx512>(o, c, sources, kc, block, p0, add, mask),
                            Isa::Avx2 => multiply::<Avx2>(o, c, sources, kc, block, p0, add, mask),
                        }
                    }
                });
            }
        }
    });
}

/// The packed block's pointer, shared by the tasks that fill its disjoint parts.
struct Shared(*mut f32);

impl Shared {
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

// SAFETY: the tasks write disjoint parts of the block through it.
unsafe impl Sync for Shared {}

/// `scale ×` columns `j0..j0 + 64` of `w`'s rows `k0..k0 + kc` into `panel`, row after row,
/// zeros past the last column.
///
/// # Safety
/// The CPU runs `isa`.
unsafe fn pack(isa: Isa, panel: &mut [f32], w: Mat<'_>, k0: usize, kc: usize, j0: usize, scale: f32) {
    let width = COLS.min(w.cols - j0);
    if width < COLS {
        panel.fill(0.0);
    }
    let at = |i: usize, j: usize| w.off + (k0 + i) * w.rs + (j0 + j) * w.cs;
    if w.cs == 1 {
        for (i, row) in panel.chunks_exact_mut(COLS).enumerate() {
            let src = &w.data[at(i, 0)..][..width];
            if scale == 1.0 {
                row[..width].copy_from_slice(src);
            } else {
                row.iter_mut().zip(src).for_each(|(o, &v)| *o = scale * v);
            }
        }
        return;
    }
    match isa {
        // SAFETY: the caller's CPU runs AVX-512.
        Isa::Avx512 => unsafe { gather(panel, w, k0, kc, j0, width, scale) },
        // SAFETY: the caller's CPU runs AVX2.
        Isa::Avx2 => unsafe { transpose(panel, w, k0, kc, j0, width, scale) },
    }
}

/// [`pack`]'s strided weights on AVX2. Where the weight is transposed (`rs` = 1, a column
/// is `kc` adjacent floats), blocks of 8 × 8 are read by columns and written by rows;
/// elements outside whole blocks are copied one by one.
///
/// # Safety
/// AVX2.
#[target_feature(enable = "avx2")]
unsafe fn transpose(panel: &mut [f32], w: Mat<'_>, k0: usize, kc: usize, j0: usize, width: usize, scale: f32) {
    let at = |i: usize, j: usize| w.off + (k0 + i) * w.rs + (j0 + j) * w.cs;
    let (whole_i, whole_j) = if w.rs == 1 { (kc / 8 * 8, width / 8 * 8) } else { (0, 0) };
    if whole_i > 0 && whole_j > 0 {
        assert!(at(whole_i - 1, whole_j - 1) < w.data.len(), "the blocks lie inside the weight");
        let s = _mm256_set1_ps(scale);
        for j in (0..whole_j).step_by(8) {
            for i in (0..whole_i).step_by(8) {
                // SAFETY: columns `j..j + 8`, rows `i..i + 8` lie inside the weight (its last
                // element checked above) and the panel (`kc` rows of 64).
                unsafe {
                    let col: [__m256; 8] = std::array::from_fn(|c| _mm256_loadu_ps(w.data.as_ptr().add(at(i, j + c))));
                    for (r, row) in transpose8(col).into_iter().enumerate() {
                        _mm256_storeu_ps(panel.as_mut_ptr().add((i + r) * COLS + j), _mm256_mul_ps(row, s));
                    }
                }
            }
        }
    }
    for (i, row) in panel.chunks_exact_mut(COLS).enumerate() {
        let j0 = if i < whole_i { whole_j } else { 0 };
        for (j, o) in row.iter_mut().enumerate().take(width).skip(j0) {
            *o = scale * w.data[at(i, j)];
        }
    }
}

/// Rows of an 8 × 8 block from its columns.
#[target_feature(enable = "avx")]
fn transpose8(c: [__m256; 8]) -> [__m256; 8] {
    // Pairs, then quads within each 128-bit half, then the halves.
    let t = [
        _mm256_unpacklo_ps(c[0], c[1]),
        _mm256_unpackhi_ps(c[0], c[1]),
        _mm256_unpacklo_ps(c[2], c[3]),
        _mm256_unpackhi_ps(c[2], c[3]),
        _mm256_unpacklo_ps(c[4], c[5]),
        _mm256_unpackhi_ps(c[4], c[5]),
        _mm256_unpacklo_ps(c[6], c[7]),
        _mm256_unpackhi_ps(c[6], c[7]),
    ];
    let q = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(q[0], q[4]),
        _mm256_permute2f128_ps::<0x20>(q[1], q[5]),
        _mm256_permute2f128_ps::<0x20>(q[2], q[6]),
        _mm256_permute2f128_ps::<0x20>(q[3], q[7]),
        _mm256_permute2f128_ps::<0x31>(q[0], q[4]),
        _mm256_permute2f128_ps::<0x31>(q[1], q[5]),
        _mm256_permute2f128_ps::<0x31>(q[2], q[6]),
        _mm256_permute2f128_ps::<0x31>(q[3], q[7]),
    ]
}

/// [`pack`]'s strided weights on AVX-512: each row of the panel is 16 columns at a time,
/// gathered `cs` apart.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn gather(panel: &mut [f32], w: Mat<'_>, k0: usize, kc: usize, j0: usize, width: usize, scale: f32) {
    let at = |i: usize, j: usize| w.off + (k0 + i) * w.rs + (j0 + j) * w.cs;
    let cs = i32::try_from(w.cs).expect("a weight's column stride fits in 32 bits");
    let lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(cs));
    let scale = _mm512_set1_ps(scale);
    for v in 0..width.div_ceil(16) {
        let n = (width - v * 16).min(16);
        let mask = lane_mask(n);
        let last = at(kc - 1, v * 16 + n - 1);
        assert!(last < w.data.len(), "the gathered columns lie inside the weight");
        for (i, row) in panel.chunks_exact_mut(COLS).enumerate() {
            // SAFETY: every gathered index is at most `last`, inside the buffer; the row
            // holds 64 floats.
            unsafe {
                let base = w.data.as_ptr().add(at(i, v * 16));
                let g = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, lanes, base.cast());
                _mm512_storeu_ps(row.as_mut_ptr().add(v * 16), _mm512_mul_ps(g, scale));
            }
        }
    }
}

/// The first `n` of 16 lanes.
fn lane_mask(n: usize) -> __mmask16 {
    if n >= 16 { !0 } else { (1u16 << n) - 1 }
}

/// One task's rows of `out` (`c` wide): `out[r][j] (+)= Σᵢ x[r][i]·panel[i][j]` over the
/// block's panels, the first at panel `p0`, `kc` rows each, whose rows are the `sources`'
/// columns one after the other (each `(x from the task's first row, row stride, columns)`).
/// With `mask` (and the task's first row in the output), the first source's sums are
/// masked before the others are added.
///
/// # Safety
/// The CPU runs `K`'s instructions; `out` holds whole rows of `c`, each source as many
/// rows, `block` whole panels of `kc` rows, none past column `c`'s panel; a mask covers the
/// rows.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply<K: Kernel>(out: &mut [f32], c: usize, sources: &[(&[f32], usize, usize)], kc: usize, block: &[f32], p0: usize, add: bool, mask: Option<(Dropped<'_>, usize)>) {
    let n = out.len() / c;
    let mut r = 0;
    while r < n {
        let tile = ROWS.min(n - r);
        let mut xr = [(std::ptr::null(), 0, 0); MAX_TERMS];
        for (s, &(x, xs, len)) in xr.iter_mut().zip(sources) {
            *s = (x[r * xs..].as_ptr(), xs, len);
        }
        let xr = &xr[..sources.len()];
        for (p, panel) in block.chunks_exact(COLS * kc).enumerate() {
            let j0 = (p0 + p) * COLS;
            let width = COLS.min(c - j0);
            let or = out[r * c + j0..].as_mut_ptr();
            // The mask's words of these rows and columns (whole words: `c` is a multiple of 64).
            let masked = mask.map(|(m, row0)| (std::array::from_fn(|i| if i < tile { m.bits[((row0 + r + i) * c + j0) / 64] } else { 0 }), m.keep));
            // SAFETY: rows `r..r + tile` of each source and of `out` exist; the panel holds
            // `kc` rows, the sources' columns.
            unsafe {
                match tile {
                    6 => K::tile::<6>(xr, panel.as_ptr(), or, c, width, add, masked),
                    5 => K::tile::<5>(xr, panel.as_ptr(), or, c, width, add, masked),
                    4 => K::tile::<4>(xr, panel.as_ptr(), or, c, width, add, masked),
                    3 => K::tile::<3>(xr, panel.as_ptr(), or, c, width, add, masked),
                    2 => K::tile::<2>(xr, panel.as_ptr(), or, c, width, add, masked),
                    _ => K::tile::<1>(xr, panel.as_ptr(), or, c, width, add, masked),
                }
            }
        }
        r += tile;
    }
}

/// The register tile of one instruction set: `R` rows by one panel, summing each source's
/// columns (`(x, row stride, columns)`) against the panel's rows in turn, into `R` rows of
/// `out` (`os` apart), `width` of the panel's columns; with `masked` (each row's 64 mask
/// bits and the survivors' scale), the first source's sums are masked before the others
/// are added.
trait Kernel {
    /// # Safety
    /// The CPU runs the kernel's instructions; `R` rows of each source readable, the
    /// sources' columns × 64 at `panel`, `R` rows of `width` writable at `out`.
    unsafe fn tile<const R: usize>(sources: &[(*const f32, usize, usize)], panel: *const f32, out: *mut f32, os: usize, width: usize, add: bool, masked: Option<([u64; ROWS], f32)>);
}

struct Avx512;

impl Kernel for Avx512 {
    unsafe fn tile<const R: usize>(sources: &[(*const f32, usize, usize)], panel: *const f32, out: *mut f32, os: usize, width: usize, add: bool, masked: Option<([u64; ROWS], f32)>) {
        // SAFETY: the caller's.
        unsafe { tile_avx512::<R>(sources, panel, out, os, width, add, masked) }
    }
}

struct Avx2;

impl Kernel for Avx2 {
    unsafe fn tile<const R: usize>(sources: &[(*const f32, usize, usize)], panel: *const f32, out: *mut f32, os: usize, width: usize, add: bool, masked: Option<([u64; ROWS], f32)>) {
        // SAFETY: the caller's.
        unsafe { tile_avx2::<R>(sources, panel, out, os, width, add, masked) }
    }
}

/// Runs `step(i, row i of the panel)` for `i` in `0..kc`, unrolled by four: the panel's
/// rows are [`COLS`] apart from `*p`, which is left past the last.
///
/// # Safety
/// `kc` rows of the panel from `*p`.
#[inline(always)]
unsafe fn each_k(kc: usize, p: &mut *const f32, mut step: impl FnMut(usize, *const f32)) {
    let mut i = 0;
    // SAFETY: the caller's bounds.
    unsafe {
        while i + 4 <= kc {
            step(i, *p);
            step(i + 1, p.add(COLS));
            step(i + 2, p.add(2 * COLS));
            step(i + 3, p.add(3 * COLS));
            *p = p.add(4 * COLS);
            i += 4;
        }
        while i < kc {
            step(i, *p);
            *p = p.add(COLS);
            i += 1;
        }
    }
}

/// [`Kernel::tile`] on AVX-512: the panel's 64 columns in four registers per row.
///
/// # Safety
/// AVX-512 F; [`Kernel::tile`]'s bounds.
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(sources: &[(*const f32, usize, usize)], panel: *const f32, out: *mut f32, os: usize, width: usize, add: bool, masked: Option<([u64; ROWS], f32)>) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let mut p = panel;
    for (s, &(x, xs, kc)) in sources.iter().enumerate() {
        // SAFETY: the caller's bounds.
        unsafe {
            let rows: [*const f32; R] = std::array::from_fn(|r| x.add(r * xs));
            each_k(kc, &mut p, |i, p| {
                let w = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p.add(32)), _mm512_loadu_ps(p.add(48))];
                for r in 0..R {
                    let b = _mm512_set1_ps(*rows[r].add(i));
                    for v in 0..4 {
                        acc[r][v] = _mm512_fmadd_ps(w[v], b, acc[r][v]);
                    }
                }
            });
        }
        if let Some((bits, keep)) = masked.filter(|_| s == 0) {
            let keep = _mm512_set1_ps(keep);
            for (acc, bits) in acc.iter_mut().zip(bits) {
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_maskz_mul_ps((bits >> (16 * v)) as __mmask16, *a, keep);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: the caller's bounds.
        unsafe {
            let o = out.add(r * os);
            for (v, &a) in acc.iter().enumerate() {
                let lanes = width.saturating_sub(v * 16).min(16);
                if lanes == 0 {
                    break;
                }
                let mask = lane_mask(lanes);
                let at = o.add(v * 16);
                let sum = if add { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), a) } else { a };
                _mm512_mask_storeu_ps(at, mask, sum);
            }
        }
    }
}

/// [`Kernel::tile`] on AVX2: the panel's 64 columns 16 at a time, in two registers per row
/// (12 accumulators, with two loads of the panel and one broadcast, of 16 registers).
///
/// # Safety
/// AVX2 and FMA; [`Kernel::tile`]'s bounds.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(sources: &[(*const f32, usize, usize)], panel: *const f32, out: *mut f32, os: usize, width: usize, add: bool, masked: Option<([u64; ROWS], f32)>) {
    // Lane `l` of a register tests bit `l` of its eight mask bits.
    let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for g in 0..width.div_ceil(16) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY: the caller's bounds; the panel's rows are 64 floats apart.
        let mut p = unsafe { panel.add(g * 16) };
        for (s, &(x, xs, kc)) in sources.iter().enumerate() {
            // SAFETY: the caller's bounds.
            unsafe {
                let rows: [*const f32; R] = std::array::from_fn(|r| x.add(r * xs));
                each_k(kc, &mut p, |i, p| {
                    let w = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
                    for r in 0..R {
                        let b = _mm256_broadcast_ss(&*rows[r].add(i));
                        for v in 0..2 {
                            acc[r][v] = _mm256_fmadd_ps(w[v], b, acc[r][v]);
                        }
                    }
                });
            }
            if let Some((bits, keep)) = masked.filter(|_| s == 0) {
                let keep = _mm256_set1_ps(keep);
                for (acc, bits) in acc.iter_mut().zip(bits) {
                    for (v, a) in acc.iter_mut().enumerate() {
                        let byte = ((bits >> (16 * g + 8 * v)) & 0xff) as i32;
                        let kept = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), bit), bit);
                        // Dropped lanes +0.0 whatever the sum, as AVX-512's zero-masking gives.
                        *a = _mm256_and_ps(_mm256_mul_ps(*a, keep), _mm256_castsi256_ps(kept));
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: the caller's bounds: only the first `width` columns are touched.
            unsafe {
                let o = out.add(r * os + g * 16);
                for (v, &a) in acc.iter().enumerate() {
                    let lanes = width.saturating_sub(g * 16 + v * 8).min(8);
                    if lanes == 0 {
                        break;
                    }
                    let at = o.add(v * 8);
                    if lanes == 8 {
                        let sum = if add { _mm256_add_ps(_mm256_loadu_ps(at), a) } else { a };
                        _mm256_storeu_ps(at, sum);
                    } else {
                        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), lane);
                        let sum = if add { _mm256_add_ps(_mm256_maskload_ps(at, mask), a) } else { a };
                        _mm256_maskstore_ps(at, mask, sum);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product in f64, term by term, masked as `times` masks.
    fn reference(n: usize, c: usize, terms: &[Term<'_>], prior: &[f32], dropped: Option<Dropped<'_>>) -> Vec<f64> {
        let mut out: Vec<f64> = prior.iter().map(|&v| f64::from(v)).collect();
        for (ti, t) in terms.iter().enumerate() {
            for r in 0..n {
                for j in 0..c {
                    let w = |i: usize| f64::from(t.w.data[t.w.off + i * t.w.rs + j * t.w.cs]);
                    let mut v: f64 = (0..t.w.rows).map(|i| f64::from(t.x[r * t.xs + i]) * w(i)).sum::<f64>() * f64::from(t.scale);
                    if let Some(d) = dropped.filter(|_| ti == 0) {
                        let bit = r * c + j;
                        v *= if (d.bits[bit / 64] >> (bit % 64)) & 1 == 1 { f64::from(d.keep) } else { 0.0 };
                    }
                    out[r * c + j] += v;
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| (crate::train::mix(seed, i as u64) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn panel_products_sum_their_terms_in_any_strides_masked_or_not() {
        let isas: Vec<Isa> = [(Isa::Avx512, is_x86_feature_detected!("avx512f")), (Isa::Avx2, is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))]
            .into_iter()
            .filter_map(|(isa, here)| here.then_some(isa))
            .collect();
        if isas.is_empty() {
            eprintln!("skipped: the panel product runs on AVX-512 or AVX2 and this CPU has neither");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool");
        let outputs: Vec<Vec<Vec<f32>>> = isas.iter().map(|&isa| products_sum_their_terms(isa, &pool)).collect();
        // Each output sums the same products in the same order on either instruction set.
        let bits = |outs: &Vec<Vec<f32>>| -> Vec<Vec<u32>> { outs.iter().map(|o| o.iter().map(|v| v.to_bits()).collect()).collect() };
        for (isa, out) in isas.iter().zip(&outputs) {
            assert!(bits(out) == bits(&outputs[0]), "{isa:?} gives other bits than {:?}", isas[0]);
        }
    }

    /// Checks `times_on(isa, ..)` against the reference; returns its outputs.
    fn products_sum_their_terms(isa: Isa, pool: &rayon::ThreadPool) -> Vec<Vec<f32>> {
        let mut outputs = Vec::new();
        // 13 rows: two tasks of whole tiles and a short one; k = 400 is two chunks. The
        // last panel 36 columns wide (on AVX2 a tile of 16, 16, then 4), or 8.
        for (n, c) in [(13, 128), (13, 100), (13, 200), (1, 64)] {
            let (k1, k2, k3) = (16, 400, 7);
            // A masked term in a strided x (a slice of wider rows), its weight transposed.
            let x1 = values(n * 40, 1);
            let w1 = values(c * k1, 2);
            // A dense x, a row-major weight; and a transposed one with a scale.
            let (x2, w2) = (values(n * k2, 3), values(k2 * c, 4));
            let (x3, w3) = (values(n * k3, 5), values(c * k3, 6));
            let mut terms = vec![
                Term { x: &x1[8..], xs: 40, w: Mat { data: &w1, off: 0, rs: 1, cs: k1, rows: k1, cols: c }, scale: 1.0 },
                Term { x: &x2, xs: k2, w: Mat { data: &w2, off: 0, rs: c, cs: 1, rows: k2, cols: c }, scale: 1.0 },
                Term { x: &x3, xs: k3, w: Mat { data: &w3, off: 0, rs: 1, cs: k3, rows: k3, cols: c }, scale: 0.5 },
            ];
            let bits: Vec<u64> = (0..(n * c).div_ceil(64) as u64).map(|i| crate::train::mix(7, i)).collect();
            let masks = if c % 64 == 0 { vec![None, Some(Dropped { bits: &bits, keep: 1.25 })] } else { vec![None] };
            for dropped in masks {
                for accumulate in [false, true] {
                    let prior = values(n * c, 8);
                    let mut out = prior.clone();
                    pool.install(|| times_on(isa, &mut out, n, &terms, accumulate, dropped));
                    let zeros = vec![0.0; n * c];
                    let expect = reference(n, c, &terms, if accumulate { &prior } else { &zeros }, dropped);
                    for (i, (&got, &want)) in out.iter().zip(&expect).enumerate() {
                        assert!((f64::from(got) - want).abs() < 1e-4, "{isa:?}: n {n}, c {c}, masked {}, accumulate {accumulate}: element {i} is {got}, not {want}", dropped.is_some());
                    }
                    outputs.push(out);
                }
            }
            // No terms: zeros, or the output untouched.
            terms.clear();
            let mut out = values(n * c, 9);
            pool.install(|| times_on(isa, &mut out, n, &terms, true, None));
            assert_eq!(out, values(n * c, 9));
            pool.install(|| times_on(isa, &mut out, n, &terms, false, None));
            assert!(out.iter().all(|&v| v == 0.0));
        }
        outputs
    }
}

