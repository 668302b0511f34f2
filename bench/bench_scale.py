"""The cache's index and start-up at Kinetics scale: a 250,000-video skeleton (real parts through the
real writer, real index; each video two 16x16 frames, flow and a 10-class teacher row).

Measures: building index.bin from the parts, then opening it in a fresh process; the index's memory
in the main process and in each of 4 DataLoader workers before and after an epoch of index reads
(every video's frame count and id, and one clip read per 50 videos); `cache info` and
`cache verify --quick`; distill's wall time to its first step; files on disk per stored GB. The
baseline in the same run is the format-2 way of indexing (every part's video table as JSON into a dict
of dicts), timed and sized on the same records.

    python bench/bench_scale.py --videos 250000 --work /tmp/scale
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

H = W = 16
K, D = 10, 8
FRAMES = 2


def rss_mb():
    """(resident, private) MB of this process: private excludes pages shared with others (a mapped index)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Rss"] / 1024, (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def write_skeleton(cache, videos, per_part):
    from cache.fingerprint import VIDISTILL_VERSION, create_or_check, fingerprint_sha256
    from cache.lease import Fence
    from cache.writer import PartWriter
    fp = {"teacher": {"name": "skeleton", "num_classes": K, "embed_dim": D},
          "preprocessing": {"fps": 8.0, "height": H, "width": W, "teacher_size": 224, "teacher_crop": 0.875,
                            "teacher_every": 1},
          "flow": {"method": "dis", "params": {}, "bound": 20.0}, "vidistill_version": VIDISTILL_VERSION,
          "ffmpeg_version": "skeleton",
          "storage": {"frames": "jpeg q90", "flow": "jpeg q95"}}
    create_or_check(cache, fp, {})
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (FRAMES, H, W, 3), dtype=np.uint8)
    flow = np.full((FRAMES, H, W, 2), 128, np.uint8)
    for first in range(0, videos, per_part):
        w = PartWriter(cache, "skel", H, W, True, K, D, {"frames": ("jpeg", 90), "flow": ("jpeg", 95)})
        for v in range(first, min(first + per_part, videos)):
            start = w.begin_video()
            w.append("frames", frames)
            w.append("flow", flow)
            w.append("teacher_frame", np.arange(FRAMES, dtype=np.int32))
            w.append("logits", np.zeros((FRAMES, K), np.float16))
            w.append("embed", np.zeros((FRAMES, D), np.float16))
            w.add_record({"id": f"k400/class{v % 400:03d}/video_{v:07d}.mp4", "path": f"/data/k400/video_{v:07d}.mp4",
                          "size": 1_000_000 + v, "mtime": 1.7e9, "status": "ok", "error": None,
                          "frame_offset": start["frames"], "frame_count": FRAMES,
                          "teacher_offset": start["logits"], "teacher_count": FRAMES,
                          "src_codec": "h264", "src_width": 340, "src_height": 256, "src_fps": 30.0})
        w.commit({"fingerprint_sha256": fingerprint_sha256(fp)}, Fence(cache))  # one writer: plain writes


