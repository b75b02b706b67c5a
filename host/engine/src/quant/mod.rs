//! Block-quantized matrices and the CPU kernel that multiplies by them without expanding
//! the weights to f32.
//!
//! Decoding a token reads every weight once, so its speed is set by how many bytes the
//! weights take: SmolLM2 is 540 MB as f32 but 97 MB as its GGUF's Q4_1/Q8_0 blocks.
//! [`QMatrix`] keeps those blocks (4- or 8-bit codes plus an f32 scale and, for Q4_1, an
//! f32 offset per 32 values) and [`QMatrix::matmul_with`] computes `x · Wᵀ` for a few rows of
//! `x` straight from them. The activations stay f32, so the result equals the dense
//! product up to summation order: `Σ (q·d + m)·x = d·Σ q·x + m·Σ x` per block.
//!
//! On x86-64 the dot products run on explicit SIMD code chosen at run time: AVX-512
//! (`avx512.rs`) where the CPU has it, else AVX2 and FMA (`avx2.rs`); elsewhere on the
//! portable loops below, which compute the same. `LATHE_CPU_KERNEL=avx2|portable` picks a
//! narrower kernel (to compare them, or to reproduce a run made on an older CPU): the
//! kernels sum in different orders, so their f32 results differ by rounding.
//!
//! With [`set_int8_activations`] on, the activations are quantized too, per block of 32 to
//! signed 8 bits with an f32 scale (as llama.cpp does), and each block's products are summed
//! in integers: a few instructions per 32 products instead of a dozen. Against K-quant
//! super-blocks the activations take one scale per 256 values (llama.cpp's Q8_K), so a
//! super-block's eight sub-blocks are summed in integers, their scales applied there too,
//! before one float multiply. The result then differs from the dense product by the
//! activations' rounding (within half a step per value). The library's default is f32,
//! for parity with the reference; the commands round the sampled tokens' activations
//! (`--f32-activations` keeps them f32), and their prompts go through
//! [`QMatrix::matmul_exact`].
//!
//! The 8-bit product of the 32-value blocks takes eight weight rows at a time, one per lane
//! of a register ([`GROUP`]; their scales and offsets are stored side by side for that):
//! each block's integer sums are turned into lanes, so the float work per block (scale,
//! offset) is one vector operation for eight rows instead of one per row. Every number of
//! activation rows multiplies this way, a prompt's as a token's, so with 8-bit activations
//! a row's result does not depend on what shares its step, and the portable kernel gives
//! the same bits.

use std::sync::atomic::{AtomicBool, Ordering};


use crate::gguf::GgmlType;

static INT8_ACTIVATIONS: AtomicBool = AtomicBool::new(false);

/// Whether the quantized kernel rounds activations to 8 bits and multiplies in integers
/// (faster, llama.cpp's precision: the commands' default for sampled tokens) or keeps them
/// f32 (the library's default and the commands' `--f32-activations`: results within float
/// rounding of the dense product). Process-wide.
pub fn set_int8_activations(on: bool) {
    INT8_ACTIVATIONS.store(on, Ordering::Relaxed);
}

pub fn int8_activations() -> bool {
    INT8_ACTIVATIONS.load(Ordering::Relaxed)
}

/// The quantized kernel this process runs: `amx`, `avx512`, `avx2` or `portable`, the
/// widest the CPU has unless `LATHE_CPU_KERNEL` names another; an error names the kernels
/// there are when it names one this CPU cannot run. `amx` is `avx512` with a prompt's
/// products on AMX tiles (`amx.rs`).
pub fn cpu_kernel() -> Result<&'static str, String> {
    let kernel = Kernel::choice()?;
    #[cfg(target_arch = "x86_64")]
    if tiles() {
        return Ok("amx");
    }
    Ok(kernel.name())
}

/// Whether a prompt's products run on AMX tiles, and the CPU training step's products with
/// a bf16 base ([`bf16_products`]): where the CPU and the OS allow them and
/// `LATHE_CPU_KERNEL` is unset, `auto` or `amx`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn tiles() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| Kernel::choice() == Ok(Kernel::Avx512) && matches!(Kernel::asked().as_str(), "" | "auto" | "amx") && tiles_here())
}

/// Whether the CPU training step multiplies a bf16 base in bf16 ([`amx::rows_times`],
/// [`amx::cols_times`]): on AMX tiles where [`tiles`], else on AVX-512 BF16's dot products
/// where the AVX-512 kernel runs and the CPU has them. Elsewhere the step widens the
/// weights to f32.
pub fn bf16_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    return tiles() || (avx512() && amx::dots_available());
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this process runs the AVX-512 kernel (`amx` included).
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return Kernel::choice() == Ok(Kernel::Avx512);
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this process runs the AVX2 kernel (AVX2 and FMA, no AVX-512 or not asked for).
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return Kernel::choice() == Ok(Kernel::Avx2);
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs the `amx` kernel: the AVX-512 one, with AMX tiles granted.
fn tiles_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    return Kernel::available()[0] == Kernel::Avx512 && amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the 8-bit products of 32-value blocks sum with AVX-VNNI's `vpdpbusd`: where the
/// CPU has it, unless `LATHE_CPU_VNNI=0` (to compare). Its integer sums equal AVX2's, so the
/// results are the same bits either way. Checked once per process.
#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| is_x86_feature_detected!("avxvnni") && std::env::var("LATHE_CPU_VNNI").map_or(true, |v| v != "0"))
}

/// Rows of activations quantized per block: `qs[i] = round(x[i] / d)` (to nearest, ties to
/// even) with `d = max|x| / 127` of the block. Blocks of 32 meet the 32-value weight blocks;
/// the K-quants' super-blocks meet blocks of 256 (llama.cpp's Q8_K), whose one scale lets a
/// super-block's eight sub-blocks be summed in integers before a single float multiply.
struct Q8Rows {
    qs: Vec<i8>,
    /// Per block.
    scales: Vec<f32>,
    /// For blocks of 256: the sum of each 16 codes (a K-quant's offsets meet them: a
    /// Q4_K or Q5_K min covers two, Q6_K's 32 off every code one per scale).
    sums: Vec<i16>,
}

impl Q8Rows {
    /// Blocks of 32.
    fn quantize_on(kernel: Kernel, x: &[f32]) -> Self {
        Self::quantize_blocks(kernel, x, 32)
    }

    /// Blocks of 256, with the sum of each 16 codes; `x` holds whole blocks.
    fn quantize_super_on(kernel: Kernel, x: &[f32]) -> Self {
        let mut q = Self::quantize_blocks(kernel, x, 256);
        q.sums = q.qs.chunks_exact(16).map(|c| c.iter().map(|&v| i16::from(v)).sum()).collect();
        q
    }

    fn quantize_blocks(kernel: Kernel, x: &[f32], block: usize) -> Self {
        assert!(x.len().is_multiple_of(block), "whole blocks of {block}");
        let mut qs = vec![0i8; x.len()];
        let mut scales = Vec::with_capacity(x.len() / block);
        for (xb, out) in x.chunks_exact(block).zip(qs.chunks_exact_mut(block)) {
            let amax = match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the SIMD kernels come from `Kernel::available`, which saw AVX2 and
                // FMA (AVX-512's includes them); the chunks hold whole blocks of 32.
                #[allow(unsafe_code)]
                Kernel::Avx512 | Kernel::Avx2 => xb.chunks_exact(32).map(|c| unsafe { avx2::amax32(c) }).fold(0f32, f32::max),
                _ => xb.iter().fold(0f32, |m, v| m.max(v.abs())),
            };
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (c, o) in xb.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    #[allow(unsafe_code)]
                    Kernel::Avx512 | Kernel::Avx2 => unsafe { avx2::round32(c, inv, o) },
                    _ => {
                        for (o, v) in o.iter_mut().zip(c) {
                            *o = (v * inv).round_ties_even() as i8;
                        }
                    }
                }
            }
            scales.push(d);
        }
        Self { qs, scales, sums: Vec::new() }
    }
}

/// How many rows of f32 activations the block kernels take; past them a weight row's
/// expansion is worth making once for all rows, and the panels' register tiles (or the
/// dense gemm, where a dense copy is kept) win.
pub const MAX_ROWS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codes {
    /// Unsigned 4-bit codes, value `q·d + m` (Q4_0 is `m = −8d`).
    Nibbles,
    /// Signed 8-bit codes, value `q·d`.
    Bytes,
    /// A K-quant's super-blocks of 256 values as the GGUF stores them (`qs` holds whole
    /// blocks; no scales or mins apart). With 8-bit activations, their blocks are
    /// multiplied in integers straight from their codes on the SIMD kernels
    /// ([`Kernel::k_quant_q8`]); otherwise each block is expanded to f32 once per step
    /// (`kquant.rs`).
    Super(GgmlType),
}

