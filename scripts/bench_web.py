"""Page weight and time to first render of the web UI's jobs page, in headless Chromium.

Starts `lathe serve` without workers on a fresh data folder, queues JOBS jobs in one
project through the REST API (they stay queued: nothing runs them), signs in, and loads the
jobs page REPEAT times: the first load with an empty cache, the others warm. Reports the
HTML's size, the bytes transferred (the page and its scripts and styles), the server's time
to the HTML's last byte, first contentful paint and the load event.

    .venv/bin/python scripts/bench_web.py target/release/lathe [--jobs 1000] [--repeat 5]
"""

import argparse
import json
import statistics
import subprocess
import tempfile
import time
import urllib.request

from playwright.sync_api import sync_playwright

ap = argparse.ArgumentParser()
ap.add_argument("lathe")
ap.add_argument("--jobs", type=int, default=1000)
ap.add_argument("--repeat", type=int, default=5)
ap.add_argument("--chromium", default="/usr/bin/chromium")
a = ap.parse_args()

data = tempfile.mkdtemp(prefix="lathe-bench-web-")
server = subprocess.Popen([a.lathe, "serve", "--addr", "127.0.0.1:0", "--workers", "0", "--data-dir", data],
                          stdout=subprocess.PIPE, text=True)
url = token = None
for line in server.stdout:
    if line.strip().startswith("lathe_"):
        token = line.strip()
    if line.startswith("lathe serve: listening on "):
        url = line.split()[-1]
        break


def call(method, path, body=None):
    req = urllib.request.Request(f"{url}/api/v1{path}", method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))


try:
    project = call("POST", "/projects", {"name": "bench"})["id"]
    t = time.perf_counter()
    for i in range(a.jobs):
        call("POST", f"/projects/{project}/jobs", {"kind": "data_split", "version": f"v{i}", "heldout": 0.15})
    queued_s = time.perf_counter() - t

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(f"{url}/login")
        page.fill("input[name=token]", token)
        with page.expect_navigation():
            page.click("button:has-text('Sign in')")
        rows = []
        floor = []
        # An empty cache for the first load: the vendored scripts come over the wire.
        ctx.new_cdp_session(page).send("Network.clearBrowserCache")
        page.close()
        for i in range(a.repeat):
            # A fresh tab each time (same cache), so that every load has its own paint timings.
            page = ctx.new_page()
            page.goto(f"{url}/projects/{project}/jobs", wait_until="load")
            page.wait_for_function("performance.getEntriesByName('first-contentful-paint').length > 0")
            m = page.evaluate("""() => {
                const nav = performance.getEntriesByType('navigation')[0];
                const res = performance.getEntriesByType('resource');
                const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                return {
                    html_bytes: nav.decodedBodySize,
                    transferred: nav.transferSize + res.reduce((s, r) => s + r.transferSize, 0),
                    server_ms: nav.responseEnd - nav.requestStart,
                    fcp_ms: fcp ? fcp.startTime : null,
                    load_ms: nav.loadEventEnd,
                    rows: document.querySelectorAll('#jobs-table tbody tr').length,
                };
            }""")
            rows.append(m)
            page.close()
        # The floor: the sign-in page, the smallest page with the same scripts and styles,
        # loaded the same way.
        for i in range(a.repeat):
            page = ctx.new_page()
            page.goto(f"{url}/login", wait_until="load")
            page.wait_for_function("performance.getEntriesByName('first-contentful-paint').length > 0")
            floor.append(page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime"))
            page.close()
        browser.close()
finally:
    server.terminate()
    server.wait()

print(f"{a.jobs} queued jobs ({a.jobs / queued_s:.0f} submissions/s through the API); the page lists {rows[0]['rows']} per page")
print("| load | HTML KiB | transferred KiB | server ms | first contentful paint ms | load event ms |")
print("|---|---|---|---|---|---|")
for i, m in enumerate(rows):
    print(f"| {'cold' if i == 0 else 'warm'} | {m['html_bytes'] / 1024:.1f} | {m['transferred'] / 1024:.1f} | {m['server_ms']:.1f} | {m['fcp_ms']:.1f} | {m['load_ms']:.1f} |")
warm = rows[1:] or rows
fcp = statistics.median(m['fcp_ms'] for m in warm)
print(f"floor: the sign-in page's first contentful paint, median of {len(floor)}: {statistics.median(floor):.1f} ms; the jobs page takes {fcp / statistics.median(floor):.2f}x that")
print(f"warm median: FCP {statistics.median(m['fcp_ms'] for m in warm):.1f} ms, load {statistics.median(m['load_ms'] for m in warm):.1f} ms, server {statistics.median(m['server_ms'] for m in warm):.1f} ms")
