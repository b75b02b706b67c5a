#!/usr/bin/env python3
"""Sums a cubecl profiling log by kernel: where a GPU step's time goes, without Nsight.

    python3 scripts/kernel_profile.py kernels.log [--top 25] [--wall SECONDS]

cubecl writes one line per kernel it ran, `| <duration> | <kernel name>`, when its profiling
logger is on (a `cubecl.toml` in the working directory or a parent with
`[profiling.logger] level = "basic"` and a `file`; `scripts/gpu-proof.sh` writes one). Each
kernel is timed on its own, so the sum is GPU time with the device kept busy one kernel at a
time: `--wall` (the step's wall time) shows how much of a step no kernel was running.
`--last-step` keeps only the log's last period: identical training steps launch the same
kernels in the same order, so after a warm-up and two timed steps (`--steps 2`) the longest
tail that repeats the stretch before it is one step, free of the warm-up's compilation and
autotuning.
Fused kernels carry long generated names; they are cut to 90 characters.
"""

import argparse
import collections
import re

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--wall", type=float, help="wall-clock seconds of what the log covers")
    ap.add_argument("--last-step", action="store_true", help="only the last repeating period")
    a = ap.parse_args()
    runs = []
    unmeasured = 0
    with open(a.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                runs.append((m.group(3)[:90], float(m.group(1)) * UNITS[m.group(2)]))
            else:
                unmeasured += "not measured" in line
    if a.last_step:
        names = [n for n, _ in runs]
        # The longest such tail: shorter ones also repeat inside a step (the optimizer's
        # update of one parameter after another's). With a warm-up and two timed steps, the
        # longest is one step.
        period = next((p for p in range(len(names) // 2, 0, -1) if names[-p:] == names[-2 * p:-p]), None)
        if period is None:
            raise SystemExit("no repeating step at the end of the log: run two or more steps")
        runs = runs[-period:]
        print(f"the last step: {period} kernels")
    total = collections.Counter()
    count = collections.Counter()
    for name, seconds in runs:
        total[name] += seconds
        count[name] += 1
    gpu = sum(total.values())
    launches = sum(count.values())
    print(f"{launches} kernels, {gpu:.3f} s of kernel time" + (f", {unmeasured} not measured" if unmeasured else ""))
    if a.wall:
        print(f"wall {a.wall:.3f} s: kernels busy {gpu / a.wall:.0%} of it")
    print(f"\n| share | seconds | launches | mean µs | kernel |\n|---|---|---|---|---|")
    for name, t in total.most_common(a.top):
        print(f"| {t / gpu:.1%} | {t:.4f} | {count[name]} | {1e6 * t / count[name]:.1f} | `{name}` |")


if __name__ == "__main__":
    main()