/// Weight rows whose per-block scales and offsets are stored together, a block's eight
/// side by side: the 8-bit kernel multiplies a group's rows in the eight lanes of one
/// register and loads a block's scales for all of them at once.
const GROUP: usize = 8;

/// Weight rows per task of a decode product ([`QMatrix::matmul_many`]) with `threads` on
/// it: runs of at most 256 rows, a multiple of [`GROUP`], sized so that a matrix splits into
/// a multiple of `threads` runs (fewer where rounding to whole groups leaves too few rows
/// for them all), and the threads' shares come out even. Longer runs than the
/// 64 rows before made batch-1 decode 8-9 % faster at two threads (BENCHMARKS "Decode:
/// longer runs of rows"; fewer hand-offs and run starts and longer streams for the
/// prefetchers are the likely reasons, not measured apart); runs of up to 128 were slower
/// again on SmolLM2, and up to 512 no faster on the K-quant model.
fn decode_run(rows: usize, threads: usize) -> usize {
    const LONGEST: usize = 256;
    let threads = threads.max(1);
    let runs = threads * rows.div_ceil(threads * LONGEST);
    rows.div_ceil(runs.max(1)).next_multiple_of(GROUP).max(GROUP)
}

/// One weight row's per-block values (scales or offsets) inside its group's interleaved
/// storage: block `b` at `GROUP · b`.
#[derive(Debug, Clone, Copy)]
struct Meta<'a>(&'a [f32]);

impl<'a> Meta<'a> {
    const EMPTY: Meta<'static> = Meta(&[]);

    /// The values, block by block.
    #[inline(always)]
    fn iter(self) -> impl Iterator<Item = f32> + 'a {
        self.0.iter().step_by(GROUP).copied()
    }

    fn len(self) -> usize {
        self.0.len().div_ceil(GROUP)
    }
}

/// A `[rows, cols]` matrix (Hugging Face `[out, in]` layout) in blocks of 32 along `cols`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    codes: Codes,
    /// Per row: `cols / 32` blocks of 16 (nibbles) or 32 (bytes) code bytes.
    qs: Vec<u8>,
    /// Per block, interleaved by groups of [`GROUP`] rows ([`QMatrix::meta`]); the last
    /// group padded with zeros.
    scales: Vec<f32>,
    /// As `scales`; empty for `Bytes`.
    mins: Vec<f32>,
}

