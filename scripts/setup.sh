#!/usr/bin/env bash
# Installs everything Lathe needs on a fresh Debian machine with Rust (rustup) and Python:
# the wasm32-wasip2 target for plugins, cargo-nextest, Mesa's CPU Vulkan driver (the GPU
# code path's tests run on it), PostgreSQL (the store's tests start a throwaway cluster), the
# SmolLM2 model fixture, Chromium (the web UI's browser tests), and a venv with the
# `openai` package, Playwright for Python (it drives Debian's Chromium; no browser is ever
# downloaded) and moto's S3 server (the object-store tests). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null; then
    rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
# iproute2: `ip netns` makes the hosts of the several-workers test.
packages=(mesa-vulkan-drivers libvulkan1 postgresql chromium iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
scripts/fetch-model.sh
# The official `openai` Python package, for the test that drives the fine-tuning API with
# it, and Playwright for the browser tests (never `playwright install`: the tests point it
# at /usr/bin/chromium), sentencepiece, which trains the SentencePiece model the
# tokenizer tests compare against, componentize-py, which builds Python plugins, and
# moto's S3 server, the object store the artifact-store tests run against on loopback.
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import openai, playwright, sentencepiece" >/dev/null 2>&1 || [ ! -x .venv/bin/componentize-py ] || [ ! -x .venv/bin/moto_server ]; then
    .venv/bin/pip install -q "openai>=1.50,<3" "playwright>=1.45,<2" "sentencepiece==0.2.3" "componentize-py==0.25.1" "moto[server]>=5.2,<6"
fi
