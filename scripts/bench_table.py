#!/usr/bin/env python3
"""Issue 11's table in one run: Lathe's generation and training against llama.cpp and
PyTorch + peft on this machine, every ratio from a pair measured side by side.

    scripts/anchor_llamacpp.sh; scripts/anchor_peft.sh     # the anchors (once)
    scripts/anchor_llamacpp.sh avx512                      # optional: llama.cpp's AVX-512 build
    cargo build --release -p lathe $(scripts/cpu-features.sh)
    scripts/bench_table.py --out /tmp/table                # about 15 minutes on two cores

Each generation line runs `lathe bench generate --vs-llamacpp` once per llama.cpp build, so
each ratio pairs Lathe with that build in the same minute; each training line runs `lathe
bench train --vs-peft`. The K-quant models (a random 378M Llama written as Q4_K_M by `lathe
bench synthetic-model`, and as Q5_K_M by llama.cpp's quantizer from an f16 copy) are made
on the first run. Prints the table as Markdown and keeps
every JSON line the commands printed in `OUT/raw.jsonl`.
"""
import argparse, json, os, platform, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf"

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--lathe", default="target/release/lathe", help="the release binary to measure")
ap.add_argument("--out", default="target/bench-table", help="folder for raw.jsonl and the K-quant model")
ap.add_argument("--rounds", type=int, default=2, help="rounds of the generation lines")
ap.add_argument("--train-rounds", type=int, default=3, help="rounds of the 2-thread f32 training line")
ap.add_argument("--anchor", action="append", metavar="NAME=PYTHON",
                help="a llama.cpp build's Python (default: AVX2=.venv-anchors/bin/python, and "
                     "AVX-512=.venv-anchors-avx512/bin/python where it exists)")
ap.add_argument("--skip", default="", help="comma-separated parts to leave out: generate, kquant, train")
a = ap.parse_args()
os.chdir(ROOT)
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
raw = open(out / "raw.jsonl", "a")
skip = set(filter(None, a.skip.split(",")))

anchors = [tuple(x.split("=", 1)) for x in a.anchor or []]
if not anchors:
    anchors = [(name, py) for name, py in [("AVX2", ".venv-anchors/bin/python"), ("AVX-512", ".venv-anchors-avx512/bin/python")] if Path(py).exists()]
if not anchors and not skip >= {"generate", "kquant"}:
    sys.exit("no llama.cpp anchor: run scripts/anchor_llamacpp.sh (or pass --anchor NAME=PYTHON)")
if not Path(a.lathe).exists():
    sys.exit(f"{a.lathe} does not exist: cargo build --release -p lathe $(scripts/cpu-features.sh)")


def lathe(args, env=None):
    """The JSON lines of one `lathe` command; exits with its error if it fails."""
    cmd = [a.lathe, *args, "--json"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr.strip()}")
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    for l in lines:
        raw.write(json.dumps({"args": args, "env": env or {}, **l}) + "\n")
    raw.flush()
    return lines


def generate(model, threads, batches, anchor):
    """{batch: (ours pp, ours tg, anchor pp, anchor tg)} from one paired run."""
    lines = lathe(["bench", "generate", "--model", model, "--threads", str(threads), "--batch", ",".join(map(str, batches)),
                   "--repeat", "2", "--vs-llamacpp"], {"LATHE_ANCHOR_PYTHON": anchor})
    ours = {l["batch"]: l for l in lines if l.get("engine") == "lathe"}
    return {l["batch"]: (ours[l["batch"]]["pp_tokens_per_s"], ours[l["batch"]]["tg_tokens_per_s"],
                         l["anchor"]["pp_tokens_per_s"], l["anchor"]["tg_tokens_per_s"]) for l in lines if "anchor" in l}


rows = []  # (work, threads, {column: [values]}), in print order


def row(work, threads):
    for r in rows:
        if r[0] == work and r[1] == threads:
            return r[2]
    rows.append((work, threads, {}))
    return rows[-1][2]


def add(cells, key, value):
    cells.setdefault(key, []).append(value)


# Q5_K_M as llama.cpp's own quantizer writes it (Lathe writes no Q5_K), from an f16 copy.
QUANTIZE_Q5_K_M = """import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) != 0:
    sys.exit("llama.cpp could not quantize " + sys.argv[1])
"""