class IndexReads:
    """A Dataset whose items touch the index the way ClipDataset does (id and frame count of a row), and
    read one clip every 50 items; each returns its worker's memory after the read."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader.rows)

    def __getitem__(self, i):
        row = self.reader.rows[i]
        vid = self.reader.index.id(row)
        n = int(self.reader.index["frame_count"][row])
        if i % 50 == 0:
            self.reader.frames_at(vid, np.arange(n), with_flow=True)
        # memory at the first and last item of each batch of 1000 (reading smaps costs ~1 ms)
        return np.array(rss_mb() if i % 1000 in (0, 999) else (0.0, 0.0))


def worker_memory(reader, workers=4):
    import torch
    loader = torch.utils.data.DataLoader(IndexReads(reader), batch_size=1000, num_workers=workers,
                                         multiprocessing_context="fork", collate_fn=lambda b: np.stack(b))
    first, last = {}, {}
    for k, batch in enumerate(loader):
        w = k % workers  # batches go to workers in turn
        first.setdefault(w, batch[0])
        last[w] = batch[-1] if batch[-1][0] else batch[0]
    return [(first[w], last[w]) for w in sorted(first)]


def timed(cmd):
    """(wall seconds, CPU seconds) of a command: CPU time does not grow when others share the cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def files_and_bytes(path):
    n = size = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            n += 1
            size += os.path.getsize(os.path.join(d, f))
    return n, size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=250_000)
    ap.add_argument("--per-part", type=int, default=1024, help="videos per part (extract's --part-videos)")
    ap.add_argument("--work", default="/tmp/bench_scale")
    ap.add_argument("--stage", default="all", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = ap.parse_args()
    cache = os.path.join(args.work, f"cache-{args.videos}")
    if args.stage == "open":
        from cache.reader import CacheReader
        before = rss_mb()
        t = time.perf_counter()
        reader = CacheReader(cache)
        opened = time.perf_counter() - t
        after = rss_mb()
        print(json.dumps({"open_s": opened, "rss_mb": after[0] - before[0], "private_mb": after[1] - before[1],
                          "workers": [[list(map(float, a)), list(map(float, b))] for a, b in worker_memory(reader)]}))
        return
    if args.stage == "dict":  # the format-2 index: every part's table into a dict of dicts
        from cache.index import load_index
        before = rss_mb()
        t = time.perf_counter()
        index, _ = load_index(cache)
        print(json.dumps({"open_s": time.perf_counter() - t, "rss_mb": rss_mb()[0] - before[0], "videos": len(index)}))
        return

    if not os.path.exists(os.path.join(cache, "cache.json")):
        t = time.perf_counter()
        write_skeleton(cache, args.videos, args.per_part)
        print(f"skeleton: {args.videos} videos in {args.videos // args.per_part + 1} parts, written in "
              f"{time.perf_counter() - t:.0f} s")
    index_file = os.path.join(cache, "index.bin")
    if os.path.exists(index_file):
        os.remove(index_file)
    from cache.index import open_index
    t = time.perf_counter()
    open_index(cache)
    print(f"index.bin built from the parts in {time.perf_counter() - t:.1f} s "
          f"({os.path.getsize(index_file) / 1e6:.1f} MB)")

    def stage(name):
        out = subprocess.run([sys.executable, __file__, "--videos", str(args.videos), "--work", args.work,
                              "--stage", name], capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    new, old = stage("open"), stage("dict")
    print(f"\nopen the index (fresh process): {new['open_s']:.3f} s; format-2 dict of dicts: {old['open_s']:.2f} s "
          f"({old['open_s'] / new['open_s']:.0f}x)")
    print(f"index memory in the main process: {new['rss_mb']:.1f} MB resident ({new['private_mb']:.1f} MB private; "
          f"the rest is the mapped file, shared); format-2: {old['rss_mb']:.0f} MB")
    for w, (a, b) in enumerate(new["workers"]):
        print(f"worker {w}: resident {a[0]:.0f} -> {b[0]:.0f} MB, private {a[1]:.0f} -> {b[1]:.0f} MB over an epoch")
    for name, cmd in (("cache info", ["cache", "info", cache]),
                      ("cache verify --quick", ["cache", "verify", "--quick", cache])):
        wall, cpu = timed([sys.executable, os.path.join(REPO, "cli.py"), *cmd])
        print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU (whole command, imports included)")
    run = os.path.join(args.work, "run")
    shutil.rmtree(run, ignore_errors=True)  # a finished run would be resumed, not started
    wall, cpu = timed([sys.executable, os.path.join(REPO, "cli.py"), "distill", "--cache", cache, "--out", run,
                       "--steps", "1", "--objective", "distinit", "--student", "r3d_cpu", "--clip-len", "2",
                       "--crop", "16", "--batch-size", "8", "--workers", "0", "--device", "cpu"])
    print(f"distill to its first step (whole command, 1 step, checkpoint saved): {wall:.1f} s wall, {cpu:.1f} s CPU")
    n, size = files_and_bytes(os.path.join(cache, "parts"))
    print(f"files: {n} for {size / 1e6:.0f} MB stored (skeleton arrays are tiny; "
          f"{n / (args.videos / args.per_part):.1f} files per part)")


if __name__ == "__main__":
    main()