impl QMatrix {
    /// Repacks GGUF blocks (`Q4_0`, `Q4_1`, `Q8_0`) of a `[rows, cols]` matrix, or keeps a
    /// K-quant's (`Q4_K`, `Q5_K`, `Q6_K`) as they are; None for other types, which stay
    /// dense.
    pub fn from_ggml(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) {
            return (cols.is_multiple_of(256) && ty.byte_len(rows * cols) == Some(bytes.len())).then(|| QMatrix {
                rows,
                cols,
                codes: Codes::Super(ty),
                qs: bytes.to_vec(),
                scales: Vec::new(),
                mins: Vec::new(),
            });
        }
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
        let padded = rows.next_multiple_of(GROUP) * cols / 32;
        let mut m = QMatrix {
            rows,
            cols,
            codes,
            qs: Vec::with_capacity(blocks * if codes == Codes::Bytes { 32 } else { 16 }),
            scales: vec![0.0; padded],
            mins: vec![0.0; if codes == Codes::Nibbles { padded } else { 0 }],
        };
        for (i, b) in bytes.chunks_exact(block_len).enumerate() {
            let d = f16(b, 0);
            let at = m.meta(i / (cols / 32), i % (cols / 32));
            m.scales[at] = d;
            match ty {
                GgmlType::Q4_0 => {
                    m.mins[at] = -8.0 * d;
                    m.qs.extend_from_slice(&b[2..18]);
                }
                GgmlType::Q4_1 => {
                    m.mins[at] = f16(b, 2);
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

    /// `x · Wᵀ` for `n` rows of `x` (`[n, cols]`, row-major): `[n, rows]`, the activations
    /// rounded to 8 bits when `int8`.
    pub fn matmul_with(&self, x: &[f32], n: usize, int8: bool) -> Vec<f32> {
        Self::matmul_many(&[self], x, n, int8).pop().expect("one product per matrix")
    }

    /// `x · Wᵀ` for every matrix in `mats` (all `cols` wide) in one parallel loop: the
    /// projections that read the same input (query, key and value; gate and up) cost one
    /// fork and join between the threads instead of one each.
    pub fn matmul_many(mats: &[&QMatrix], x: &[f32], n: usize, int8: bool) -> Vec<Vec<f32>> {
        Self::matmul_many_on(Kernel::chosen(), mats, x, n, int8)
    }

    fn matmul_many_on(kernel: Kernel, mats: &[&QMatrix], x: &[f32], n: usize, int8: bool) -> Vec<Vec<f32>> {
        let cols = mats.first().map_or(0, |m| m.cols);
        assert!(mats.iter().all(|m| m.cols == cols), "the matrices share their width");
        assert_eq!(x.len(), n * cols, "x must be n × cols");
        // With 8-bit activations every row count multiplies in 8 bits, so a row's result is
        // the same bits whatever shares its step; f32 activations past MAX_ROWS go through
        // the panels.
        if n > MAX_ROWS && !(int8 && mats.iter().all(|m| kernel.q8(m.codes))) {
            return Self::matmul_panels(kernel, mats, x, n, cols);
        }
        // What the matrices here meet, each only when one of them needs it: Σx per block of
        // 32 (the 32-value blocks' offset term), 8-bit activations in blocks of 32 for those
        // blocks and of 256 for the K-quants' super-blocks.
        let (mut blocks32, mut blocks256) = (false, false);
        for m in mats {
            match m.codes {
                Codes::Super(ty) if kernel.k_quant_q8(ty) => blocks256 = true,
                Codes::Super(_) => {}
                _ => blocks32 = true,
            }
        }
        let xsum: Vec<f32> = if blocks32 { x.chunks_exact(32).map(block_sum).collect() } else { Vec::new() };
        let q8 = (int8 && blocks32).then(|| Q8Rows::quantize_on(kernel, x));
        let q8k = (int8 && blocks256).then(|| Q8Rows::quantize_super_on(kernel, x));
        thread_local! {
            /// Each thread's `[rows, n]` results of a task, kept between tasks.
            static TASK_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // Each task works out a run of one matrix's weight rows and writes them as its
        // columns of the `[n, rows]` output.
        let threads = rayon::current_num_threads();
        Self::by_runs_of_rows(mats, n, |m| decode_run(m.rows, threads), |m, first, out| {
            let rows = out.rows;
            let run = |res: &mut [f32]| match (m.codes, &q8k) {
                (Codes::Super(ty), Some(xq)) if kernel.k_quant_q8(ty) => kernel.dots_k_q8(ty, m, first, xq, n, res),
                (Codes::Super(ty), _) => kquant::rows(kernel, ty, m, first, x, n, res),
                _ => {
                    for (r, res_row) in res.chunks_exact_mut(n).enumerate() {
                        kernel.dots(&m.row_blocks(first + r), x, &xsum, cols, res_row);
                    }
                }
            };
            match &q8 {
                Some(xq) if !matches!(m.codes, Codes::Super(_)) => kernel.dots_q8(m, first, xq, &xsum, out),
                // One row: `[rows, 1]` is the output's own layout.
                _ if n == 1 => run(out.row(0)),
                _ => TASK_OUT.with_borrow_mut(|res| {
                    res.clear();
                    res.resize(rows * n, 0.0);
                    run(res);
                    out.put_transposed(res);
                }),
            }
        })
    }

    /// The `[n, rows]` product of every matrix in `mats`, each cut into runs of
    /// `per_task(m)` weight rows: `task` gets the matrix, the run's first row, and the run's
    /// columns of the matrix's output (zeros) to fill, on the team.
    fn by_runs_of_rows(mats: &[&QMatrix], n: usize, per_task: impl Fn(&QMatrix) -> usize, task: impl Fn(&QMatrix, usize, &mut Cols) + Sync) -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; n * m.rows]).collect();
        let dst: Vec<Dst> = outs.iter_mut().map(|o| Dst(o.as_mut_ptr())).collect();
        let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
        for (k, m) in mats.iter().enumerate() {
            let per_task = per_task(m);
            tasks.extend((0..m.rows).step_by(per_task).map(|first| (k, first, per_task)));
        }
        crate::team::for_each(&mut tasks, |&mut (k, first, per_task)| {
            let m = mats[k];
            // SAFETY: `outs[k]` holds `n × m.rows` floats and outlives the loop; the runs of
            // rows are disjoint, so no other task touches these columns.
            #[allow(unsafe_code)]
            let mut cols = unsafe { Cols::new(&dst[k], m.rows, first, per_task.min(m.rows - first), n) };
            task(m, first, &mut cols);
        });
        outs
    }

    /// `x · Wᵀ` for every matrix in `mats` with f32 activations, a row's result the same bits
    /// whatever else the call multiplies. A prompt's rows beside 8-bit sampled tokens take
    /// this (`Linear::forward_host`): with the prefix cache a prompt may be computed whole or
    /// from any block on, and an 8-bit rounding downstream would turn a difference of one
    /// ulp into another code, sometimes another token. On the FMA kernels every output is one
    /// chain of fused multiply-adds in column order, the same bits on each; on AMX tiles
    /// (`amx.rs`) a fixed chain of split-bf16 products, within about 1e-5 of them.
    pub fn matmul_exact(mats: &[&QMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
        let cols = mats.first().map_or(0, |m| m.cols);
        assert!(mats.iter().all(|m| m.cols == cols), "the matrices share their width");
        assert_eq!(x.len(), n * cols, "x must be n × cols");
        let kernel = Kernel::chosen();
        #[cfg(target_arch = "x86_64")]
        if tiles() {
            return Self::matmul_tiles(kernel, mats, x, n, cols);
        }
        Self::matmul_panels(kernel, mats, x, n, cols)
    }

    /// [`QMatrix::matmul_exact`] on AMX tiles (`amx.rs`): the activations laid out once as
    /// the right operand, each task's panel of weight rows expanded row by row and split as
    /// the left.
    #[cfg(target_arch = "x86_64")]
    fn matmul_tiles(kernel: Kernel, mats: &[&QMatrix], x: &[f32], n: usize, cols: usize) -> Vec<Vec<f32>> {
        thread_local! {
            /// Each thread's panel of weight tiles, kept between tasks and steps.
            static PANEL: std::cell::RefCell<amx::Tiles> = std::cell::RefCell::new(Default::default());
            /// The calling thread's activation tiles, likewise kept.
            static ACTIVATIONS: std::cell::RefCell<amx::Tiles> = std::cell::RefCell::new(Default::default());
        }
        ACTIVATIONS.with_borrow_mut(|xt| {
            xt.right_from_cols(x, cols, n, cols);
            let xt = &*xt;
            Self::by_runs_of_rows(mats, n, |_| amx::PANEL, |m, first, out| {
                let rows = out.rows;
                PANEL.with_borrow_mut(|wt| {
                    wt.left_by_rows(rows, cols, |r, w| m.expand_on(kernel, first + r..first + r + 1, w));
                    // Block (i, j): weight rows 16i.., activation rows 16j.. (an output's
                    // columns and rows).
                    amx::product(wt, xt, |i, j, c| {
                        for l in 0..16.min(n.saturating_sub(16 * j)) {
                            let o = out.row(16 * j + l);
                            for r in 0..16.min(rows.saturating_sub(16 * i)) {
                                o[16 * i + r] = c[16 * r + l];
                            }
                        }
                    });
                })
            })
        })
    }

    /// `x · Wᵀ` for every matrix in `mats` with f32 activations through expanded panels:
    /// each task expands a panel of weight rows to f32 once, then multiplies it by every
    /// row of `x` in register tiles (six weight rows by two vectors of activation rows,
    /// the rows in the lanes: sixteen a vector on AVX-512, eight on AVX2), where the block
    /// kernels are bound by their arithmetic per row. Every output is one chain of fused multiply-adds in column order
    /// ([`panel_tile_portable`]), so its bits depend on neither `n` nor the kernel. Written
    /// straight into the `[n, rows]` outputs.
    fn matmul_panels(kernel: Kernel, mats: &[&QMatrix], x: &[f32], n: usize, cols: usize) -> Vec<Vec<f32>> {
        /// Weight rows a task expands (110 KB of f32 at SmolLM2's 576 columns): a few
        /// register tiles' worth, and tasks enough for every thread.
        const PANEL_ROWS: usize = 48;
        thread_local! {
            /// Each thread's panel, kept between tasks and steps (not allocated per task).
            static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            /// Each thread's register tiles' accumulators, likewise kept.
            static ACCS: std::cell::RefCell<Vec<TileAcc>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let lanes = kernel.panel_lanes();
        let xp = pack_rows(x, n, cols, lanes);
        let tiles = n.div_ceil(lanes);
        Self::by_runs_of_rows(mats, n, |_| PANEL_ROWS, |m, first, out| {
            let rows = out.rows;
            PANEL.with_borrow_mut(|panel| {
                if panel.len() < rows * cols {
                    panel.resize(rows * cols, 0.0);
                }
                let w = &mut panel[..rows * cols];
                m.expand_on(kernel, first..first + rows, w);
                let w = &*w;
                // Every register tile's accumulators, kept while the columns go by in
                // blocks: a block of two vectors' activation rows (K_BLOCK × 32 floats on
                // AVX-512) stays in L1 across the panel's weight rows, where whole rows of
                // a wide matrix came from L2 once per six weight rows.
                let (groups, pairs) = (rows.div_ceil(TILE_ROWS), tiles.div_ceil(2));
                ACCS.with_borrow_mut(|accs| {
                    accs.clear();
                    accs.resize(groups * pairs, [[[0f32; MAX_LANES]; 2]; TILE_ROWS]);
                    for k0 in (0..cols).step_by(K_BLOCK) {
                        let ks = k0..(k0 + K_BLOCK).min(cols);
                        for p in 0..pairs {
                            for g in 0..groups {
                                let tile = Tile { kernel, w, xp: &xp, cols, t: 2 * p, j: g * TILE_ROWS, ks: ks.clone() };
                                tile.rows(TILE_ROWS.min(rows - g * TILE_ROWS), 2.min(tiles - 2 * p), &mut accs[g * pairs + p]);
                            }
                        }
                    }
                    for (i, acc) in accs.iter().enumerate() {
                        let (g, p) = (i / pairs, i % pairs);
                        for v in 0..2.min(tiles - 2 * p) {
                            for l in 0..lanes {
                                let row = lanes * (2 * p + v) + l;
                                if row < n {
                                    let o = out.row(row);
                                    for (jj, acc) in acc.iter().enumerate().take(rows - g * TILE_ROWS) {
                                        o[g * TILE_ROWS + jj] = acc[v][l];
                                    }
                                }
                            }
                        }
                    }
                })
            })
        })
    }

    /// Where row `r`'s scale (and offset) of block `b` is: a group's rows side by side.
    #[inline]
    fn meta(&self, r: usize, b: usize) -> usize {
        ((r / GROUP) * (self.cols / 32) + b) * GROUP + r % GROUP
    }

    /// Weight row `r`'s blocks (not for K-quants, whose blocks stay whole).
    #[inline]
    fn row_blocks<'a>(&'a self, r: usize) -> Row<'a> {
        let nb = self.cols / 32;
        let per_row = if self.codes == Codes::Bytes { 32 } else { 16 } * nb;
        let at = self.meta(r, 0);
        let meta = |v: &'a [f32]| Meta(&v[at..at + (nb - 1) * GROUP + 1]);
        Row {
            codes: self.codes,
            qs: &self.qs[r * per_row..(r + 1) * per_row],
            scales: meta(&self.scales),
            mins: if self.codes == Codes::Nibbles { meta(&self.mins) } else { Meta::EMPTY },
        }
    }

    /// The interleaved scales and offsets (empty for 8-bit codes) of the group of rows
    /// from `first` (a multiple of [`GROUP`]): `8 · blocks` values each.
    fn group_meta(&self, first: usize) -> (&[f32], &[f32]) {
        debug_assert!(first.is_multiple_of(GROUP));
        let span = GROUP * (self.cols / 32);
        let at = first / GROUP * span;
        (&self.scales[at..at + span], if self.codes == Codes::Nibbles { &self.mins[at..at + span] } else { &[] })
    }

    /// The matrix expanded to f32 (for checks and dense fallbacks).
    pub fn dequantize(&self) -> Vec<f32> {
        self.expand(0..self.rows)
    }

    /// The matrix expanded and converted value by value by `convert`, `[rows, cols]`, blocks
    /// of rows on the thread pool: QLoRA's frozen weights for one layer's pass of the
    /// training step (f32, or bf16 bits for its products on AMX tiles).
    pub(crate) fn expand_with<T: Copy + Default + Send>(&self, convert: impl Fn(f32) -> T + Sync) -> Vec<T> {
        use rayon::prelude::*;
        const ROWS: usize = 32;
        let kernel = Kernel::chosen();
        let mut out = vec![T::default(); self.rows * self.cols];
        out.par_chunks_mut((ROWS * self.cols).max(1)).enumerate().for_each(|(i, o)| {
            let mut wide = vec![0f32; o.len()];
            self.expand_on(kernel, i * ROWS..i * ROWS + o.len() / self.cols, &mut wide);
            o.iter_mut().zip(&wide).for_each(|(o, &v)| *o = convert(v));
        });
        out
    }

    /// Row `r` expanded to f32 (an embedding lookup).
    pub fn row(&self, r: usize) -> Vec<f32> {
        self.expand(r..r + 1)
    }

    fn expand(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = vec![0f32; rows.len() * self.cols];
        self.expand_on(Kernel::chosen(), rows, &mut out);
        out
    }

    /// Rows `rows` expanded to f32 into `out` (`[rows, cols]`), as
    /// [`crate::gguf::dequantize`] expands them.
    fn expand_on(&self, kernel: Kernel, rows: std::ops::Range<usize>, out: &mut [f32]) {
        assert_eq!(out.len(), rows.len() * self.cols, "out holds the rows");
        if let Codes::Super(ty) = self.codes {
            let per_row = ty.byte_len(self.cols).expect("whole super-blocks per row");
            return kquant::expand(kernel, ty, &self.qs[rows.start * per_row..rows.end * per_row], out);
        }
        let nb = self.cols / 32;
        for (blk, out) in (rows.start * nb..rows.end * nb).zip(out.chunks_exact_mut(32)) {
            let at = self.meta(blk / nb, blk % nb);
            let d = self.scales[at];
            match self.codes {
                Codes::Super(_) => unreachable!("expanded above"),
                Codes::Bytes => {
                    for (o, &q) in out.iter_mut().zip(&self.qs[blk * 32..blk * 32 + 32]) {
                        *o = f32::from(q as i8) * d;
                    }
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the SIMD kernels come from `Kernel::available`, which saw AVX2; the
                // function checks the lengths.
                #[allow(unsafe_code)]
                Codes::Nibbles if kernel != Kernel::Portable => unsafe { avx2::expand_nibbles(&self.qs[blk * 16..blk * 16 + 16], d, self.mins[at], out) },
                Codes::Nibbles => {
                    let (qs, m) = (&self.qs[blk * 16..blk * 16 + 16], self.mins[at]);
                    let (lo, hi) = out.split_at_mut(16);
                    for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(qs) {
                        *lo = f32::from(q & 15) * d + m;
                        *hi = f32::from(q >> 4) * d + m;
                    }
                }
            }
        }
    }
}

/// Weight rows a register tile of [`QMatrix::matmul_panels`] takes: six by two vectors
/// of activation rows is twelve accumulators, the loads and a broadcast in the sixteen
/// AVX2 registers (and in half of AVX-512's thirty-two).
const TILE_ROWS: usize = 6;

/// Activation rows in one vector of a register tile: 16 on AVX-512, 8 otherwise.
const MAX_LANES: usize = 16;

/// Columns a register tile multiplies before the next tile's turn (see
/// [`QMatrix::matmul_panels`]).
const K_BLOCK: usize = 256;

/// A register tile's accumulators, `[weight row][vector][lane]`: a tile of `R` weight rows
/// and `V` vectors uses the first `R` and `V`, and a kernel of eight lanes the first eight.
type TileAcc = [[[f32; MAX_LANES]; 2]; TILE_ROWS];

/// `x` (`[n, cols]`) in tiles of `lanes` rows, each `[cols, lanes]` (a column's values side
/// by side, one load for the panel kernels); rows past `n` are zeros.
fn pack_rows(x: &[f32], n: usize, cols: usize, lanes: usize) -> Vec<f32> {
    let mut xp = vec![0f32; n.div_ceil(lanes) * lanes * cols];
    for (i, row) in x.chunks_exact(cols).enumerate() {
        let tile = &mut xp[(i / lanes) * lanes * cols..][..lanes * cols];
        for (k, &v) in row.iter().enumerate() {
            tile[lanes * k + i % lanes] = v;
        }
    }
    xp
}

/// The panel kernels' arithmetic on any CPU, on eight lanes: `acc[j][v][l] += Σ_k ws[j][k] ·
/// xs[v][8k + l]` (from zero when `start`), one fused multiply-add per term in column order
/// (`mul_add` rounds once, as the SIMD instruction does, so the bits are the same as
/// [`avx2::panel_tile`]'s and [`avx512::panel_tile`]'s, whose lanes are such chains too;
/// a chain cut into blocks of columns is the same chain).
fn panel_tile_portable<const R: usize, const V: usize>(ws: [&[f32]; R], xs: [&[f32]; V], acc: &mut TileAcc, start: bool) {
    if start {
        *acc = [[[0.0; MAX_LANES]; 2]; TILE_ROWS];
    }
    for k in 0..ws[0].len() {
        for (w, acc) in ws.iter().zip(acc.iter_mut()) {
            for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                for (l, a) in acc[..8].iter_mut().enumerate() {
                    *a = w[k].mul_add(x[8 * k + l], *a);
                }
            }
        }
    }
}

/// One register tile of [`QMatrix::matmul_panels`] over the columns `ks`: the expanded
/// panel `w` (`[rows, cols]`), the packed activations `xp` ([`pack_rows`], the kernel's
/// [`Kernel::panel_lanes`] rows a tile), the first tile of activation rows `t` and the
/// first weight row `j`.
struct Tile<'a> {
    kernel: Kernel,
    w: &'a [f32],
    xp: &'a [f32],
    cols: usize,
    t: usize,
    j: usize,
    ks: std::ops::Range<usize>,
}

