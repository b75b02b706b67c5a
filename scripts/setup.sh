#!/usr/bin/env bash
# Installs everything Lathe needs on a fresh Debian machine with Rust (rustup) and Python:
# the wasm32-wasip2 target for plugins, and the SmolLM2 model fixture. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null; then
    rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
scripts/fetch-model.sh
