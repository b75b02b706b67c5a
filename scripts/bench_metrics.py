#!/usr/bin/env python3
"""The plain-Python reference for `lathe bench plugins`: the same metrics written the
straightforward way, timed on the same pairs (a JSON file of {"metric": [[pred, ref], ...]})
that the Rust benchmark wrote. Prints one JSON object: pairs/s per metric."""
import json, re, string, sys, time
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCT = set(string.punctuation)


def exact_match(p, r):
    return 1.0 if p.strip() == r.strip() else 0.0


def normalize(s):
    s = "".join(ch for ch in s.lower() if ch not in PUNCT)
    return ARTICLES.sub(" ", s).split()


def token_f1(p, r):
    pt, rt = normalize(p), normalize(r)
    if not pt or not rt:
        return float(pt == rt)
    common = sum((Counter(pt) & Counter(rt)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(pt), common / len(rt)
    return 2 * prec * rec / (prec + rec)


def leaves(v, path=""):
    if isinstance(v, dict) and v:
        for k, c in v.items():
            yield from leaves(c, f"{path}/{k}")
    else:
        yield path, v


def lookup(v, path):
    for part in path.split("/")[1:]:
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def json_field_match(p, r):
    ref = json.loads(r)
    try:
        pred = json.loads(p)
    except ValueError:
        pred = None
    fields = list(leaves(ref))
    hits = sum(1 for path, want in fields if pred is not None and lookup(pred, path) == want)
    return hits / len(fields) if fields else 1.0


def main():
    data = json.load(open(sys.argv[1]))
    out = {}
    for name, fn in [("exact-match", exact_match), ("token-f1", token_f1), ("json-field-match", json_field_match)]:
        pairs = data[name]
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            total = 0.0
            for p, r in pairs:
                total += fn(p, r)
            best = max(best, len(pairs) / (time.perf_counter() - t))
        out[name] = best
    print(json.dumps(out))


main()
