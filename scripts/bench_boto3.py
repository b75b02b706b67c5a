#!/usr/bin/env python3
"""The anchor for `lathe bench artifacts`: boto3, the AWS SDK most tools use, uploading and
downloading the same number of same-sized random files to the same bucket.

boto3's transfer manager is set to Lathe's settings (multipart above 16 MiB, 8 MiB parts, 4
in flight) so the two differ in their code, not their configuration. Like Lathe, the
upload hashes each file with sha256 first (Lathe names artifacts by it) and the download
checks it. Endpoint and keys come from the `AWS_*` variables. Prints one JSON object.

    python3 scripts/bench_boto3.py --bucket lathe --prefix boto3 --size-mib 64 --count 4
"""

import argparse
import hashlib
import json
import os
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", default="boto3")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--count", type=int, default=4)
    a = ap.parse_args()

    import boto3
    from boto3.s3.transfer import TransferConfig

    mib = 1 << 20
    config = TransferConfig(multipart_threshold=16 * mib, multipart_chunksize=8 * mib, max_concurrency=4)
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))

    def sha256(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(mib), b""):
                h.update(block)
        return h.hexdigest()

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(a.count):
            path = os.path.join(tmp, f"blob-{i}")
            with open(path, "wb") as f:
                for _ in range(a.size_mib):
                    f.write(os.urandom(mib))
            files.append(path)

        start = time.perf_counter()
        keys = []
        for path in files:
            key = f"{a.prefix}/{sha256(path)}"
            s3.upload_file(path, a.bucket, key, Config=config)
            keys.append(key)
        upload = time.perf_counter() - start

        start = time.perf_counter()
        for i, key in enumerate(keys):
            path = os.path.join(tmp, f"back-{i}")
            s3.download_file(a.bucket, key, path, Config=config)
            assert key.endswith(sha256(path)), f"{key} came back changed"
        download = time.perf_counter() - start

    total = a.size_mib * a.count
    print(json.dumps({
        "engine": f"boto3 {boto3.__version__}", "store": f"s3://{a.bucket}/{a.prefix}",
        "size_mib": a.size_mib, "count": a.count,
        "upload_mib_per_s": total / upload, "download_mib_per_s": total / download,
    }))


if __name__ == "__main__":
    main()
