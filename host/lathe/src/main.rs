//! `lathe`: the command line. Thin: parse arguments, set up threads and the device, call
//! the libraries.

mod bench;
mod cli;
mod data;
mod demo;
mod eval;
mod pack;
mod plugin;
mod render;
mod serve;
mod train;

use clap::Parser;

fn main() {
    keep_freed_memory();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Tells glibc's allocator to keep freed memory for reuse instead of handing it back to
/// the kernel. A training step allocates and frees the same few hundred megabytes of
/// activations every step; by default glibc maps each large buffer fresh and unmaps it
/// when freed (or trims its heap), so every step faulted its pages in again and the kernel
/// zeroed them: 7 % of the CPU step in `perf`, 3 % of its time (BENCHMARKS.md, Training).
/// Setting the trim threshold alone would be worse than nothing: it also pins the mmap
/// threshold at its 128 KiB default (the step ran 2x slower), so both are set. Up to the
/// trim threshold of freed memory stays with the process, reused by its next allocations.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    /// glibc's largest mmap threshold on 64-bit: buffers above it are still mapped.
    const MMAP_THRESHOLD: i32 = 32 << 20;
    const TRIM_THRESHOLD: i32 = 1 << 30;
    // SAFETY: `mallopt` only changes two tuning values of the allocator; it is called
    // before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
