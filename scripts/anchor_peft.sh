#!/usr/bin/env bash
# The PyTorch + peft anchor: installs torch, transformers, peft and bitsandbytes (QLoRA's
# 4-bit layers, which run on the CPU since 0.50) from PyPI into .venv-anchors (about 5 GB:
# PyPI's torch carries its CUDA libraries), for scripts/bench_peft.py and `lathe bench
# train --vs-peft`. Once; later runs do nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-anchors
if ! "$VENV/bin/python" -c "import torch, transformers, peft, bitsandbytes" >/dev/null 2>&1; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.15.0 transformers==5.25.0 peft==0.21.2 bitsandbytes==0.50.2
fi
"$VENV/bin/python" -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