impl Tile<'_> {
    /// `r` weight rows (up to [`TILE_ROWS`]) by `v` vectors of activation rows (1 or 2),
    /// added to `acc` (from zero on the first columns).
    fn rows(&self, r: usize, v: usize, acc: &mut TileAcc) {
        match (r, v) {
            (1, 1) => self.product::<1, 1>(acc),
            (2, 1) => self.product::<2, 1>(acc),
            (3, 1) => self.product::<3, 1>(acc),
            (4, 1) => self.product::<4, 1>(acc),
            (5, 1) => self.product::<5, 1>(acc),
            (6, 1) => self.product::<6, 1>(acc),
            (1, 2) => self.product::<1, 2>(acc),
            (2, 2) => self.product::<2, 2>(acc),
            (3, 2) => self.product::<3, 2>(acc),
            (4, 2) => self.product::<4, 2>(acc),
            (5, 2) => self.product::<5, 2>(acc),
            (6, 2) => self.product::<6, 2>(acc),
            _ => unreachable!("a tile has 1 to {TILE_ROWS} weight rows and 1 or 2 vectors"),
        }
    }

    fn product<const R: usize, const V: usize>(&self, acc: &mut TileAcc) {
        let (cols, lanes, ks) = (self.cols, self.kernel.panel_lanes(), &self.ks);
        let ws: [&[f32]; R] = std::array::from_fn(|j| &self.w[(self.j + j) * cols + ks.start..][..ks.len()]);
        let xs: [&[f32]; V] = std::array::from_fn(|v| &self.xp[(self.t + v) * lanes * cols + lanes * ks.start..][..lanes * ks.len()]);
        let start = ks.start == 0;
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::available` saw AVX-512 F (and AVX2, FMA); the function checks
            // the lengths.
            #[allow(unsafe_code)]
            Kernel::Avx512 => unsafe { avx512::panel_tile(ws, xs, acc, start) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::available` saw AVX2 and FMA; the function checks the lengths.
            #[allow(unsafe_code)]
            Kernel::Avx2 => unsafe { avx2::panel_tile(ws, xs, acc, start) },
            Kernel::Portable => panel_tile_portable(ws, xs, acc, start),
        }
    }
}

/// The output of a task of [`QMatrix::matmul_many`] or [`QMatrix::matmul_panels`]: each
/// task writes its own columns.
struct Dst(*mut f32);

// SAFETY: tasks write disjoint elements through it, and the buffer outlives them.
#[allow(unsafe_code)]
unsafe impl Sync for Dst {}

/// One task's columns `first..first + rows` of an `[n, width]` output.
struct Cols {
    /// Row 0, column `first`.
    at: *mut f32,
    width: usize,
    rows: usize,
    n: usize,
}

#[allow(unsafe_code)]
impl Cols {
    /// # Safety
    /// `dst` points to `n × width` floats that outlive the `Cols`, `first + rows <= width`,
    /// and nothing else writes or reads those columns meanwhile.
    unsafe fn new(dst: &Dst, width: usize, first: usize, rows: usize, n: usize) -> Cols {
        assert!(first + rows <= width);
        // SAFETY: inside the buffer (the caller's promise).
        Cols { at: unsafe { dst.0.add(first) }, width, rows, n }
    }

