#!/usr/bin/env python3
"""Reads the folder `scripts/gpu-proof.sh run` wrote and prints the Markdown for BENCHMARKS.md:
parity, training tokens/s against PyTorch + peft with each run's model-FLOPs utilisation, and
generation tokens/s.

    python3 scripts/gpu_proof_summary.py gpu-proof-out

MFU counts the FLOPs a LoRA step must do: the frozen projections forward (2 per weight and
token) and backward to their inputs (2 more, no weight gradients), attention at full length
(forward 4·layers·seq·heads·head_dim per token, backward twice that), and 6 per trainable
LoRA weight. The peaks are NVIDIA's dense figures for the H100/H200 (SXM): 989 TFLOPS bf16
and 495 TFLOPS TF32 on tensor cores, 67 TFLOPS f32 on CUDA cores. Lathe's run is read
against the peak of the precision its device multiplies in (`matmul` in its JSON: TF32 on
CUDA), so its MFU and PyTorch's TF32 run's are comparable.
"""

import json
import pathlib
import sys

PEAK = {"bf16": 989.4e12, "tf32": 494.7e12, "f32": 66.9e12}


def read(out, name):
    p = out / f"{name}.json"
    if not p.exists() or not p.read_text().strip():
        return None
    lines = [json.loads(line) for line in p.read_text().splitlines() if line.startswith("{")]
    return lines if len(lines) > 1 else (lines[0] if lines else None)


def get(run, key):
    return (run or {}).get(key)


def cell(x, spec=".0f"):
    return "—" if x is None else format(x, spec)


def over(a, b):
    return None if a is None or b is None else a / b


def flops_per_token(cfg, seq, trainable):
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    ff, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    weights = layers * (2 * h * heads * hd + 2 * h * kv * hd + 3 * h * ff) + vocab * h
    attention = 4 * layers * seq * heads * hd
    return 4 * weights + 3 * attention + 6 * trainable


