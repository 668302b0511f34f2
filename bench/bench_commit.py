"""What exactly-once commits cost (issue 37), each against its baseline in the same run:

1. A fenced commit (read the shard's lease, compare-and-swap it with the commit logged, then write the
   commit record: cache/lease.py `Fence.commit`) against the plain write of the same record, on moto's
   S3 server on 127.0.0.1: requests and milliseconds per commit. moto on loopback is no proxy for S3's
   latency; the requests per commit carry over (a real store: about one first-byte latency each).
2. The checksum every open of index.bin now verifies (a CRC-32, cache/index.py), over an index the size
   of the 250,000-video skeleton's (92 MB, BENCHMARKS.md), against mapping it without one, and against
   a sha256 (the alternative it was chosen over).

    python bench/bench_commit.py [--commits 50] [--index-mb 92]
"""
import argparse
import hashlib
import os
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def commits_on_moto(n):
    """{"plain": (seconds, requests), "fenced": (seconds, requests)} for n commit records each."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    from cache.lease import ObjectLease
    from cache.storage import open_storage
    from cache.writer import commit_record
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    storage = open_storage(f"s3://{bucket}/cache")
    lease = ObjectLease(storage, "shard-0-of-1.lock")
    fields = {"video_count": 50, "rows": {"frames": 12000, "flow": 12000, "logits": 3000}, "bytes": 32 << 20,
              "fingerprint_sha256": "0" * 64}
    out = {}
    try:
        for how in ("plain", "fenced"):
            requests, t = storage.requests, time.perf_counter()
            for i in range(n):
                record = commit_record(f"part-{how}-{i}.zarr", fields)
                if how == "plain":
                    storage.write(*record)
                else:
                    lease.fence.commit([record], requires=f"parts/part-{how}-{i}.zarr/zarr.json")
            out[how] = (time.perf_counter() - t, storage.requests - requests)
        lease_bytes = len(storage.read("locks", "shard-0-of-1.lock"))
    finally:
        lease.release()
        server.stop()
    return out, lease_bytes


def index_open(mb):
    """{"mapped", "crc32", "sha256": best seconds of 3 to open an index.bin of `mb` MB}."""
    from cache.index import _checksum, _map
    path = os.path.join(tempfile.mkdtemp(), "index.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(mb << 20))
    times = {}
    for how in ("mapped", "crc32", "sha256"):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            data = _map(path)
            if how != "mapped":
                view = memoryview(data)[:len(data) - 4]
                _checksum(view) if how == "crc32" else hashlib.sha256(view).digest()
                view.release()
            best = min(best, time.perf_counter() - t)
            data.close()
        times[how] = best
    os.unlink(path)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=50)
    ap.add_argument("--index-mb", type=int, default=92)
    args = ap.parse_args()
    got, lease_bytes = commits_on_moto(args.commits)
    for how, (seconds, requests) in got.items():
        print(f"{how:7} commit: {1000 * seconds / args.commits:6.1f} ms, {requests / args.commits:.1f} requests "
              f"per commit ({args.commits} commits on moto, 127.0.0.1)")
    print(f"fenced / plain: {got['fenced'][0] / got['plain'][0]:.2f}x the time, "
          f"{got['fenced'][1] / got['plain'][1]:.1f}x the requests; the lease object stays {lease_bytes} bytes")
    times = index_open(args.index_mb)
    print(f"index.bin of {args.index_mb} MB: mapped {1000 * times['mapped']:.2f} ms; with its CRC-32 checked "
          f"{1000 * times['crc32']:.0f} ms; with a sha256 {1000 * times['sha256']:.0f} ms "
          f"(crc32 / sha256: {times['crc32'] / times['sha256']:.2f}x)")


if __name__ == "__main__":
    main()
