//! The exact product ([`super::QMatrix::matmul_exact`], a prompt's rows) on Intel AMX tiles,
//! where the CPU has them (Xeon Sapphire Rapids and later) and Linux grants the tile state.
//!
//! A tile multiply (`tdpbf16ps`) does 16 × 16 × 32 bf16 multiply-adds into f32 in one
//! instruction, some sixteen times what AVX-512's fused multiply-adds do on f32. bf16 keeps 8
//! bits of a float's 24, so each operand is split in two bf16 halves, `v = hi + lo` (16
//! bits), and a product is three tile products, `wₕ·xₕ + wₕ·xₗ + wₗ·xₕ` (the `wₗ·xₗ` term is
//! below f32's last bits of the sum): within about 1e-5 of the f32 product instead of f32's
//! 1e-7, a hundred times closer than 8-bit activations (the test bounds it). What the split
//! costs is tile loads, which set the speed here, not the multiplies.
//!
//! Every output is one chain in a fixed order (32 columns a step, the three products in that
//! order) whatever the number of rows in the call, so a row's result is the same bits
//! however a prompt is cut, as on the FMA kernels; the bits are not theirs
//! (`LATHE_CPU_KERNEL=avx512` gives those).
//!
//! The weights are the tiles' left operand, rows of 16 weight rows by 32 columns straight
//! from an expanded panel; the activations the right one, laid out once per call in the
//! tiles' pairs-of-columns form (`[16 column pairs][16 rows][2]`).
#![allow(unsafe_code)]

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{Cols, Kernel, QMatrix};

/// Whether this process can multiply on AMX tiles: the CPU has AMX-BF16 and AVX-512 BF16,
/// and the kernel grants this process the tile state. Asked once.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU with AVX2, which the caller saw.
        let edx = unsafe { __cpuid_count(7, 0) }.edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f") && request_tiles()
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

/// The tile configuration `ldtilecfg` reads (palette 1): every tile 16 rows of 64 bytes.
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

/// bf16 values (their bit patterns) in a buffer.
type Bf16 = u16;

/// `x` split into bf16 halves, `x ≈ hi + lo` (each rounded to nearest even), into `hi` and
/// `lo` (as long as `x`, a multiple of 32).
#[target_feature(enable = "avx512f,avx512bf16")]
fn split(x: &[f32], hi: &mut [Bf16], lo: &mut [Bf16]) {
    assert!(x.len() == hi.len() && x.len() == lo.len() && x.len().is_multiple_of(32));
    for ((x, hi), lo) in x.chunks_exact(32).zip(hi.chunks_exact_mut(32)).zip(lo.chunks_exact_mut(32)) {
        // SAFETY: each chunk holds 32 values (chunks_exact); unaligned loads and stores.
        unsafe {
            let (a, b) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
            let h = _mm512_cvtne2ps_pbh(b, a);
            let hb: __m512i = std::mem::transmute(h);
            // The halves back to f32 (a bf16 is an f32's top 16 bits), and what they miss.
            let ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hb)), 16));
            let hbv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hb, 1)), 16));
            let l = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hbv), _mm512_sub_ps(a, ha));
            _mm512_storeu_si512(hi.as_mut_ptr().cast(), hb);
            _mm512_storeu_si512(lo.as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(l));
        }
    }
}

/// The activations `x` (`[n, cols]`) as the tiles' right operand, into `hi` and `lo`: for
/// each block of 16 rows (zeros past `n`, up to an even number of blocks) and each 32
/// columns, a 1 KiB tile `[column pair p][row l][2]`. Tile `(b, kb)` starts at
/// `(b·nkb + kb)·512`. The buffers are reused: every element is written.
fn activation_tiles(x: &[f32], n: usize, cols: usize, hi: &mut Vec<Bf16>, lo: &mut Vec<Bf16>) {
    let (nkb, padded) = (cols / 32, n.next_multiple_of(32));
    hi.resize(padded * cols, 0);
    lo.resize(padded * cols, 0);
    let (mut h, mut l) = (vec![0; cols], vec![0; cols]);
    for i in 0..padded {
        if i < n {
            // SAFETY: `available` saw AVX-512 F and BF16 before any caller got here.
            unsafe { split(&x[i * cols..(i + 1) * cols], &mut h, &mut l) };
        } else if i == n {
            h.fill(0);
            l.fill(0);
        }
        let (b, lane) = (i / 16, i % 16);
        for kb in 0..nkb {
            let tile = (b * nkb + kb) * 512 + 2 * lane;
            for p in 0..16 {
                let (src, dst) = (32 * kb + 2 * p, tile + 32 * p);
                hi[dst..dst + 2].copy_from_slice(&h[src..src + 2]);
                lo[dst..dst + 2].copy_from_slice(&l[src..src + 2]);
            }
        }
    }
}

/// Weight rows a task expands and splits: six tiles' rows, 600 KB as f32 and bf16 halves
/// at 1536 columns, in L2 while every activation tile goes by once.
const PANEL_ROWS: usize = 96;

