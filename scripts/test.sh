#!/usr/bin/env bash
# The README's second command: set up and run the whole test suite (release profile, the
# same build the demo uses, so one compile serves both).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo nextest run --release --workspace --no-fail-fast "$@"
