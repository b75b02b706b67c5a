#!/usr/bin/env bash
# The README's first command: set up, build, and run `lathe demo` on SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC2046 # the features are words on purpose
cargo run --release -p lathe $(scripts/cpu-features.sh) -- demo "$@"
