#!/usr/bin/env bash
# The cargo features for this machine's CPU, used by demo.sh and test.sh so that both
# share one build: burn's AVX-512 kernels where the CPU has AVX-512 (about 1.25x on
# training here, see BENCHMARKS.md). The binary is built and run on this machine; to carry
# it to another, build there or build without this flag (`cargo build --release -p lathe`).
if grep -q -m1 -w avx512f /proc/cpuinfo 2>/dev/null; then
    echo "--features lathe-engine/avx512"
fi
