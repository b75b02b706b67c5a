#!/usr/bin/env bash
# Proves the `cuda` build on an NVIDIA machine in one short run: does it compute what the CPU
# computes, and how fast does it generate and train against PyTorch + peft on the same GPU?
#
#   scripts/gpu-proof.sh prepare    # here: target/gpu-proof/ = the stripped cuda + wgpu binary
#                                   # (xz, ~24 MB) and SmolLM2's configuration and tokenizer
#   scripts/gpu-proof.sh run [OUT]  # there, from the repository root, with target/gpu-proof/
#                                   # copied along; writes OUT/ (default gpu-proof-out)
#
# `run` needs the NVIDIA driver, NVRTC and the CUDA headers (CUDA_PATH, default
# /usr/local/cuda), and python3 with torch, transformers and peft for the anchor; nothing from
# the network. It makes its models on the spot, with random weights (`lathe bench
# synthetic-model`): SmolLM2-135M's shape, and a ~1.1B Llama that shows the scaling SmolLM2 is
# too small to show. Lathe and PyTorch load the same folders. Each step has a time limit
# (STEP_TIMEOUT, seconds) and a failed step does not stop the others; OUT/summary.md holds the
# table for BENCHMARKS.md. DEVICE (default cuda) and MODELS (default "smollm2 llama-1b")
# narrow a rehearsal, PEFT_DTYPES (default "f32 tf32 bf16") the anchor's runs, PYTHON picks
# the anchor's interpreter: `DEVICE=cpu MODELS=smollm2
# PYTHON=.venv-anchors/bin/python scripts/gpu-proof.sh run` runs it here. VULKAN=1 (the
# default off the CPU; here it runs on Mesa's lavapipe) also runs the wgpu path through the NVIDIA Vulkan driver on SmolLM2's shape:
# parity, generation and a training step (`vk-*` in OUT); it needs the Vulkan loader
# (libvulkan1), which the GPU machine may lack: unpack its .deb there first.
set -euo pipefail
cd "$(dirname "$0")/.."
P=target/gpu-proof

case "${1:-}" in
prepare)
    cargo build --profile dist -p lathe --features cuda,wgpu
    rm -rf "$P" && mkdir -p "$P"
    xz -6 -T2 -c "${CARGO_TARGET_DIR:-target}/dist/lathe" >"$P/lathe.xz"
    "${CARGO_TARGET_DIR:-target}/dist/lathe" bench synthetic-model --like models/SmolLM2-135M-Instruct.Q4_1.gguf --no-weights \
        --out "$P/smollm2-shape"
    du -sh "$P"
    ;;
