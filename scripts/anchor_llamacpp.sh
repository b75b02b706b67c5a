#!/usr/bin/env bash
# The llama.cpp anchor, as its PyPI package builds it: makes .venv-anchors with
# llama-cpp-python (compiled from source here, about ten minutes on two cores) and its
# OpenAI-compatible server. Used by scripts/bench_llamacpp.py (generation) and by
# `lathe bench serve --anchor-url` against `scripts/anchor_llamacpp.sh serve`.
#
#   scripts/anchor_llamacpp.sh                 # install (once)
#   scripts/anchor_llamacpp.sh serve [PORT]    # llama.cpp's server on SmolLM2, 2 threads
#   scripts/anchor_llamacpp.sh avx512          # a second build, with AVX-512 and VNNI
#                                              # (.venv-anchors-avx512; AMX off: its AMX
#                                              # build crashed in its first decode here)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = avx512 ]; then
    grep -qw avx512_vnni /proc/cpuinfo || { echo "this CPU has no AVX-512 VNNI: the AVX2 build is the anchor here" >&2; exit 1; }
    VENV=.venv-anchors-avx512
    # AVX-VNNI (the VEX form) only where the CPU has it: AMD's Zen 4 has AVX-512 VNNI but
    # not AVX-VNNI, and a build with it died of an illegal instruction there.
    vex_vnni=OFF; grep -qw avx_vnni /proc/cpuinfo && vex_vnni=ON
    if ! "$VENV/bin/python" -c "import llama_cpp" >/dev/null 2>&1; then
        python3 -m venv "$VENV"
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=$vex_vnni -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF" \
            "$VENV/bin/pip" install -q --no-cache-dir "llama-cpp-python==0.3.36" numpy
    fi
    exit 0
fi
VENV=.venv-anchors
if ! "$VENV/bin/python" -c "import llama_cpp.server" >/dev/null 2>&1; then
    python3 -m venv "$VENV"
    # AVX2 kernels, as on every machine this project runs on; no OpenMP (its threads
    # would fight the given thread count).
    # --no-cache-dir: pip's wheel cache is keyed by the package, not by CMAKE_ARGS, so a
    # wheel built earlier with other flags (a native build with AMX, say) would be reused
    # and die of an illegal instruction.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF" \
        "$VENV/bin/pip" install -q --no-cache-dir "llama-cpp-python[server]==0.3.36" numpy
fi
if [ "${1:-}" = serve ]; then
    # One slot, as its server has: requests are answered one after another.
    exec "$VENV/bin/python" -m llama_cpp.server --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --n_threads 2 --n_threads_batch 2 --n_ctx 2048 --port "${2:-8091}" --host 127.0.0.1
fi
