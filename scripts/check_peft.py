#!/usr/bin/env python3
"""Checks a Lathe LoRA adapter with Hugging Face peft (not run in CI: it needs torch).

Loads the base model from its GGUF with transformers, applies the adapter with
peft.PeftModel, and compares the logits with Lathe's own merged export (`lathe export
--format hf`), which transformers loads as a plain model. Agreement means peft reads
Lathe's key names, shapes, scaling and target modules exactly as Lathe meant them.

    pip install torch transformers peft gguf
    lathe train ... --out run
    lathe export --adapter run/best --format hf --out merged
    python3 scripts/check_peft.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --adapter run/best --merged merged
"""

import argparse
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True, help="the base model GGUF the adapter was trained on")
    ap.add_argument("--adapter", required=True, help="a PEFT folder written by Lathe")
    ap.add_argument("--merged", required=True, help="`lathe export --format hf` of the same adapter")
    ap.add_argument("--prompt", default="Invoice INV-2024-0457 from Acme Tools GmbH, total 1.284,50 EUR.")
    ap.add_argument("--tolerance", type=float, default=2e-3)
    a = ap.parse_args()

    folder, name = os.path.split(os.path.abspath(a.gguf))
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    peft_model = PeftModel.from_pretrained(base, a.adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(a.merged, torch_dtype=torch.float32).eval()

    ids = tok(a.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        lp = peft_model(ids).logits[0]
        lm = merged(ids).logits[0]
    diff = (lp - lm).abs().max().item()
    print(f"max |peft - lathe merged| = {diff:.2e} over {ids.shape[1]} positions")
    if diff > a.tolerance:
        print("FAIL: peft and Lathe disagree about the adapter")
        return 1
    print("OK: peft applies the adapter as Lathe does")
    return 0


if __name__ == "__main__":
    sys.exit(main())