run)
    OUT="${2:-gpu-proof-out}"
    mkdir -p "$OUT"
    OUT="$(cd "$OUT" && pwd)"
    # Unpacked beside the results, so target/gpu-proof/ stays small enough to carry.
    L="$OUT/lathe"
    # Python's lzma, since the GPU machine may lack the xz tool.
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$P/lathe.xz" "$L"
    chmod +x "$L"
    DEVICE="${DEVICE:-cuda}"
    export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
    # step NAME COMMAND...: stdout to OUT/NAME.json, stderr to OUT/NAME.err.
    step() {
        local name=$1
        shift
        echo "== $name" >&2
        local t0=$SECONDS
        if timeout "${STEP_TIMEOUT:-150}" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"; then
            echo "   ok ($((SECONDS - t0)) s)" >&2
        else
            echo "   FAILED (exit $?, $((SECONDS - t0)) s): $(tail -n 3 "$OUT/$name.err")" >&2
        fi
    }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>/dev/null || echo "no nvidia-smi" >"$OUT/gpu.txt"
    nproc >"$OUT/cpus.txt"
    # name: synthetic-model shape flags | training batch × seq | generate batches
    declare -A SHAPE=([smollm2]="" [llama-1b]="--hidden 2048 --heads 32 --kv-heads 8 --layers 16 --intermediate 8192")
    declare -A TRAIN=([smollm2]="4 128" [llama-1b]="8 1024")
    declare -A GEN=([smollm2]="1,8,32" [llama-1b]="1,8")
    for name in ${MODELS:-smollm2 llama-1b}; do
        # shellcheck disable=SC2086 # the flags are words on purpose
        step "model-$name" "$L" bench synthetic-model --like "$P/smollm2-shape" ${SHAPE[$name]} \
            --out "$OUT/$name"
        # 1. The device computes what the CPU computes.
        step "parity-$name" "$L" bench parity --model "$OUT/$name" --device "$DEVICE" \
            --prompt-tokens 32 --new-tokens 16 --json
        # 2. Training: Lathe (f32 tensors, which CUDA multiplies in TF32; and a bf16 base with
        #    f32 LoRA weights) against PyTorch + peft in f32, in f32 with TF32 matmuls, and in
        #    bf16 with f32 LoRA weights.
        read -r batch seq <<<"${TRAIN[$name]}"
        step "train-$name-lathe" "$L" bench train --model "$OUT/$name" --device "$DEVICE" \
            --batch "$batch" --seq "$seq" --steps 3 --json
        step "train-$name-lathe-bf16" "$L" bench train --model "$OUT/$name" --device "$DEVICE" \
            --batch "$batch" --seq "$seq" --steps 3 --bf16 --json
        # The same two with each layer recomputed in the backward pass (the whole graph of the
        # 1.1B at 8 x 1024 did not fit an 80 GB H100).
        step "train-$name-lathe-gc" "$L" bench train --model "$OUT/$name" --device "$DEVICE" \
            --batch "$batch" --seq "$seq" --steps 3 --gradient-checkpointing --json
        step "train-$name-lathe-bf16-gc" "$L" bench train --model "$OUT/$name" --device "$DEVICE" \
            --batch "$batch" --seq "$seq" --steps 3 --bf16 --gradient-checkpointing --json
        for dtype in ${PEFT_DTYPES-f32 tf32 bf16}; do
            step "train-$name-peft-$dtype" "${PYTHON:-python3}" scripts/bench_peft.py --model "$OUT/$name" \
                --device "$DEVICE" --dtype "$dtype" --batch "$batch" --seq "$seq" --steps 3
        done
        # 3. Generation: prompt processing and decode tokens/s.
        step "generate-$name" "$L" bench generate --model "$OUT/$name" --device "$DEVICE" \
            --batch "${GEN[$name]}" --repeat 2 --json
        # 4. Where a training step's GPU time goes: a warm-up and two steps with cubecl's
        #    per-kernel profile on (it times each kernel alone), the last step summed by kernel.
        if [ "$DEVICE" != cpu ] && [ "${PROFILE:-1}" = 1 ]; then
            prof="$OUT/profile-$name"
            mkdir -p "$prof"
            printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\n' "$prof/kernels.log" >"$prof/cubecl.toml"
            # The whole graph's step, or the checkpointed one where the whole graph did not fit.
            run=train-$name-lathe gc=
            [ -s "$OUT/$run.json" ] || { run=train-$name-lathe-gc gc=--gradient-checkpointing; }
            step "profile-$name" env -C "$prof" "$L" bench train --model "$OUT/$name" --device "$DEVICE" \
                --batch "$batch" --seq "$seq" --steps 2 ${gc:+"$gc"} --json
            wall=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["step_s"])' \
                "$OUT/$run.json" 2>/dev/null || true)
            python3 scripts/kernel_profile.py "$prof/kernels.log" --last-step ${wall:+--wall "$wall"} \
                >"$OUT/kernels-$name.md" 2>&1 || true
        fi
    done
    # The wgpu path on the same GPU, through Vulkan: the CPU's logits and greedy tokens, then
    # generation and a training step.
    if [ "${VULKAN:-$([ "$DEVICE" = cpu ] && echo 0 || echo 1)}" = 1 ]; then
        # SmolLM2's shape as the CUDA steps made it, or made here when MODELS left it out.
        vk="$OUT/smollm2"
        if [ ! -d "$vk" ]; then
            vk="$OUT/smollm2-vk"
            step model-vk "$L" bench synthetic-model --like "$P/smollm2-shape" --out "$vk"
        fi
        step vk-parity "$L" bench parity --model "$vk" --device vulkan --prompt-tokens 32 --new-tokens 16 --json
        step vk-generate "$L" bench generate --model "$vk" --device vulkan --batch 1,8 --repeat 2 --json
        step vk-train "$L" bench train --model "$vk" --device vulkan --batch 4 --seq 128 --steps 3 --json
    fi
    python3 scripts/gpu_proof_summary.py "$OUT" | tee "$OUT/summary.md"
    ;;
*)
    echo "usage: $0 prepare | run [OUT]" >&2
    exit 2
    ;;
esac
