#!/usr/bin/env python3
"""Checks that llama.cpp loads Lathe's merged GGUF exports and answers like the adapter
(not run in CI: it needs llama-cpp-python, `pip install llama-cpp-python`).

    lathe export --adapter run/best --format gguf-q8_0 --out merged.gguf
    python3 scripts/check_llamacpp_export.py merged.gguf --chat "..." [--expect '{"...": ...}']
"""

import argparse
import sys

import llama_cpp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="+")
    ap.add_argument("--chat", required=True, help="a user message")
    ap.add_argument("--system", default=None)
    ap.add_argument("--expect", default=None, help="the answer the adapter gives (greedy)")
    a = ap.parse_args()
    ok = True
    for path in a.gguf:
        llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False)
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.chat}]
        out = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=128)
        text = out["choices"][0]["message"]["content"].strip()
        print(f"{path}: {text}")
        if a.expect is not None and text != a.expect:
            print(f"  MISMATCH: expected {a.expect}")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