    /// `vals` into output row `i`, from the task's column `r` on.
    #[inline]
    fn put(&mut self, i: usize, r: usize, vals: &[f32]) {
        assert!(i < self.n && r + vals.len() <= self.rows, "inside the task's columns");
        // SAFETY: row `i`, columns `first + r..first + r + len` (asserted inside the task's
        // own, which `new`'s promise gives it alone).
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.at.add(i * self.width + r), vals.len()) }
    }

    /// The task's columns of output row `i`.
    fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.n);
        // SAFETY: as in `put`; the borrow of `self` keeps it the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.at.add(i * self.width), self.rows) }
    }

    /// Results worked out as `[rows, n]` (weight row by weight row), into their places.
    fn put_transposed(&mut self, res: &[f32]) {
        assert_eq!(res.len(), self.rows * self.n);
        for i in 0..self.n {
            let (n, row) = (self.n, self.row(i));
            for (r, o) in row.iter_mut().enumerate() {
                *o = res[r * n + i];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
mod kquant;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;

/// Fills `out` in groups of up to `max` rows (one of the listed sizes, the largest last):
/// `body` sees the group's first row `i` and its size as a constant `R`, and gives the
/// group's `[f32; R]` (the SIMD kernels take the rows a block is expanded for as a const
/// generic). AVX2 has registers for the accumulators of four rows, AVX-512 for eight.
#[cfg(target_arch = "x86_64")]
macro_rules! in_groups {
    ($out:ident, [$($n:literal)+], |$i:ident, $r:ident| $body:expr) => {{
        let max = *[$($n),+].last().unwrap();
        let mut $i = 0;
        while $i < $out.len() {
            match ($out.len() - $i).min(max) {
                $($n => in_groups!(@group $n, $out, $i, $r, $body),)+
                _ => unreachable!("every size up to the largest is listed"),
            }
        }
    }};
    (@group $n:literal, $out:ident, $i:ident, $r:ident, $body:expr) => {{
        const $r: usize = $n;
        let got: [f32; $r] = $body;
        $out[$i..$i + $r].copy_from_slice(&got);
        $i += $r;
    }};
}

/// One weight row's blocks: codes, scales, and (for 4-bit codes) offsets.
struct Row<'a> {
    codes: Codes,
    qs: &'a [u8],
    scales: Meta<'a>,
    /// Empty for 8-bit codes.
    mins: Meta<'a>,
}

/// The dot products of one row of blocks with one row of `x`, on the best kernel the CPU
/// has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// AVX-512 F for f32 activations, AVX2 and FMA for 8-bit ones.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2, FMA and F16C (every CPU with AVX2 has F16C).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    /// Activation rows in one vector of the panels' register tiles.
    fn panel_lanes(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => 16,
            _ => 8,
        }
    }

    /// The kernels this CPU runs, widest first.
    fn available() -> Vec<Kernel> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            if is_x86_feature_detected!("avx512f") {
                all.push(Kernel::Avx512);
            }
            all.push(Kernel::Avx2);
        }
        all.push(Kernel::Portable);
        all
    }

    /// The widest kernel the CPU runs, or the one `LATHE_CPU_KERNEL` names; chosen once per
    /// process. Commands check the choice first with [`cpu_kernel`], so the panic is only
    /// for a library caller that did not.
    fn chosen() -> Kernel {
        Self::choice().unwrap_or_else(|e| panic!("{e}"))
    }

    fn choice() -> Result<Kernel, String> {
        static CHOSEN: std::sync::OnceLock<Result<Kernel, String>> = std::sync::OnceLock::new();
        CHOSEN
            .get_or_init(|| {
                let available = Self::available();
                let asked = Self::asked();
                if asked.is_empty() || asked == "auto" {
                    return Ok(available[0]);
                }
                let tiles = tiles_here();
                if asked == "amx" && tiles {
                    return Ok(Kernel::Avx512);
                }
                available.iter().copied().find(|k| k.name() == asked).ok_or_else(|| {
                    let names: Vec<&str> = tiles.then_some("amx").into_iter().chain(available.iter().map(|k| k.name())).collect();
                    format!("LATHE_CPU_KERNEL={asked}: this CPU runs {} (or auto, the first)", names.join(", "))
                })
            })
            .clone()
    }

    /// `LATHE_CPU_KERNEL`, lower case (empty when unset).
    fn asked() -> String {
        std::env::var("LATHE_CPU_KERNEL").unwrap_or_default().to_ascii_lowercase()
    }

    fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// One weight row's dot products with every activation row of `x` (`out.len()` rows
    /// of `cols`, with their sums per block in `xsum`). The AVX2 kernel expands each block
    /// to f32 weights once for up to four rows.
    #[inline(always)]
    fn dots(self, w: &Row<'_>, x: &[f32], xsum: &[f32], cols: usize, out: &mut [f32]) {
        let nb = w.scales.len();
        assert_eq!(cols, 32 * nb);
        assert_eq!(x.len(), cols * out.len());
        assert_eq!(xsum.len(), nb * out.len());
        assert_eq!(w.qs.len(), nb * if w.codes == Codes::Bytes { 32 } else { 16 });
        assert_eq!(w.mins.len(), if w.codes == Codes::Bytes { 0 } else { nb });
        let row = |i: usize| &x[i * cols..(i + 1) * cols];
        let sums = |i: usize| &xsum[i * nb..(i + 1) * nb];
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` saw AVX-512 F; the asserts above are the length contract
            // (every row has `cols` = 32 · blocks floats).
            #[allow(unsafe_code)]
            Kernel::Avx512 => unsafe {
                in_groups!(out, [1 2 3 4 5 6 7 8], |i, R| {
                    let xs: [&[f32]; R] = std::array::from_fn(|k| row(i + k));
                    match w.codes {
                        Codes::Bytes => avx512::dot_bytes::<R>(w.qs, w.scales, xs),
                        Codes::Nibbles => avx512::dot_nibbles::<R>(w.qs, w.scales, w.mins, xs),
                        Codes::Super(_) => unreachable!("K-quant rows go to kquant::rows"),
                    }
                })
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` saw AVX2 and FMA; the asserts above are the length contract
            // (every row has `cols` = 32 · blocks floats).
            #[allow(unsafe_code)]
            Kernel::Avx2 => unsafe {
                in_groups!(out, [1 2 3 4], |i, R| {
                    let xs: [&[f32]; R] = std::array::from_fn(|k| row(i + k));
                    match w.codes {
                        Codes::Bytes => avx2::dot_bytes::<R>(w.qs, w.scales, xs),
                        Codes::Nibbles => avx2::dot_nibbles::<R>(w.qs, w.scales, w.mins, xs),
                        Codes::Super(_) => unreachable!("K-quant rows go to kquant::rows"),
                    }
                })
            },
            Kernel::Portable => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = match w.codes {
                        Codes::Bytes => dot_bytes(w.qs, w.scales, row(i)),
                        Codes::Nibbles => dot_nibbles(w.qs, w.scales, row(i)) + w.mins.iter().zip(sums(i)).map(|(m, s)| m * s).sum::<f32>(),
                        Codes::Super(_) => unreachable!("K-quant rows go to kquant::rows"),
                    };
                }
            }
        }
    }

    /// Weight rows `first..` of `m` (`first` a multiple of [`GROUP`], as many as `out` has
    /// columns) times the `n` rows of 8-bit activations `x` ([`Q8Rows`], with the exact sums of each
    /// block of the activations in `xsum` for the offsets). The SIMD kernels take a group of
    /// eight weight rows a pass, in the lanes of a register, for up to four activation rows
    /// ([`avx2::dot8_nibbles_q8`]); every output is [`dot_q8`]'s arithmetic whatever `n`,
    /// so the portable kernel gives the same bits.
    fn dots_q8(self, m: &QMatrix, first: usize, x: &Q8Rows, xsum: &[f32], out: &mut Cols) {
        let (cols, nb, rows, n) = (m.cols, m.cols / 32, out.rows, out.n);
        assert!(first.is_multiple_of(GROUP) && first + rows <= m.rows);
        assert_eq!((x.qs.len(), x.scales.len(), xsum.len()), (n * cols, n * nb, n * nb));
        let xs = |i: usize| &x.qs[i * cols..(i + 1) * cols];
        let xd = |i: usize| &x.scales[i * nb..(i + 1) * nb];
        let sums = |i: usize| &xsum[i * nb..(i + 1) * nb];
        #[cfg(target_arch = "x86_64")]
        let vnni = vnni();
        for g in (0..rows).step_by(GROUP) {
            let live = GROUP.min(rows - g);
            match self {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 | Kernel::Avx2 => {
                    // A last group of fewer rows repeats its last row in the spare lanes.
                    let qs: [&[u8]; GROUP] = std::array::from_fn(|k| m.row_blocks(first + g + k.min(live - 1)).qs);
                    let (d, mins) = m.group_meta(first + g);
                    let mut i = 0;
                    // Activation rows `i..i + R` through the group, into its outputs.
                    macro_rules! pass {
                        ($r:literal) => {{
                            let (x8, d8) = (std::array::from_fn::<_, $r, _>(|j| xs(i + j)), std::array::from_fn::<_, $r, _>(|j| xd(i + j)));
                            // SAFETY: `available` saw AVX2 and FMA (for either kernel), and
                            // `vnni` AVX-VNNI; the kernels check the lengths.
                            #[allow(unsafe_code)]
                            let got = unsafe {
                                let sums8 = || std::array::from_fn(|j| sums(i + j));
                                match (m.codes, vnni) {
                                    (Codes::Nibbles, false) => avx2::dot8_nibbles_q8::<$r>(qs, d, mins, x8, d8, sums8()),
                                    (Codes::Nibbles, true) => avx2::dot8_nibbles_q8_vnni::<$r>(qs, d, mins, x8, d8, sums8()),
                                    (_, false) => avx2::dot8_bytes_q8::<$r>(qs, d, x8, d8),
                                    (_, true) => avx2::dot8_bytes_q8_vnni::<$r>(qs, d, x8, d8),
                                }
                            };
                            for (r, got) in got.iter().enumerate() {
                                out.put(i + r, g, &got[..live]);
                            }
                            i += $r;
                        }};
                    }
                    while i < n {
                        match n - i {
                            1 => pass!(1),
                            2 => pass!(2),
                            3 => pass!(3),
                            _ => pass!(4),
                        }
                    }
                }
                Kernel::Portable => {
                    for k in 0..live {
                        let w = m.row_blocks(first + g + k);
                        for i in 0..n {
                            out.put(i, g + k, &[dot_q8(&w, xs(i), xd(i), sums(i))]);
                        }
                    }
                }
            }
        }
    }

    /// Whether this kernel multiplies weights of these codes by 8-bit activations in
    /// integers: the 32-value blocks on every kernel, K-quants where [`Kernel::k_quant_q8`].
    fn q8(self, codes: Codes) -> bool {
        match codes {
            Codes::Super(ty) => self.k_quant_q8(ty),
            _ => true,
        }
    }

    /// Whether this kernel multiplies `ty`'s super-blocks by 8-bit activations in integers:
    /// the SIMD kernels for Q4_K, Q5_K and Q6_K (what Q4_K_M and Q5_K_M files hold). On the
    /// portable kernel they expand to f32 whatever [`set_int8_activations`] says.
    fn k_quant_q8(self, ty: GgmlType) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 | Kernel::Avx2 => matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K),
            Kernel::Portable => false,
        }
    }

    /// Rows `first..` of a K-quant matrix (`out` is `[rows, n]`) times the `n` rows of 8-bit
    /// activations `x` in blocks of 256 ([`Q8Rows::quantize_super_on`]): up to four
    /// activation rows per pass over the weight rows, all of them in one kernel call. Only
    /// where [`Kernel::k_quant_q8`] says so.
    fn dots_k_q8(self, ty: GgmlType, m: &QMatrix, first: usize, x: &Q8Rows, n: usize, out: &mut [f32]) {
        assert!(self.k_quant_q8(ty), "{ty:?} on the {} kernel has no 8-bit product", self.name());
        let per_row = ty.byte_len(m.cols).expect("whole super-blocks per row");
        let rows = out.len() / n;
        let w = &m.qs[first * per_row..(first + rows) * per_row];
        let mut i = 0;
        while i < n {
            let r = (n - i).min(4);
            match r {
                1 => k_q8_group::<1>(ty, w, x, m.cols, i, n, out),
                2 => k_q8_group::<2>(ty, w, x, m.cols, i, n, out),
                3 => k_q8_group::<3>(ty, w, x, m.cols, i, n, out),
                _ => k_q8_group::<4>(ty, w, x, m.cols, i, n, out),
            }
            i += r;
        }
    }
}

