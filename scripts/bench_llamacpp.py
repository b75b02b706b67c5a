#!/usr/bin/env python3
"""The llama.cpp anchor for `lathe bench generate`, on the same GGUF and machine.

Needs `pip install llama-cpp-python` (it compiles llama.cpp from source; see BENCHMARKS.md
for the flags used). Checks llama.cpp's last-position logits against the transformers
fixture first (on SmolLM2, whichever --model is measured), so a miscompiled kernel cannot
pass for a fast one, then measures
prompt processing (pp) and decode (tg), best of --repeat runs, and prints one JSON line per
batch size like `lathe bench generate --json`.

Batch 1 is one sequence through the package's `Llama`. A batch of b is b sequences in one
context (`n_seq_max` = b, a KV stream each), driven through llama.cpp's C API as its own
`llama-batched-bench` does: one `llama_decode` prefills all b prompts (logits at each last
position), then each decode step is one `llama_decode` of b tokens, one per sequence, each
sequence taking its own greedy token, as `lathe bench generate --batch b` does.
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
ap.add_argument("--batch", default="1", help="batch sizes, comma-separated")
ap.add_argument("--fixture", default="tests/fixtures/smollm2")
a = ap.parse_args()
batches = [int(b) for b in a.batch.split(",")]
if any(b < 1 for b in batches):
    sys.exit(f"--batch {a.batch}: batch sizes are whole numbers from 1")

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

def single():
    """Batch 1: (prompt tokens/s, decode tokens/s) of one run."""
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    pp = len(prompt) / (time.perf_counter() - t)
    tok = int(np.argmax(last_logits(llm)))
    t = time.perf_counter()
    for i in range(a.decode_tokens):
        llm.eval([tok])
        tok = int(np.argmax(last_logits(llm)))
    return pp, a.decode_tokens / (time.perf_counter() - t)


class Batched:
    """b sequences in one context of their own, each with its own KV stream."""

    def __init__(self, b):
        p = llama_cpp.llama_context_default_params()
        p.n_seq_max = b
        p.n_ctx = b * (a.prompt_tokens + a.decode_tokens)
        p.n_batch = b * a.prompt_tokens
        p.n_threads = p.n_threads_batch = a.threads
        # As the batch 1 run (`Llama`'s default), and llama.cpp's advice for sequences
        # that share no cache: a stream each.
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.kv_unified = False
        self.b = b
        self.ctx = llama_cpp.llama_init_from_model(llm.model, p)
        if not self.ctx:
            sys.exit(f"llama.cpp could not make a context for {b} sequences")
        self.batch = llama_cpp.llama_batch_init(b * a.prompt_tokens, 0, 1)

    def decode(self, rows):
        """Evaluates `rows` (per sequence: its tokens from position `start`), logits at
        each sequence's last token; returns each sequence's greedy next token."""
        n = 0
        for s, (tokens, start) in enumerate(rows):
            for i, tok in enumerate(tokens):
                self.batch.token[n] = tok
                self.batch.pos[n] = start + i
                self.batch.n_seq_id[n] = 1
                self.batch.seq_id[n][0] = s
                self.batch.logits[n] = i == len(tokens) - 1
                n += 1
        self.batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            sys.exit(f"llama_decode failed ({rc}) on a batch of {n} tokens over {self.b} sequences")
        out, at = [], -1
        for tokens, _ in rows:
            at += len(tokens)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, at), shape=(llm.n_vocab(),))
            out.append(int(np.argmax(logits)))
        return out

    def run(self):
        """(prompt tokens/s, decode tokens/s) of one run over all b sequences."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        t = time.perf_counter()
        toks = self.decode([(prompt, 0)] * self.b)
        pp = self.b * len(prompt) / (time.perf_counter() - t)
        seqs = [[tok] for tok in toks]
        t = time.perf_counter()
        for i in range(a.decode_tokens):
            toks = self.decode([([tok], len(prompt) + i) for tok in toks])
            for s, tok in zip(seqs, toks):
                s.append(tok)
        tg = self.b * a.decode_tokens / (time.perf_counter() - t)
        # The same prompt in every sequence: the same greedy tokens, unless the sequences'
        # positions or caches got mixed up.
        if any(s != seqs[0] for s in seqs):
            sys.exit(f"the {self.b} sequences decoded different tokens from the same prompt: {seqs}")
        return pp, tg

    def close(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


for b in batches:
    batched = Batched(b) if b > 1 else None
    best_pp = best_tg = 0.0
    for _ in range(a.repeat):
        pp, tg = batched.run() if batched else single()
        best_pp, best_tg = max(best_pp, pp), max(best_tg, tg)
    if batched:
        batched.close()
    print(json.dumps({"engine": "llama.cpp", "batch": b, "threads": a.threads,
                      "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
                      "pp_tokens_per_s": best_pp, "tg_tokens_per_s": best_tg}))
