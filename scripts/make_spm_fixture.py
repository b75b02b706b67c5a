#!/usr/bin/env python3
"""Trains a small SentencePiece BPE model the way Llama 2's and Mistral's were configured
(identity normalization, a dummy prefix, whitespace kept, digits split, byte fallback) on a
corpus this script writes, and prints JSON: every piece with its score and type (as GGUF's
`tokenizer.ggml.*` arrays hold them) and the package's own token ids for test texts. The
engine's tokenizer test builds a GGUF from the pieces and must produce the same ids.

    .venv/bin/python scripts/make_spm_fixture.py OUT_DIR > fixture.json
"""
import json
import os
import random
import sys

import sentencepiece as spm

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = random.Random(7)
words = ("invoice total amount due vendor customer the of and to in payment date number tax "
         "order shipping address street city country quantity price unit description").split()
unicode_words = ["café", "naïve", "Zürich", "straße", "Ångström", "año", "façade", "日本語", "東京",
                 "Привет", "мир", "Ελλάδα", "שלום", "مرحبا", "😀", "🚀", "→", "€", "½"]
code = ["def f(x):\n    return x + 1\n", "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
        "if x == None:\n        pass\n", '{"total": 12.50, "vendor": "ACME"}', "SELECT * FROM t WHERE id = 42;"]
lines = []
for _ in range(3000):
    kind = rng.random()
    if kind < 0.6:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))))
    elif kind < 0.8:
        lines.append(" ".join(rng.choice(words + unicode_words) for _ in range(rng.randint(2, 8))))
    else:
        lines.append(rng.choice(code).replace("\n", " "))
    if rng.random() < 0.2:
        lines[-1] += f" {rng.randint(0, 99999)}.{rng.randint(0, 99)}"
corpus = os.path.join(out, "corpus.txt")
with open(corpus, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
spm.SentencePieceTrainer.train(
    input=corpus, model_prefix=os.path.join(out, "spm"), model_type="bpe", vocab_size=700,
    character_coverage=0.995, normalization_rule_name="identity", add_dummy_prefix=True,
    remove_extra_whitespaces=False, split_digits=True, byte_fallback=True,
    allow_whitespace_only_pieces=True, user_defined_symbols=[], minloglevel=2,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)
sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))


def piece_type(i):
    # GGUF's token types: 1 normal, 2 unknown, 3 control, 6 byte.
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    return 1


texts = [
    "Invoice 2231 from Acme Tools GmbH, total 1,284.50 EUR.",
    "café naïve Zürich straße — Ångström, 日本語 and 東京, Привет мир, 😀🚀 ½ → €",
    "def f(x):\n    return x + 1\n\n\tindented\twith tabs",
    "  leading spaces,   runs   of   spaces, and trailing   ",
    "\n\n\nnewlines\r\nand\u00a0no-break\u2003em space",
    "SELECT * FROM t WHERE id = 42; -- 🙂 unseen emoji and ǅ",
    "",
    " ",
    "x",
]
print(json.dumps({
    "pieces": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
    "scores": [sp.get_score(i) for i in range(sp.get_piece_size())],
    "types": [piece_type(i) for i in range(sp.get_piece_size())],
    "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(),
    "cases": [{"text": t, "ids": sp.encode(t)} for t in texts],
}, ensure_ascii=False))