def synthetic(ty, path):
    """The random 378M Llama of the K-quant lines, written as `ty`."""
    subprocess.run([a.lathe, "bench", "synthetic-model", "--hidden", "1536", "--intermediate", "4096", "--layers", "12",
                    "--heads", "12", "--kv-heads", "4", "--gguf", ty, "--out", str(path)], check=True, stdout=sys.stderr)


kquant, kquant5 = out / "syn-q4km.gguf", out / "syn-q5km.gguf"
models = [("", SMOLLM2, [1, 8])]
if "kquant" not in skip:
    if not kquant.exists():
        synthetic("q4_k_m", kquant)
    if not kquant5.exists():
        f16 = out / "syn-f16.gguf"
        synthetic("f16", f16)
        subprocess.run([anchors[0][1], "-c", QUANTIZE_Q5_K_M, str(f16), str(kquant5)], check=True, stdout=sys.stderr)
        f16.unlink()
    models.append(("K-quant (Q4_K_M 378M) ", str(kquant), [1]))
    models.append(("K-quant (Q5_K_M 378M, llama.cpp's quantizer) ", str(kquant5), [1]))
if "generate" in skip:
    models = [m for m in models if m[1] != SMOLLM2]
for _ in range(a.rounds):
    for t in [2, 1]:
        for label, model, batches in models:
            for i, (name, py) in enumerate(anchors):
                for b, (pp, tg, app, atg) in generate(model, t, batches, py).items():
                    for what, ours, theirs in [("decode tok/s", tg, atg), ("prefill tok/s (128)", pp, app)]:
                        cells = row(f"{label}{what}, batch {b}", t)
                        if i == 0:
                            add(cells, "Lathe", ours)
                        add(cells, name, theirs)
                        add(cells, f"{name} ratio", ours / theirs)

if "train" not in skip:
    def train(work, threads, extra):
        (l,) = [l for l in lathe(["bench", "train", "--threads", str(threads), "--steps", "5", "--vs-peft", *extra])
                if "step_s" in l]
        cells = row(work, threads)
        add(cells, "Lathe", l["tokens_per_s"])
        add(cells, "Lathe MiB", l["peak_rss_training_mib"])
        add(cells, "peft", l["anchor"]["tokens_per_s"])
        add(cells, "peft MiB", l["anchor"]["peak_mib"])
        add(cells, "peft ratio", l["tokens_per_s_vs_anchor"])
        add(cells, "memory ratio", l["peak_memory_vs_anchor"])

    for _ in range(a.train_rounds):
        train("LoRA training tok/s (f32)", 2, [])
    train("LoRA training tok/s (f32)", 1, [])
    train("LoRA training tok/s, bf16 base (peft bf16)", 2, ["--bf16"])
    train("QLoRA training tok/s (peft + bitsandbytes NF4)", 2, ["--qlora"])
    train("QLoRA training tok/s, bf16 compute (peft the same)", 2, ["--qlora", "--bf16"])


def fmt(values, ratio=False):
    return ", ".join(f"{v:.2f}" if ratio else f"{v:.1f}" for v in values) if values else ""


cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"\n{cpu}, {os.cpu_count()} cores; Lathe {a.lathe} at {commit}; anchors: " + ", ".join(f"llama.cpp {n} ({p})" for n, p in anchors))
# Each line's threads together, more threads first.
works = list(dict.fromkeys(r[0] for r in rows))
rows.sort(key=lambda r: (works.index(r[0]), -r[1]))
gen = [r for r in rows if "training" not in r[0]]
if gen:
    names = [n for n, _ in anchors]
    print("\n| work | threads | Lathe | " + " | ".join(f"llama.cpp {n} | ratio" for n in names) + " |")
    print("|---|--:|--:|" + "--:|--:|" * len(names))
    for work, t, c in gen:
        print(f"| {work} | {t} | {fmt(c.get('Lathe'))} | " + " | ".join(f"{fmt(c.get(n))} | {fmt(c.get(n + ' ratio'), True)}" for n in names) + " |")
tr = [r for r in rows if "training" in r[0]]
if tr:
    print("\n| work | threads | Lathe | PyTorch + peft | ratio | peak MiB, Lathe | peak MiB, peft | memory ratio |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for work, t, c in tr:
        print(f"| {work} | {t} | {fmt(c.get('Lathe'))} | {fmt(c.get('peft'))} | {fmt(c.get('peft ratio'), True)} | "
              f"{fmt(c.get('Lathe MiB'))} | {fmt(c.get('peft MiB'))} | {fmt(c.get('memory ratio'), True)} |")
