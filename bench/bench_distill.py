"""Stage-two throughput, in one run:

(a) for every objective (distinit, modist, both), training steps/s reading clips from the cache (the
    real DataLoader) vs. from batches already in memory on the device: how close the loader gets to
    compute-bound (goal >= 0.9 on GPU); colour augmentations run inside the step in both;
(b) the cached DistInit step vs. an *online* step that runs the image teacher on the clip's frames
    inside the loop (what a pipeline without a cache pays; decoding not even counted);
(c) for every objective, fp32 vs bf16 autocast steps/s on the in-memory batches, timed in alternating
    rounds on one model so a busy machine slows both alike (goal on a CPU with native bf16: >= 1.25x).

    python bench/bench_distill.py                        # extracts ../shared/data/clips into a temp cache
    python bench/bench_distill.py --cache CACHE --steps 30
    python bench/bench_distill.py --cache CACHE --objectives distinit modist --crop 64 --threads 1  # a demo student
    python bench/bench_distill.py --student r2plus1d_18 --clip-len 16 --batch-size 32   # GPU figures
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.common.config import OBJECTIVES, DistillConfig
from pipeline.common.precision import autocast, native_bf16_flags
from pipeline.distill.clips import make_loader
from pipeline.distill.train import (
    build_training,
    check_cache,
    plan_steps,
    resolve,
    train_step,
    training_clips,
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step_fn, batches, steps, device, warmup=3):
    for _ in range(warmup):
        step_fn(next(batches))
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step_fn(next(batches))
    sync(device)
    return steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None)
    ap.add_argument("--videos", default=None, help="extracted into a temporary cache when --cache is not given")
    ap.add_argument("--student", default="auto")
    ap.add_argument("--clip-len", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--crop", type=int, default=DistillConfig.crop, help="the demo's students: 64")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; the demo trains each student on 1)")
    ap.add_argument("--rounds", type=int, default=4, help="(c): alternating fp32 / bf16 rounds of --steps // rounds")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES),
                    help="any distill objectives, e.g. distinit modist both distinit+lss (lss needs --concepts)")
    ap.add_argument("--concepts", default="", help="concept bank from `cli.py concepts`, for objectives with lss")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = torch.cpu.get_capabilities()
    print(f"CPU: {caps.get('cpu_name', '?')}, {torch.get_num_threads()} torch thread(s); native bf16 flags: "
          f"{', '.join(native_bf16_flags()) or 'none'}; avx512_f {caps.get('avx512_f', False)}; torch {torch.__version__}")

    cache = args.cache
    if cache is None:
        from bench.bench_extract import default_videos
        from pipeline.common.config import ExtractConfig
        from pipeline.extract.extract import run_extract
        cache = os.path.join(tempfile.mkdtemp(prefix="bench-distill-"), "cache")
        run_extract(ExtractConfig(videos=args.videos or default_videos(), cache=cache, progress=False))
    for objective in args.objectives:
        bench_objective(cache, objective, args)


def bench_objective(cache, objective, args):
    """(a) for one objective; (b) too for distinit. The colour augmentations run inside the step, so
    both columns include them."""
    cfg = resolve(DistillConfig(cache=cache, out="", objective=objective, student=args.student,
                                clip_len=args.clip_len, batch_size=args.batch_size, crop=args.crop,
                                workers=args.workers, concepts=args.concepts))
    device = torch.device(cfg.device)
    fingerprint = check_cache(cfg)
    dataset = training_clips(cfg, fingerprint)
    cfg, plan = plan_steps(cfg, len(dataset), world=1, rank=0)
    model, opt, sched = build_training(cfg, fingerprint, plan)
    model.train()
    amp = autocast(cfg.precision, device)  # "auto": what distill would run
    print(f"\n{objective}: {cfg.student}, clips {cfg.clip_len}x{cfg.crop}^2, batch {cfg.batch_size}, "
          f"{cfg.workers} workers, {cfg.precision}, {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} cores'}), {len(dataset)} videos")
    it = iter(make_loader(dataset, cfg, rank=0, world=1, batches_used=0))

    def to_device(b):
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}

    def step(b, amp=amp):
        train_step(model, model, opt, sched, to_device(b), amp)

    in_memory = [to_device(next(it)) for _ in range(4)]

    def cycle(xs):
        while True:
            yield from xs

    results = {"cache (DataLoader)": timed_steps(step, it, args.steps, device),
               "in-memory batches": timed_steps(step, cycle(in_memory), args.steps, device)}
    if objective == "distinit":
        from models.teacher import load_teacher  # only the online baseline needs the teacher
        teacher = load_teacher(device=cfg.device)

        def online_step(b):
            # what a cache-free pipeline does per step: the teacher on every frame of every clip
            video = b["video"]  # [B,3,T,S,S] uint8
            frames = video.permute(0, 2, 3, 4, 1).flatten(0, 1)  # [B*T,S,S,3]
            frames = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(224, 224), mode="bilinear")
            logits, _ = teacher.predict(frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
            logits = torch.from_numpy(logits).to(device).view(video.shape[0], video.shape[2], -1)
            step(dict(b, teacher_logits=logits,
                      teacher_mask=torch.ones(logits.shape[:2], dtype=torch.bool, device=device)))
        results["online teacher"] = timed_steps(online_step, it, max(3, args.steps // 4), device, warmup=1)
    precisions = compare_precisions(step, cycle(in_memory), args.steps, args.rounds, device)
    for name, sps in results.items():
        print(f"{name:>20}: {sps:.2f} steps/s = {sps * cfg.batch_size:.1f} clips/s")
    print(f"(a) cache / in-memory: {results['cache (DataLoader)'] / results['in-memory batches']:.2f} (goal >= 0.9 on GPU)")
    if "online teacher" in results:
        print(f"(b) cached / online teacher: {results['cache (DataLoader)'] / results['online teacher']:.2f}x faster")
    for name, sps in precisions.items():
        print(f"{name:>20}: {sps:.2f} steps/s = {sps * cfg.batch_size:.1f} clips/s (in-memory batches)")
    print(f"(c) {objective} bf16 / fp32: {precisions['bf16'] / precisions['fp32']:.2f}x "
          f"(goal >= 1.25 on a CPU with native bf16)")


def compare_precisions(step, batches, steps, rounds, device):
    """{precision: steps/s}: fp32 and bf16 autocast steps of the same model in alternating rounds, so
    load from elsewhere on the machine falls on both alike."""
    amps = {"fp32": autocast("fp32", device), "bf16": autocast("bf16", device)}
    seconds = dict.fromkeys(amps, 0.0)
    per_round = max(1, steps // rounds)
    for amp in amps.values():  # warm-up: oneDNN picks and caches its kernels for each
        timed_steps(lambda b: step(b, amp), batches, 1, device, warmup=2)
    for _ in range(rounds):
        for name, amp in amps.items():
            seconds[name] += per_round / timed_steps(lambda b: step(b, amp), batches, per_round, device, warmup=0)
    return {name: rounds * per_round / s for name, s in seconds.items()}

if __name__ == "__main__":
    main()