/// [`QMatrix::matmul_exact`] on AMX tiles (see the module's notes); [`available`] must be
/// true.
pub(super) fn matmul(kernel: Kernel, mats: &[&QMatrix], x: &[f32], n: usize, cols: usize) -> Vec<Vec<f32>> {
    assert!(available(), "AMX tiles are available");
    assert!(cols.is_multiple_of(32), "whole blocks of 32 columns");
    thread_local! {
        /// Each thread's expanded panel and its two halves, kept between tasks and steps.
        static PANEL: std::cell::RefCell<(Vec<f32>, Vec<Bf16>, Vec<Bf16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
        /// The calling thread's activation tiles, likewise kept.
        static ACTIVATIONS: std::cell::RefCell<(Vec<Bf16>, Vec<Bf16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    ACTIVATIONS.with_borrow_mut(|(xh, xl)| {
        activation_tiles(x, n, cols, xh, xl);
        let (xh, xl) = (&*xh, &*xl);
        QMatrix::by_runs_of_rows(mats, n, PANEL_ROWS, |m, first, out| {
            let rows = out.rows;
            let padded = rows.next_multiple_of(16) * cols;
            PANEL.with_borrow_mut(|(w, wh, wl)| {
                w.resize(padded, 0.0);
                wh.resize(padded, 0);
                wl.resize(padded, 0);
                let (w, wh, wl) = (&mut w[..padded], &mut wh[..padded], &mut wl[..padded]);
                m.expand_on(kernel, first..first + rows, &mut w[..rows * cols]);
                w[rows * cols..].fill(0.0);
                // SAFETY: `available` saw AVX-512 F and BF16.
                unsafe { split(w, wh, wl) };
                // SAFETY: `available` saw AMX-BF16 and got the tile state; the operands hold
                // whole 16-row weight blocks and the activation tiles of `n` rows, as
                // `product` reads.
                unsafe { product(wh, wl, xh, xl, n, cols, out) };
            })
        })
    })
}

/// The products of one panel (`wh`, `wl`: `[16·k, cols]`) with every activation tile, into
/// the task's columns of the output.
///
/// # Safety
/// The CPU has AMX-BF16 and the process holds the tile state; `wh` and `wl` hold a whole
/// number of 16-row blocks of `cols` values, `xh` and `xl` are [`activation_tiles`] of `n`
/// rows of `cols`, and `out` has `n` rows and at most `wh.len() / cols` columns.
#[target_feature(enable = "avx512f")]
unsafe fn product(wh: &[Bf16], wl: &[Bf16], xh: &[Bf16], xl: &[Bf16], n: usize, cols: usize, out: &mut Cols) {
    let nkb = cols / 32;
    let pairs = n.div_ceil(32);
    assert!(wh.len() == wl.len() && wh.len().is_multiple_of(16 * cols) && out.rows <= wh.len() / cols);
    assert!(xh.len() >= pairs * 2 * nkb * 512 && xl.len() >= pairs * 2 * nkb * 512 && out.n == n);
    let stride = cols * 2;
    let mut c = [[0f32; 256]; 2];
    // SAFETY: the configuration is valid (palette 1, eight 16 × 64-byte tiles); every tile
    // load reads 16 rows of 64 bytes inside the buffers asserted above (a weight tile's rows
    // are `stride` bytes apart from row 16·wb, column 32·kb; an activation tile is 1 KiB at
    // a multiple of 512 values below the length); the stores write the 1 KiB arrays `c`.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &FULL, options(nostack, readonly));
        for pair in 0..pairs {
            for wb in 0..wh.len() / (16 * cols) {
                asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                for kb in 0..nkb {
                    let w = wb * 16 * cols + 32 * kb;
                    let (x0, x1) = ((2 * pair * nkb + kb) * 512, ((2 * pair + 1) * nkb + kb) * 512);
                    // tmm2, tmm3: 16 weight rows' hi and lo; tmm4..7: two blocks of 16
                    // activation rows' hi, then lo. Each output adds wₕ·xₕ, wₕ·xₗ, wₗ·xₕ.
                    asm!(
                        "tileloadd tmm2, [{wh} + {stride}*1]",
                        "tileloadd tmm4, [{xh0} + {s64}*1]",
                        "tdpbf16ps tmm0, tmm2, tmm4",
                        "tileloadd tmm5, [{xh1} + {s64}*1]",
                        "tdpbf16ps tmm1, tmm2, tmm5",
                        "tileloadd tmm6, [{xl0} + {s64}*1]",
                        "tdpbf16ps tmm0, tmm2, tmm6",
                        "tileloadd tmm7, [{xl1} + {s64}*1]",
                        "tdpbf16ps tmm1, tmm2, tmm7",
                        "tileloadd tmm3, [{wl} + {stride}*1]",
                        "tdpbf16ps tmm0, tmm3, tmm4",
                        "tdpbf16ps tmm1, tmm3, tmm5",
                        wh = in(reg) wh.as_ptr().add(w),
                        wl = in(reg) wl.as_ptr().add(w),
                        xh0 = in(reg) xh.as_ptr().add(x0),
                        xh1 = in(reg) xh.as_ptr().add(x1),
                        xl0 = in(reg) xl.as_ptr().add(x0),
                        xl1 = in(reg) xl.as_ptr().add(x1),
                        stride = in(reg) stride,
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
                // c[h][j·16 + l]: weight row 16·wb + j, activation row 32·pair + 16·h + l.
                for (h, c) in c.iter().enumerate() {
                    for l in 0..16 {
                        let i = 32 * pair + 16 * h + l;
                        if i < n {
                            let o = out.row(i);
                            for j in 0..16.min(o.len().saturating_sub(16 * wb)) {
                                o[16 * wb + j] = c[16 * j + l];
                            }
                        }
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}
