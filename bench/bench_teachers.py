"""What teachers cost. (1) Per frame: EfficientNet-Lite0, Lite1 and Lite2 at the input size their
weights were trained at, batched as extract batches them on this device, fp32 on CPU; the baseline in
the same run is Lite0 (the default): each row prints its ratio to it.
(2) With --videos DIR, per extraction: `extract --teacher A` against `--teacher A --teacher B` (one
decode for both) on the same videos, then `--add-teacher B` onto the first cache; each prints its wall
time and its stages (decode, flow, teacher), and the ratios to the one-teacher run.

    python bench/bench_teachers.py [--frames 64] [--device cpu]
    python bench/bench_teachers.py --videos ../shared/data/clips --second efficientnet_lite2
"""
import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models.teacher import TEACHERS, load_teacher  # noqa: E402


def ms_per_frame(teacher, frames, repeats=3):
    """The best of `repeats` passes over the frames (after one warm-up pass), ms per frame."""
    teacher.predict(frames[:teacher.batch_size])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        teacher.predict(frames)
        best = min(best, time.perf_counter() - t)
    return 1000 * best / len(frames)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--videos", default=None, help="(2): a folder of videos to extract")
    ap.add_argument("--first", default="efficientnet_lite0")
    ap.add_argument("--second", default="efficientnet_lite2")
    ap.add_argument("--work", default=None, help="(2): where the caches go (default: a temporary folder)")
    args = ap.parse_args()
    if args.videos:
        return extraction(args)
    import torch
    print(f"{args.frames} frames per pass, device {args.device}, {torch.get_num_threads()} torch threads")
    rng = np.random.default_rng(0)
    base = None
    for name in TEACHERS:
        teacher = load_teacher(name, device=args.device)
        size = teacher.input_size
        frames = rng.integers(0, 256, (args.frames, size, size, 3), dtype=np.uint8)
        ms = ms_per_frame(teacher, frames)
        base = base or ms
        print(f"{name}: {size}x{size}, batch {teacher.batch_size}: {ms:.1f} ms per frame ({1000 / ms:.0f} frames/s), "
              f"{ms / base:.2f}x Lite0")


def extraction(args):
    """(2): one teacher, two teachers from one decode, and the second added afterwards."""
    import tempfile

    from pipeline.common.config import ExtractConfig
    from pipeline.extract.add_teacher import run_add_teacher
    from pipeline.extract.extract import run_extract
    work = args.work or tempfile.mkdtemp(prefix="bench-teachers-")
    runs = {}
    for label, more in (("one", ()), ("two", (args.second,))):
        cache = os.path.join(work, label)
        t = time.perf_counter()
        s = run_extract(ExtractConfig(videos=args.videos, cache=cache, teacher=args.first, more_teachers=more,
                                      device=args.device, progress=False))
        runs[label] = (time.perf_counter() - t, s["stage_seconds"], s["frames"])
    t = time.perf_counter()
    s = run_add_teacher(os.path.join(work, "one"), args.second, device=args.device, progress=False)
    runs["add"] = (time.perf_counter() - t, s["seconds"], s["frames"])
    base = runs["one"][0]
    names = {"one": f"extract --teacher {args.first}", "two": f"extract --teacher {args.first} --teacher {args.second}",
             "add": f"extract --add-teacher {args.second} (onto the first cache)"}
    print(f"{args.videos}: {runs['one'][2]} frames, device {args.device}, caches in {work}")
    for label, (wall, stages, frames) in runs.items():
        print(f"{names[label]}: {wall:.1f} s ({wall / base:.2f}x the one-teacher run); "
              + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))


if __name__ == "__main__":
    main()
