"""What each offline teacher costs per frame: EfficientNet-Lite0, Lite1 and Lite2 at the input size
their weights were trained at, batched as extract batches them on this device, fp32 on CPU. The
baseline in the same run is Lite0 (the default): each row prints its ratio to it.

    python bench/bench_teachers.py [--frames 64] [--device cpu]
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
