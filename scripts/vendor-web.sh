#!/usr/bin/env bash
# Re-vendors the web UI's two libraries from the npm registry into web/static/vendor/ and
# checks them against the sha256 sums pinned below. The files are committed, so neither
# running Lathe nor its tests needs npm or a network; this script is for upgrades (change a
# version, run with UPDATE=1 to print the new sums, review, pin them).
set -euo pipefail
cd "$(dirname "$0")/.."

HTMX=2.0.11
UPLOT=1.6.32
out=web/static/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

(cd "$tmp" && npm pack --silent "htmx.org@$HTMX" "uplot@$UPLOT" >/dev/null)
mkdir -p "$tmp/htmx" "$tmp/uplot" "$out"
tar -xzf "$tmp/htmx.org-$HTMX.tgz" -C "$tmp/htmx"
tar -xzf "$tmp/uplot-$UPLOT.tgz" -C "$tmp/uplot"
cp "$tmp/htmx/package/dist/htmx.min.js" "$out/htmx.min.js"
cp "$tmp/uplot/package/dist/uPlot.iife.min.js" "$out/uPlot.iife.min.js"
cp "$tmp/uplot/package/dist/uPlot.min.css" "$out/uPlot.min.css"
cp "$tmp/htmx/package/LICENSE" "$out/htmx.LICENSE"
cp "$tmp/uplot/package/LICENSE" "$out/uPlot.LICENSE"

if [ "${UPDATE:-0}" = 1 ]; then
    (cd "$out" && sha256sum htmx.min.js uPlot.iife.min.js uPlot.min.css)
    exit 0
fi
(cd "$out" && sha256sum -c --quiet) <<SUMS
d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717  htmx.min.js
19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f  uPlot.iife.min.js
df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04  uPlot.min.css
SUMS
echo "vendored htmx $HTMX and uPlot $UPLOT into $out"
