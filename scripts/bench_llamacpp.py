#!/usr/bin/env python3
"""The llama.cpp anchor for `lathe bench generate`, on the same GGUF and machine.

Needs `pip install llama-cpp-python` (it compiles llama.cpp from source; see BENCHMARKS.md
for the flags used). Checks llama.cpp's last-position logits against the transformers
fixture first (on SmolLM2, whichever --model is measured), so a miscompiled kernel cannot
pass for a fast one, then measures
prompt processing (pp) and decode (tg) at batch 1, best of --repeat runs, and prints one
JSON line per measurement like `lathe bench generate --json`.
"""
import argparse, json, os, sys, time

import llama_cpp
import numpy as np
from llama_cpp import Llama

SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=SMOLLM2)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prompt-tokens", type=int, default=128)
ap.add_argument("--decode-tokens", type=int, default=64)
ap.add_argument("--repeat", type=int, default=3)
ap.add_argument("--fixture", default="tests/fixtures/smollm2")
a = ap.parse_args()

def load(path):
    # Logits for the last position only, as Lathe computes them when it prefills:
    # `logits_all` would run the output head over every prompt position too (a fifth more
    # work on SmolLM2), which Lathe's prefill does not do.
    return Llama(model_path=path, n_ctx=max(512, a.prompt_tokens + a.decode_tokens), n_batch=512,
                 n_threads=a.threads, n_threads_batch=a.threads, logits_all=False, verbose=False)

def last_logits(llm):
    """The logits of the last position evaluated."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32)

# The build is checked on SmolLM2, whose transformers logits are a fixture, whatever model
# is then measured.
llm = load(SMOLLM2)
ref = json.load(open(os.path.join(a.fixture, "reference.json")))
ids = ref["cases"]["plain"]["input_ids"]
llm.reset()
llm.eval(ids)
ours = last_logits(llm)
theirs = np.load(os.path.join(a.fixture, "plain_last_logits.npy"))
diff = float(np.abs(ours - theirs).max())
top_ok = int(ours.argmax()) == int(theirs.argmax())
print(json.dumps({"engine": "llama.cpp", "check": "plain logits vs transformers",
                  "max_abs_diff": diff, "argmax_equal": top_ok}))
if not top_ok:
    sys.exit("llama.cpp disagrees with transformers on the argmax: not a valid anchor")
if a.model != SMOLLM2:
    del llm
    llm = load(a.model)

text = "The quick brown fox jumps over the lazy dog while the sun sets behind the hills. "
prompt = []
while len(prompt) < a.prompt_tokens:
    prompt += llm.tokenize(text.encode(), add_bos=False)
prompt = prompt[:a.prompt_tokens]
best_pp = best_tg = 0.0
for _ in range(a.repeat):
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    best_pp = max(best_pp, len(prompt) / (time.perf_counter() - t))
    tok = int(np.argmax(last_logits(llm)))
    t = time.perf_counter()
    for i in range(a.decode_tokens):
        llm.eval([tok])
        tok = int(np.argmax(last_logits(llm)))
    best_tg = max(best_tg, a.decode_tokens / (time.perf_counter() - t))
print(json.dumps({"engine": "llama.cpp", "batch": 1, "threads": a.threads,
                  "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
                  "pp_tokens_per_s": best_pp, "tg_tokens_per_s": best_tg}))
