#!/usr/bin/env bash
# The README's second command: set up and run the whole test suite (release profile, the
# same build the demo uses, so one compile serves both). The host's build script also
# builds every plugin in plugins/ and host/sandbox/tests/hostile/ for wasm32-wasip2.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The plugins' shared logic is plain Rust with unit tests of its own.
cargo test --release --manifest-path plugins/Cargo.toml -p lathe-metrics
cargo nextest run --release --workspace --no-fail-fast "$@"
