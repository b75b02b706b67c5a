#!/usr/bin/env bash
# The README's second command: set up and run the whole test suite (release profile, the
# same build the demo uses, so one compile serves both). The sandbox's build script also
# builds every plugin in plugins/ and host/sandbox/tests/hostile/ for wasm32-wasip2.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The plugins' shared logic is plain Rust with unit tests of its own.
cargo test --release --manifest-path plugins/Cargo.toml -p lathe-metrics
# The GPU code path (burn's wgpu kernels): the engine's tiny-model tests on Mesa's CPU
# Vulkan driver, lavapipe. Needs its own build of the engine with the `wgpu` feature.
XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}" LATHE_TEST_DEVICE=vulkan \
    cargo nextest run --release -p lathe-engine --features wgpu --no-fail-fast -E 'test(/^tiny::/)'
# The GPU build, stripped for copying to a GPU machine (target/dist/lathe; CUDA and, through
# wgpu, Vulkan), as `scripts/gpu-proof.sh prepare` makes it. It builds from crates.io alone
# (no LLVM download, no CUDA toolkit: see patches/cubecl-llvm); the e2e tests run it here,
# where there is no GPU, and expect an error naming what is missing.
cargo build --profile dist -p lathe --features cuda,wgpu
LATHE_CUDA_BINARY="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/dist/lathe"
export LATHE_CUDA_BINARY
# Everything, on the CPU (with the AVX-512 kernels where the CPU has them, as the demo).
# shellcheck disable=SC2046 # the features are words on purpose
cargo nextest run --release --workspace $(scripts/cpu-features.sh) --no-fail-fast "$@"
# The training step on the AVX2 kernels (CPUs without AVX-512), where this CPU has AVX-512
# and the pass above ran those: the same build, the kernel picked at run time.
if grep -q -m1 -w avx512f /proc/cpuinfo 2>/dev/null; then
    # shellcheck disable=SC2046
    LATHE_CPU_KERNEL=avx2 cargo nextest run --release -p lathe-engine $(scripts/cpu-features.sh) --no-fail-fast -E 'test(/^train::/)'
fi