def main():
    out = pathlib.Path(sys.argv[1])
    # The models this run made (MODELS may have narrowed it).
    names = [n for n in ["smollm2", "llama-1b"] if (out / f"model-{n}.json").exists()]
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "unknown GPU"
    hopper = "H100" in gpu or "H200" in gpu
    print(f"GPU: {gpu}\n")

    print("| model | parity: greedy tokens | max abs logit diff / largest logit | argmax agreement |")
    print("|---|---|---|---|")
    for name in names:
        p = read(out, f"parity-{name}")
        if p is None:
            print(f"| {name} | failed, see parity-{name}.err | | |")
            continue
        same = "equal" if p["greedy_cpu"] == p["greedy_device"] else "DIFFER"
        print(f"| {name} | {same} ({len(p['greedy_cpu'])}) | {p['max_abs_logit_diff']:.2e} / {p['max_abs_logit']:.2f} "
              f"| {100 * p['argmax_agreement']:.1f} % |")

    print("\n| model | batch × seq | Lathe tok/s (matmul) | Lathe bf16 | peft f32 | peft tf32 | peft bf16 "
          "| Lathe / peft tf32 | Lathe bf16 / peft bf16 | MFU Lathe | MFU Lathe bf16 | MFU peft tf32 | MFU peft bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        cfg_path = out / name / "config.json"
        if not cfg_path.exists():
            continue
        cfg = json.loads(cfg_path.read_text())
        lathe = read(out, f"train-{name}-lathe")
        lathe_bf16 = read(out, f"train-{name}-lathe-bf16")
        peft = {d: read(out, f"train-{name}-peft-{d}") for d in ["f32", "tf32", "bf16"]}
        any_run = lathe or lathe_bf16 or next((r for r in peft.values() if r), None)
        if not any_run:
            print(f"| {name} | failed |" + " |" * 11)
            continue

        def tps(r):
            return get(r, "tokens_per_s")

        def mfu(r, dtype):
            if not r or not hopper:
                return None
            return tps(r) * flops_per_token(cfg, r["seq"], r["trainable_params"]) / PEAK[dtype]

        matmul = (lathe or {}).get("matmul", "f32")
        batch, seq = any_run["batch"], any_run["seq"]
        print(f"| {name} | {batch} × {seq} | {cell(tps(lathe))} ({matmul}) | {cell(tps(lathe_bf16))} "
              f"| {cell(tps(peft['f32']))} | {cell(tps(peft['tf32']))} | {cell(tps(peft['bf16']))} "
              f"| {cell(over(tps(lathe), tps(peft['tf32'])), '.2f')} "
              f"| {cell(over(tps(lathe_bf16), tps(peft['bf16'])), '.2f')} "
              f"| {cell(mfu(lathe, matmul), '.1%')} | {cell(mfu(lathe_bf16, 'bf16'), '.1%')} "
              f"| {cell(mfu(peft['tf32'], 'tf32'), '.1%')} | {cell(mfu(peft['bf16'], 'bf16'), '.1%')} |")

    print("\n| model | GPU memory, MiB: Lathe (tf32) | Lathe bf16 | peft tf32 | peft bf16 | Lathe / peft tf32 | Lathe bf16 / peft bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        lathe, lathe_bf16 = read(out, f"train-{name}-lathe"), read(out, f"train-{name}-lathe-bf16")
        tf32, bf16 = read(out, f"train-{name}-peft-tf32"), read(out, f"train-{name}-peft-bf16")

        cells = [get(lathe, "gpu_reserved_mib"), get(lathe_bf16, "gpu_reserved_mib"), get(tf32, "peak_mib"), get(bf16, "peak_mib")]
        ratios = [over(cells[0], cells[2]), over(cells[1], cells[3])]
        print(f"| {name} | " + " | ".join(cell(c) for c in cells) + " | " + " | ".join(cell(r, ".2f") for r in ratios) + " |")
    print("\n(Lathe: what cubecl's pools reserved after the timed steps; PyTorch: `max_memory_reserved`.)")

    print("\n| model | gradient checkpointing: Lathe tok/s | Lathe bf16 | Lathe / peft tf32 | Lathe bf16 / peft bf16 "
          "| GPU MiB Lathe | GPU MiB Lathe bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        gc, gc_bf16 = read(out, f"train-{name}-lathe-gc"), read(out, f"train-{name}-lathe-bf16-gc")
        tf32, bf16 = read(out, f"train-{name}-peft-tf32"), read(out, f"train-{name}-peft-bf16")
        print(f"| {name} | {cell(get(gc, 'tokens_per_s'))} | {cell(get(gc_bf16, 'tokens_per_s'))} "
              f"| {cell(over(get(gc, 'tokens_per_s'), get(tf32, 'tokens_per_s')), '.2f')} "
              f"| {cell(over(get(gc_bf16, 'tokens_per_s'), get(bf16, 'tokens_per_s')), '.2f')} "
              f"| {cell(get(gc, 'gpu_reserved_mib'))} | {cell(get(gc_bf16, 'gpu_reserved_mib'))} |")

    print("\n| model | batch | prompt tok/s | decode tok/s |")
    print("|---|---|---|---|")
    for name in names:
        rows = read(out, f"generate-{name}")
        rows = [rows] if isinstance(rows, dict) else rows or []
        if not rows:
            print(f"| {name} | failed | | |")
        for r in rows:
            print(f"| {name} | {r['batch']} | {r['pp_tokens_per_s']:.0f} | {r['tg_tokens_per_s']:.0f} |")

    vk = read(out, "vk-parity")
    if vk or (out / "vk-parity.err").exists():
        print("\nVulkan (the wgpu build; on the GPU machine, through its NVIDIA driver), SmolLM2's shape:\n")
        if vk:
            same = "equal" if vk["greedy_cpu"] == vk["greedy_device"] else "DIFFER"
            print(f"- parity: greedy tokens {same}, max abs logit diff {vk['max_abs_logit_diff']:.2e} "
                  f"of {vk['max_abs_logit']:.2f}, argmax agreement {100 * vk['argmax_agreement']:.1f} %")
        else:
            print("- parity: failed, see vk-parity.err")
        rows = read(out, "vk-generate")
        for r in [rows] if isinstance(rows, dict) else rows or []:
            print(f"- generation, batch {r['batch']}: prompt {r['pp_tokens_per_s']:.0f} tok/s, decode {r['tg_tokens_per_s']:.0f} tok/s")
        t = read(out, "vk-train")
        print(f"- training, {t['batch']} × {t['seq']}: {t['tokens_per_s']:.0f} tok/s" if t else "- training: failed, see vk-train.err")

    for name in names:
        kernels = out / f"kernels-{name}.md"
        if kernels.exists():
            print(f"\nOne training step of {name}, kernel by kernel (`scripts/kernel_profile.py`):\n")
            print("\n".join(kernels.read_text().splitlines()[:20]))


if __name__ == "__main__":
    main()
