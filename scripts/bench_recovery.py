#!/usr/bin/env python3
"""Recovery time after a worker dies mid-training: how long from SIGKILL until another worker
trains again, and where that time goes.

Starts `lathe serve` (no in-process worker) on a fresh data folder, a LoRA job on the real
SmolLM2 GGUF, and a `lathe worker`; at the first checkpoint it SIGKILLs the worker and starts
another at once. The job's events (their server timestamps) then give:

  kill → second attempt   the dead worker's lease runs out (--lease-secs), another worker
                          claims the job and (with --s3) restores the checkpoint from the
                          bucket; ends at the second attempt's first event
  → first step            loading the model and the first optimizer step after the checkpoint

With --s3, artifacts and checkpoints live in a moto server on loopback and the dead worker's
run folder is deleted, as if its disk died with it. The anchor is the same run uninterrupted:
the job's extra wall time is what the death cost in all.

    .venv/bin/python scripts/bench_recovery.py --lease-secs 5 --s3
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Api:
    def __init__(self, url, token):
        self.url, self.token = url, token

    def call(self, method, path, body=None, raw=None, content_type="application/json"):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("content-type", content_type)
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read() or b"null")

    def wait(self, project, job, within=600):
        start = time.time()
        while time.time() - start < within:
            row = self.call("GET", f"/api/v1/projects/{project}/jobs/{job}")
            if row["state"] in ("succeeded", "failed", "cancelled"):
                return row
            time.sleep(0.1)
        sys.exit(f"job {job} did not finish in {within} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lathe", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "lathe"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--lease-secs", type=int, default=5)
    ap.add_argument("--s3", action="store_true", help="artifacts and checkpoints in a moto bucket; the dead worker's run folder deleted")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=10)
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="lathe-recovery-")
    data = os.path.join(tmp, "data")
    env = dict(os.environ)
    children = []
    try:
        extra = []
        if a.s3:
            port = free_port()
            children.append(subprocess.Popen([os.path.join(ROOT, ".venv", "bin", "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
            for _ in range(300):
                try:
                    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/lathe", method="PUT"))
                    break
                except OSError:
                    time.sleep(0.1)
            extra = ["--artifacts", "s3://lathe/bench"]

        serve = subprocess.Popen([a.lathe, "serve", "--addr", "127.0.0.1:0", "--data-dir", data, "--workers", "0",
                                  "--model", f"smollm2={a.model}", *extra],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        children.append(serve)
        url = token = None
        while url is None:
            line = serve.stdout.readline()
            if not line:
                sys.exit("lathe serve exited")
            if line.startswith("lathe serve: listening on "):
                url = line.split("listening on ", 1)[1].strip()
            elif line.strip().startswith("lathe_"):
                token = line.strip()
        api = Api(url, token)
        project = api.call("POST", "/api/v1/projects", {"name": "recovery"})["id"]
        rows = "".join(json.dumps({"messages": [{"role": "user", "content": f"Invoice {i}: total {i * 7}.50 EUR"},
                                                {"role": "assistant", "content": f'{{"total": "{i * 7}.50"}}'}]}) + "\n" for i in range(40))
        body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="inv.jsonl"\r\n\r\n' + rows.encode() + b"\r\n--b--\r\n")
        file_id = api.call("POST", f"/api/v1/projects/{project}/files", raw=body, content_type="multipart/form-data; boundary=b")["id"]
        for job in ({"kind": "data_import", "file_id": file_id, "name": "inv"},
                    {"kind": "data_split", "version": "inv", "heldout": 0.2, "name": "inv"}):
            jid = api.call("POST", f"/api/v1/projects/{project}/jobs", job)["id"]
            worker_once = subprocess.Popen([a.lathe, "worker", "--data-dir", data, *extra], cwd=ROOT, env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            row = api.wait(project, jid)
            worker_once.kill()
            worker_once.wait()
            assert row["state"] == "succeeded", row
        suite = {"name": "inv", "templates": [{"name": "plain", "user": "{{ input }}"}], "scorers": [{"plugin": "exact-match"}],
                 "shots": [0], "max_tokens": 8}
        api.call("PUT", f"/api/v1/projects/{project}/suites/inv", suite)
        train = {"kind": "train", "model": "smollm2", "suite": "inv", "data": "inv.train",
                 "settings": {"rank": 8, "epochs": 1000, "max_steps": a.steps, "batch_size": 2, "save_every": a.save_every,
                              "metric_items": 0, "patience": 0, "eval_every": 1000}}

        def worker():
            return subprocess.Popen([a.lathe, "worker", "--data-dir", data, "--lease-secs", str(a.lease_secs), *extra],
                                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        # The anchor: the same run, uninterrupted.
        w = worker()
        clean = api.call("POST", f"/api/v1/projects/{project}/jobs", train)["id"]
        row = api.wait(project, clean)
        assert row["state"] == "succeeded", row
        w.kill()
        w.wait()
        clean_s = (row["finished_at"] - row["created_at"]) / 1000

        first = worker()
        killed = api.call("POST", f"/api/v1/projects/{project}/jobs", train)["id"]
        run_dir = os.path.join(data, "projects", project, "runs", killed)
        checkpoint = os.path.join(run_dir, "checkpoints", f"step-{a.save_every:08d}")
        while not os.path.exists(checkpoint):
            time.sleep(0.005)
        if a.s3:
            # The checkpoint is in the bucket once the job records it.
            while api.call("GET", f"/api/v1/projects/{project}/jobs/{killed}").get("checkpoint") is None:
                time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        killed_at = time.time()
        first.wait()
        if a.s3:
            shutil.rmtree(run_dir)
        second = worker()
        children.append(second)
        row = api.wait(project, killed)
        assert row["state"] == "succeeded" and row["attempts"] == 2, row
        events = api.call("GET", f"/api/v1/projects/{project}/jobs/{killed}/events?limit=10000")["data"]
        # The second attempt's first event (the restore's log with --s3): the dead worker can
        # write nothing after the kill. Server and script share this machine's clock.
        after = [e for e in events if e["created_at"] / 1000 >= killed_at]
        resumed = after[0]["created_at"] / 1000
        restored = any(str(e["data"].get("message", "")).startswith("restored the last checkpoint") for e in after)
        stepped = next(e["created_at"] / 1000 for e in after if e["data"].get("series") == "train/loss")
        total_s = (row["finished_at"] - row["created_at"]) / 1000
        print(json.dumps({
            "store": "s3 (moto)" if a.s3 else "data folder", "lease_secs": a.lease_secs, "restored_from_bucket": restored,
            "kill_to_second_attempt_s": round(resumed - killed_at, 2),
            "second_attempt_to_first_step_s": round(stepped - resumed, 2),
            "kill_to_first_step_s": round(stepped - killed_at, 2),
            "uninterrupted_run_s": clean_s, "killed_run_s": total_s, "cost_s": round(total_s - clean_s, 2),
        }))
    finally:
        for c in children:
            c.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