/// Activation rows `i..i + R` of `x` (8-bit, blocks of 256) times the K-quant weight rows
/// `w` (whole rows of `cols`), into columns `i..i + R` of `out` (`[rows, n]`).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn k_q8_group<const R: usize>(ty: GgmlType, w: &[u8], x: &Q8Rows, cols: usize, i: usize, n: usize, out: &mut [f32]) {
    let supers = cols / 256;
    let xs: [&[i8]; R] = std::array::from_fn(|j| &x.qs[(i + j) * cols..(i + j + 1) * cols]);
    let xd: [&[f32]; R] = std::array::from_fn(|j| &x.scales[(i + j) * supers..(i + j + 1) * supers]);
    let sums: [&[i16]; R] = std::array::from_fn(|j| &x.sums[(i + j) * cols / 16..(i + j + 1) * cols / 16]);
    let put = |k: usize, v: [f32; R]| out[k * n + i..k * n + i + R].copy_from_slice(&v);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only `Kernel::dots_k_q8` calls this, where `k_quant_q8` holds: the SIMD
    // kernels, which `available` gave after seeing AVX2, FMA and F16C; the kernels check
    // the lengths.
    #[allow(unsafe_code)]
    unsafe {
        match ty {
            GgmlType::Q4_K => avx2::dots_q4_k_q8::<false, R>(w, xs, xd, sums, put),
            GgmlType::Q5_K => avx2::dots_q4_k_q8::<true, R>(w, xs, xd, sums, put),
            _ => avx2::dots_q6_k_q8::<R>(w, xs, xd, sums, put),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no 8-bit K-quant kernel off x86-64");
}

/// The 8-bit product of every kernel: block by block, `d·dx` times the block's `Σ q·qx`
/// (summed exactly in integers) and, for 4-bit codes, the offset `m` times the exact `Σ x`,
/// each added by one fused multiply-add. The SIMD kernels do the same in lanes, so they
/// give these bits.
fn dot_q8(w: &Row<'_>, xq: &[i8], xd: &[f32], xsum: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, (d, &dx)) in w.scales.iter().zip(xd).enumerate() {
        let x = &xq[32 * b..32 * b + 32];
        let sum: i32 = match w.codes {
            Codes::Bytes => w.qs[32 * b..32 * b + 32].iter().zip(x).map(|(&q, &v)| i32::from(q as i8) * i32::from(v)).sum(),
            Codes::Nibbles => {
                let q = &w.qs[16 * b..16 * b + 16];
                (0..16).map(|j| i32::from(q[j] & 15) * i32::from(x[j]) + i32::from(q[j] >> 4) * i32::from(x[j + 16])).sum()
            }
            Codes::Super(_) => unreachable!("K-quant rows go to kquant::rows"),
        };
        total = (d * dx).mul_add(sum as f32, total);
        if w.codes == Codes::Nibbles {
            total = w.mins.0[GROUP * b].mul_add(xsum[b], total);
        }
    }
    total
}

/// The sum of a block of 32 activations, in eight lanes (so it vectorizes), then pairwise.
fn block_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for c in x.chunks_exact(8) {
        for j in 0..8 {
            acc[j] += c[j];
        }
    }
    hsum(acc)
}

/// Σ_blocks d · Σ q·x over signed bytes, accumulated in 32 lanes with fused multiply-adds
/// (vectorizes; one horizontal sum at the end).
#[inline(always)]
fn dot_bytes(qs: &[u8], scales: Meta<'_>, x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for ((q, d), xb) in qs.chunks_exact(32).zip(scales.iter()).zip(x.chunks_exact(32)) {
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
fn dot_nibbles(qs: &[u8], scales: Meta<'_>, x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for ((q, d), xb) in qs.chunks_exact(16).zip(scales.iter()).zip(x.chunks_exact(32)) {
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

/// `e^x` to a few parts in 10⁷, written so that loops over slices vectorize (libm's `expf`
/// is a call per element): `2ⁿ · e^r` with `r` in ±ln2/2 and a degree-7 polynomial for
/// `e^r`. Below −87 it is 0 (masked scores are −∞); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // ln 2 split so that n·LN2_HI is exact (Cephes' constants); adding 1.5·2²³ rounds.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `2ⁿ` from `t`'s low mantissa bits, which hold `n` (|n| ≤ 127): an integer subtract
    // where `n as i32` would be a saturating cast, eight scalar conversions a register.
    let scale = f32::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    if x < -87.0 { 0.0 } else { p * scale }
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

/// The lanes reduced by `f` in halves: lane `j` with lane `j + w` for `w` = N/2, N/4, …, 1
/// (N a power of two), so each halving is one vector operation.
#[inline(always)]
fn halving<const N: usize>(mut v: [f32; N], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = N;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            v[j] = f(v[j], v[j + w]);
        }
    }
    v[0]
}

/// Pairwise sum of the lanes (N a power of two).
#[inline(always)]
pub(crate) fn hsum<const N: usize>(v: [f32; N]) -> f32 {
    halving(v, |a, b| a + b)
}

