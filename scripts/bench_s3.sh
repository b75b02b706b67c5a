#!/usr/bin/env bash
# Artifact throughput to an S3-compatible server on loopback: Lathe's store (`lathe bench
# artifacts`) and boto3 doing the same (scripts/bench_boto3.py), taking turns against one
# moto server (from the venv scripts/setup.sh makes), so the ratio holds while the machine
# drifts. One JSON line per run.
#
#   scripts/bench_s3.sh [SIZE_MIB] [COUNT] [ROUNDS]     # default 64 4 3
#
# LATHE names the binary (default: the release build). moto keeps objects in memory, so a
# round holds 2 × COUNT × SIZE_MIB of it.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-64} COUNT=${2:-4} ROUNDS=${3:-3}
LATHE=${LATHE:-${CARGO_TARGET_DIR:-target}/release/lathe}
PY=.venv/bin/python
[ -x .venv/bin/moto_server ] || { echo "moto_server is missing: run scripts/setup.sh" >&2; exit 1; }
port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/moto_server -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/bench-s3-moto.log" 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null' EXIT
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
    AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
for _ in $(seq 100); do
    curl -s -o /dev/null "$AWS_ENDPOINT_URL" && break
    sleep 0.1
done
curl -sf -X PUT "$AWS_ENDPOINT_URL/bench" >/dev/null
for round in $(seq "$ROUNDS"); do
    "$LATHE" bench artifacts --artifacts "s3://bench/lathe-$round" --size-mib "$SIZE" --count "$COUNT" --json
    $PY scripts/bench_boto3.py --bucket bench --prefix "boto3-$round" --size-mib "$SIZE" --count "$COUNT"
done