/// The largest of the lanes, halving (N a power of two; `>` keeps it a vector max).
#[inline(always)]
pub(crate) fn hmax<const N: usize>(v: [f32; N]) -> f32 {
    halving(v, |a, b| if b > a { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{dequantize, quantize};

    #[test]
    fn the_vectorizable_exp_is_libms_to_a_few_parts_in_ten_million() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (want, got) = (x.exp(), exp(x));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn decode_runs_cover_a_matrix_in_even_shares_of_whole_groups() {
        for threads in 1..=8 {
            for rows in (0..5000).step_by(8).chain([1, 7, 49_152, 151_936]) {
                let run = decode_run(rows, threads);
                assert!(run.is_multiple_of(GROUP) && (GROUP..=256).contains(&run), "{rows} rows, {threads} threads: {run}");
                let runs = rows.div_ceil(run);
                // Every thread gets the same number of runs once the rows fill them all.
                if rows >= threads * 256 && rows.is_multiple_of(threads * 256) {
                    assert!(runs.is_multiple_of(threads), "{rows} rows, {threads} threads: {runs} runs of {run}");
                }
            }
        }
        assert_eq!((decode_run(1536, 2), decode_run(4096, 2), decode_run(576, 2), decode_run(192, 2)), (256, 256, 144, 96));
    }

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
            for kernel in Kernel::available() {
                for n in [1, 3, MAX_ROWS, MAX_ROWS + 5] {
                    let x = values(n * cols, 7);
                    let got = QMatrix::matmul_many_on(kernel, &[&q], &x, n, false).pop().unwrap();
                    for i in 0..n {
                        for r in 0..rows {
                            let want: f32 = (0..cols).map(|c| w[r * cols + c] * x[i * cols + c]).sum();
                            let g = got[i * rows + r];
                            assert!((g - want).abs() <= 1e-4 * (1.0 + want.abs()), "{ty:?} {kernel:?} n={n} [{i},{r}]: {g} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// K-quant blocks stay as the file has them, and the product from them equals the dense
    /// product of their expansion (which matches gguf-py's, see `gguf::tests`) for any
    /// number of rows, with 8-bit activations asked for or not (on the portable kernel
    /// they multiply in f32 whatever is asked). The blocks are both quantized values and
    /// random bytes (every scale and min bit, Q6_K scales down to -128, every fifth bit),
    /// with only the half-float factors kept finite.
    #[test]
    fn k_quant_products_equal_the_dense_product_of_their_expansion() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kquants");
        let random = |ty: GgmlType, rows: usize, cols: usize| {
            let mut b: Vec<u8> = (0..ty.byte_len(rows * cols).unwrap()).map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
            let (size, factors): (usize, &[usize]) = match ty {
                GgmlType::Q6_K => (210, &[208]),
                GgmlType::Q5_K => (176, &[0, 2]),
                _ => (144, &[0, 2]),
            };
            for (k, block) in b.chunks_exact_mut(size).enumerate() {
                for (j, &at) in factors.iter().enumerate() {
                    let f = half::f16::from_f32(0.001 * (1 + (k + j) % 7) as f32);
                    block[at..at + 2].copy_from_slice(&f.to_le_bytes());
                }
            }
            b
        };
        for (ty, made) in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K].into_iter().flat_map(|ty| [(ty, false), (ty, true)]) {
            // Q5_K is read, not written: the blocks gguf-py made, as rows of one block.
            let (bytes, rows, cols) = match ty {
                _ if made => (random(ty, 20, 768), 20, 768),
                GgmlType::Q5_K => {
                    let b = std::fs::read(fixtures.join("Q5_K.bin")).unwrap();
                    let rows = b.len() / 176;
                    (b, rows, 256)
                }
                _ => (quantize(ty, &values(24 * 512, 3)), 24, 512),
            };
            let w = dequantize(ty, &bytes, rows * cols);
            let q = QMatrix::from_ggml(ty, &bytes, rows, cols).unwrap();
            assert_eq!(q.bytes(), bytes.len(), "{ty:?} is kept packed");
            assert_eq!(q.dequantize(), w, "{ty:?}");
            assert_eq!(q.row(rows - 1), w[(rows - 1) * cols..], "{ty:?}");
            for (n, kernel) in [1, 5, MAX_ROWS + 3].into_iter().flat_map(|n| Kernel::available().into_iter().map(move |k| (n, k))) {
                let x = values(n * cols, 9);
                // The activations as the 8-bit kernel sees them: rounded per block of 256.
                let xq = Q8Rows::quantize_super_on(kernel, &x);
                let rounded: Vec<f32> = xq.qs.iter().enumerate().map(|(i, &v)| f32::from(v) * xq.scales[i / 256]).collect();
                assert_eq!(xq.sums, xq.qs.chunks_exact(16).map(|c| c.iter().map(|&v| i16::from(v)).sum()).collect::<Vec<i16>>());
                for int8 in [false, true] {
                    let integer = int8 && kernel.k_quant_q8(ty);
                    let got = QMatrix::matmul_many_on(kernel, &[&q], &x, n, int8).pop().unwrap();
                    for i in 0..n {
                        for r in 0..rows {
                            let xs = if integer { &rounded } else { &x };
                            let want: f32 = (0..cols).map(|c| w[r * cols + c] * xs[i * cols + c]).sum();
                            let g = got[i * rows + r];
                            assert!((g - want).abs() <= 1e-4 * (1.0 + want.abs()), "{ty:?} {kernel:?} int8={int8} n={n} [{i},{r}]: {g} vs {want}");
                        }
                    }
                    assert_eq!(integer, int8 && kernel != Kernel::Portable);
                }
            }
        }
        assert!(QMatrix::from_ggml(GgmlType::Q4_K, &[0; 144], 1, 128).is_none(), "a row must hold whole super-blocks");
    }

    /// AVX-VNNI's 8-bit products give AVX2's bits: random codes over their whole range
    /// (signed bytes down to -128, activations at ±127), one to four activation rows.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_vnni_products_give_the_avx2_bits() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("avxvnni")) {
            eprintln!("skipped: this CPU has no AVX-VNNI");
            return;
        }
        let nb = 6;
        let byte = |i: usize, seed: usize| ((i * 2654435761 + seed * 40503) >> 7) as u8;
        let codes: Vec<Vec<u8>> = (0..8).map(|r| (0..32 * nb).map(|i| byte(i, r + 1)).collect()).collect();
        let d = values(8 * nb, 5);
        let m = values(8 * nb, 6);
        let xs: Vec<Vec<i8>> = (0..4)
            .map(|r| (0..32 * nb).map(|i| if i % 7 == 0 { if i % 2 == 0 { 127 } else { -127 } } else { (i16::from(byte(i, r + 20) % 255) - 127) as i8 }).collect())
            .collect();
        let xd = values(4 * nb, 7);
        let xsum = values(4 * nb, 8);
        macro_rules! rows {
            ($r:literal) => {{
                let x: [&[i8]; $r] = std::array::from_fn(|k| &xs[k][..]);
                let s: [&[f32]; $r] = std::array::from_fn(|k| &xd[k * nb..(k + 1) * nb]);
                let sums: [&[f32]; $r] = std::array::from_fn(|k| &xsum[k * nb..(k + 1) * nb]);
                let nibbles: [&[u8]; 8] = std::array::from_fn(|k| &codes[k][..16 * nb]);
                let bytes: [&[u8]; 8] = std::array::from_fn(|k| &codes[k][..]);
                // SAFETY: the CPU has AVX2, FMA and AVX-VNNI (checked above); the kernels
                // check the lengths.
                #[allow(unsafe_code)]
                unsafe {
                    let (a, b) = (avx2::dot8_nibbles_q8::<$r>(nibbles, &d, &m, x, s, sums), avx2::dot8_nibbles_q8_vnni::<$r>(nibbles, &d, &m, x, s, sums));
                    assert_eq!(a.map(|r| r.map(f32::to_bits)), b.map(|r| r.map(f32::to_bits)), "nibbles, {} rows", $r);
                    let (a, b) = (avx2::dot8_bytes_q8::<$r>(bytes, &d, x, s), avx2::dot8_bytes_q8_vnni::<$r>(bytes, &d, x, s));
                    assert_eq!(a.map(|r| r.map(f32::to_bits)), b.map(|r| r.map(f32::to_bits)), "bytes, {} rows", $r);
                }
            }};
        }
        rows!(1);
        rows!(2);
        rows!(3);
        rows!(4);
    }

    /// With 8-bit activations the kernel computes, up to float summation order, the dense
    /// product of the dequantized weights with the rounded activations; and so it stays
    /// within the activations' rounding (half a step per value) of the exact product. Every
    /// kernel gives the same bits ([`dot_q8`]'s arithmetic), for any number of rows and a
    /// last group of fewer than eight weight rows.
    #[test]
    fn int8_activations_multiply_the_rounded_activations_exactly() {
        let (rows, cols) = (45, 128);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let bytes = quantize(ty, &values(rows * cols, 3));
            let w = dequantize(ty, &bytes, rows * cols);
            let q = QMatrix::from_ggml(ty, &bytes, rows, cols).unwrap();
            for n in [1, 2, 5, MAX_ROWS + 3] {
                let x = values(n * cols, 11);
                let xq = Q8Rows::quantize_on(Kernel::chosen(), &x);
                let rounded: Vec<f32> = xq.qs.iter().enumerate().map(|(i, &v)| f32::from(v) * xq.scales[i / 32]).collect();
                let portable = QMatrix::matmul_many_on(Kernel::Portable, &[&q], &x, n, true).pop().unwrap();
                for kernel in Kernel::available() {
                    let got = QMatrix::matmul_many_on(kernel, &[&q], &x, n, true).pop().unwrap();
                    assert_eq!(got, portable, "{ty:?} {kernel:?} n={n}: the same bits as the portable kernel");
                }
                for i in 0..n {
                    for r in 0..rows {
                        // The codes times the rounded activations; the offsets (min per
                        // block) times the exact ones.
                        let offset = |c: usize| if q.codes == Codes::Nibbles { q.mins[q.meta(r, c / 32)] } else { 0.0 };
                        let want: f32 = (0..cols).map(|c| (w[r * cols + c] - offset(c)) * rounded[i * cols + c] + offset(c) * x[i * cols + c]).sum();
                        let g = portable[i * rows + r];
                        assert!((g - want).abs() <= 1e-4 * (1.0 + want.abs()), "{ty:?} n={n} [{i},{r}]: {g} vs {want}");
                    }
                }
            }
            // Through `matmul`: within the activations' rounding of the f32 path.
            let n = 3;
            let x = values(n * cols, 5);
            let (got, exact) = (q.matmul_with(&x, n, true), q.matmul_with(&x, n, false));
            assert_ne!(got, exact, "{ty:?}: 8-bit activations take the other path");
            let xq = Q8Rows::quantize_on(Kernel::chosen(), &x);
            for i in 0..n {
                for r in 0..rows {
                    let bound: f32 = (0..cols).map(|c| w[r * cols + c].abs() * xq.scales[(i * cols + c) / 32] / 2.0).sum();
                    let (g, e) = (got[i * rows + r], exact[i * rows + r]);
                    assert!((g - e).abs() <= bound + 1e-4, "{ty:?} [{i},{r}]: {g} vs {e} (bound {bound})");
                }
            }
        }
    }

    /// Each kernel gives a row the same bits whether it comes alone or with others (the
    /// serving scheduler's batches change every step; a stream's tokens must not): with f32
    /// activations up to [`MAX_ROWS`] rows (past them the panels take over), with 8-bit ones
    /// for any number.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch_on_any_kernel() {
        let rows = 23;
        let kernels = Kernel::available();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            // A tail of blocks past a multiple of eight; K-quants take whole super-blocks.
            let cols = if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) { 512 } else { 416 };
            let q = QMatrix::from_ggml(ty, &quantize(ty, &values(rows * cols, 5)), rows, cols).unwrap();
            for (int8, n) in [(false, 11), (true, 11), (true, MAX_ROWS + 5)] {
                let x = values(n * cols, 9);
                for &kernel in &kernels {
                    if int8 && n > MAX_ROWS && !kernel.q8(q.codes) {
                        continue; // f32 panels: see above
                    }
                    let batch = QMatrix::matmul_many_on(kernel, &[&q], &x, n, int8).pop().unwrap();
                    for i in 0..n {
                        let alone = QMatrix::matmul_many_on(kernel, &[&q], &x[i * cols..(i + 1) * cols], 1, int8).pop().unwrap();
                        assert_eq!(alone, batch[i * rows..(i + 1) * rows], "{ty:?} {kernel:?} int8={int8}: row {i} of {n}");
                    }
                }
            }
        }
    }

    /// The exact product (a prompt's rows beside 8-bit tokens) is, on every kernel and for
    /// any number of rows, the same bits as one fused multiply-add per term in column order
    /// over the expanded weights: the same whatever shares the call, and the same on the
    /// portable kernel as on the SIMD ones. Row counts cross the tiles' edges (8, 16), the
    /// weight rows the register tiles' and panels' (6, 48), and the columns the blocks a tile
    /// multiplies at a time (256, one block partly filled). Each kernel runs only where the
    /// CPU has it: the AVX-512 one is checked on AVX-512 machines alone.
    #[test]
    fn the_exact_product_is_one_fused_chain_per_output_for_any_rows_on_any_kernel() {
        for (ty, rows, cols) in [(GgmlType::Q4_1, 101, 96), (GgmlType::Q8_0, 50, 64), (GgmlType::Q4_K, 13, 256), (GgmlType::Q4_1, 19, 608), (GgmlType::Q4_K, 8, 768)] {
            let q = QMatrix::from_ggml(ty, &quantize(ty, &values(rows * cols, 21)), rows, cols).unwrap();
            let w = q.dequantize();
            let x = values(40 * cols, 4);
            let want = |i: usize, r: usize| (0..cols).fold(0f32, |acc, c| w[r * cols + c].mul_add(x[i * cols + c], acc));
            for kernel in Kernel::available() {
                for n in [1, 7, 8, 9, 16, 17, 40] {
                    let got = QMatrix::matmul_panels(kernel, &[&q, &q], &x[..n * cols], n, cols);
                    assert_eq!(got[0], got[1]);
                    for i in 0..n {
                        for r in 0..rows {
                            assert_eq!(got[0][i * rows + r].to_bits(), want(i, r).to_bits(), "{ty:?} {kernel:?} n={n} [{i},{r}]");
                        }
                    }
                }
            }
        }
    }

    /// On AMX tiles the exact product is within 2⁻¹⁶ of Σ|w·x| of the f64 product of the
    /// expanded weights (keeping only the bf16 high halves is some fifty times further off),
    /// and a row's result is the same bits alone as beside 1 to 39 others. Row counts cross
    /// the tiles' edges (16, 32), weight rows the tiles' and panels' (16, 48). Runs where the
    /// CPU has AMX-BF16 only.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_exact_product_on_tiles_is_within_split_bf16_of_f64_and_the_same_for_any_rows() {
        if !amx::available() {
            eprintln!("this CPU has no AMX-BF16 (or Linux did not grant it): nothing to check");
            return;
        }
        let kernel = Kernel::chosen();
        for (ty, rows, cols) in [(GgmlType::Q4_1, 101, 96), (GgmlType::Q8_0, 50, 64), (GgmlType::Q4_K, 13, 256), (GgmlType::Q4_1, 19, 608), (GgmlType::Q6_K, 40, 512)] {
            let q = QMatrix::from_ggml(ty, &quantize(ty, &values(rows * cols, 21)), rows, cols).unwrap();
            let w = q.dequantize();
            let x = values(40 * cols, 4);
            let alone: Vec<Vec<f32>> = (0..40).map(|i| QMatrix::matmul_tiles(kernel, &[&q], &x[i * cols..(i + 1) * cols], 1, cols).pop().unwrap()).collect();
            let mut worst = 0f64;
            for i in 0..40 {
                for r in 0..rows {
                    let terms = (0..cols).map(|c| f64::from(w[r * cols + c]) * f64::from(x[i * cols + c]));
                    let (exact, size) = terms.fold((0f64, 0f64), |(s, a), t| (s + t, a + t.abs()));
                    worst = worst.max((f64::from(alone[i][r]) - exact).abs() / size);
                }
            }
            assert!(worst <= 2f64.powi(-16), "{ty:?}: an output off by {worst:e} of its terms' sizes");
            for n in [2, 7, 16, 17, 33, 40] {
                let got = QMatrix::matmul_tiles(kernel, &[&q, &q], &x[..n * cols], n, cols);
                assert_eq!(got[0], got[1]);
                for (i, alone) in alone.iter().enumerate().take(n) {
                    assert_eq!(&got[0][i * rows..(i + 1) * rows], &alone[..], "{ty:?}: row {i} of {n}");
                }
            }
        }
    }

    /// The AVX2 rounding of activations is the portable one, ties and zero blocks included.
    #[test]
    fn activations_round_alike_on_every_kernel() {
        let mut x = values(32 * 6, 13);
        // A block whose step is exactly 1 (max 127): .5 values are ties.
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 - 15.5 };
        }
        x[64..96].fill(0.0);
        let (avx, portable) = (Q8Rows::quantize_on(Kernel::chosen(), &x), Q8Rows::quantize_on(Kernel::Portable, &x));
        assert_eq!(avx.qs, portable.qs);
        assert_eq!(avx.scales, portable.scales);
        assert_eq!(&portable.qs[33..36], &[-14, -14, -12], "ties round to even");
        // Blocks of 256 (the K-quants'): one step for all eight blocks of 32.
        let mut x = values(256 * 2, 17);
        x[300] = 40.0;
        let (avx, portable) = (Q8Rows::quantize_super_on(Kernel::chosen(), &x), Q8Rows::quantize_super_on(Kernel::Portable, &x));
        assert_eq!((&avx.qs, &avx.scales, &avx.sums), (&portable.qs, &portable.scales, &portable.sums));
        assert_eq!(portable.scales[1], 40.0 / 127.0);
        assert_eq!(portable.qs[300], 127);
    }

    #[test]
    fn other_types_stay_dense() {
        assert!(QMatrix::from_ggml(GgmlType::F16, &[0; 64], 1, 32).is_none());
        assert!(QMatrix::from_ggml(GgmlType::Q8_0, &[0; 34], 1, 31).is_none());
    }
}
