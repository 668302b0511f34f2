"""Stage two: train a 3D student against the cache alone (DistInit, MoDist, or both).

Never imports or builds the teacher: soft targets and embeddings come from the cache, so a step
costs only the student (and the motion pathway). Runs single-process or under torchrun (DDP).
"""
import copy
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from cache.fingerprint import VIDISTILL_VERSION, CacheError, read_cache_json
from cache.manifest import verify_cache
from cache.reader import CacheReader
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.students import ProjectionHead, build_motion_pathway, build_student, normalize_video
from pipeline.clips import ClipDataset
from pipeline.config import DEVICE_DEFAULTS, OBJECTIVES, resolve_device
from pipeline.losses import distill_kl, embed_cosine, info_nce, teacher_targets
from pipeline.runs import latest_run, new_run_dir, point_latest

class DistillError(Exception):
    """Bad arguments, an unusable cache or an incompatible checkpoint; one-line message."""


def resolve(cfg):
    """Fill the "auto" fields from the device; validate."""
    if cfg.objective not in OBJECTIVES:
        raise DistillError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {cfg.objective!r}")
    if cfg.target_mode not in ("average", "random"):
        raise DistillError("--target-mode must be 'average' or 'random'")
    device = resolve_device(cfg.device)
    auto = DEVICE_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    if cfg.optimizer not in ("adamw", "sgd"):
        raise DistillError(f"--optimizer must be adamw or sgd, not {cfg.optimizer!r}")
    return dataclasses.replace(
        cfg, device=device,
        weight_decay=cfg.weight_decay if cfg.weight_decay >= 0 else (0.05 if cfg.optimizer == "adamw" else 5e-4),
        student=cfg.student if cfg.student != "auto" else auto["student"],
        clip_len=cfg.clip_len or auto["clip_len"],
        batch_size=cfg.batch_size or auto["batch_size"])


class Distiller(nn.Module):
    """The student backbone plus whatever the objective needs: heads, motion pathway, momentum copies."""

    def __init__(self, cfg, num_classes, embed_dim, flow_bound):
        super().__init__()
        self.cfg = cfg
        self.flow_bound = flow_bound  # the cache's flow bound scales flow inputs to about [-1, 1]
        self.backbone = build_student(cfg.student)
        d = self.backbone.feature_dim
        self.use_distinit = cfg.objective in ("distinit", "both")
        self.use_modist = cfg.objective in ("modist", "both")
        if self.use_distinit:
            self.distill_head = nn.Linear(d, num_classes)  # one head per teacher (the cache has one)
            self.embed_head = nn.Linear(d, embed_dim) if cfg.embed_weight > 0 else None
        if self.use_modist:
            self.proj_rgb = ProjectionHead(d, dim_out=cfg.proj_dim)
            self.motion = build_motion_pathway(d)
            self.proj_flow = ProjectionHead(self.motion.feature_dim, dim_out=cfg.proj_dim)
            # MoCo-style momentum encoders: keys change slowly so the queue stays consistent
            self.key_rgb = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.proj_rgb))
            self.key_flow = nn.Sequential(copy.deepcopy(self.motion), copy.deepcopy(self.proj_flow))
            for p in list(self.key_rgb.parameters()) + list(self.key_flow.parameters()):
                p.requires_grad = False
            self.register_buffer("queue_rgb", nn.functional.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer("queue_flow", nn.functional.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        m = self.cfg.momentum
        for q_mod, k_mod in ((nn.Sequential(self.backbone, self.proj_rgb), self.key_rgb),
                             (nn.Sequential(self.motion, self.proj_flow), self.key_flow)):
            for q, k in zip(q_mod.parameters(), k_mod.parameters()):
                k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, k_rgb, k_flow):
        k_rgb, k_flow = all_gather(k_rgb), all_gather(k_flow)
        n, size = len(k_rgb), len(self.queue_rgb)
        idx = (self.queue_ptr + torch.arange(n, device=k_rgb.device)) % size
        self.queue_rgb[idx] = k_rgb.to(self.queue_rgb.dtype)
        self.queue_flow[idx] = k_flow.to(self.queue_flow.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def forward(self, batch):
        """Returns a dict of named scalar losses for one batch (already on the device)."""
        cfg, losses = self.cfg, {}
        feat = self.backbone(normalize_video(batch["video"]))  # [B,D]
        if self.use_distinit:
            target = teacher_targets(batch["teacher_logits"], batch["teacher_mask"], cfg.tau, cfg.target_mode)
            losses["distinit"] = distill_kl(self.distill_head(feat), target, cfg.tau)
            if self.embed_head is not None:
                losses["embed"] = embed_cosine(self.embed_head(feat), batch["teacher_embed"], batch["teacher_mask"])
        if self.use_modist:
            flow1 = batch["flow"].float() / self.flow_bound
            q_rgb = self.proj_rgb(feat)  # [B,128]
            q_flow = self.proj_flow(self.motion(flow1))  # [B,128]
            with torch.no_grad():
                self.momentum_update()
                k_rgb = self.key_rgb(normalize_video(batch["video2"]))
                k_flow = self.key_flow(batch["flow2"].float() / self.flow_bound)
            # copies: enqueue() below overwrites the buffers in place, which autograd must not see
            queue_rgb, queue_flow = self.queue_rgb.clone(), self.queue_flow.clone()
            losses["rgb_nce"] = info_nce(q_rgb, k_rgb, queue_rgb, cfg.nce_tau)
            losses["flow_nce"] = info_nce(q_flow, k_flow, queue_flow, cfg.nce_tau)
            losses["cross_nce"] = 0.5 * (info_nce(q_rgb, k_flow, queue_flow, cfg.nce_tau)
                                         + info_nce(q_flow, k_rgb, queue_rgb, cfg.nce_tau))
            self.enqueue(k_rgb, k_flow)
        return losses

    def total(self, losses):
        cfg = self.cfg
        weights = {"distinit": cfg.distinit_weight, "embed": cfg.embed_weight * cfg.distinit_weight,
                   "rgb_nce": cfg.modist_weight, "flow_nce": cfg.modist_weight,
                   "cross_nce": cfg.modist_weight * cfg.cross_weight}
        return sum(weights[k] * v for k, v in losses.items())


def all_gather(x):
    if not (dist.is_available() and dist.is_initialized()):
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def lr_lambda(step, warmup, total):
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class ClipSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) pairs: a seeded permutation per epoch, split across ranks.

    Starting from any step makes resume exact, and one DataLoader serves the whole run, so its
    workers persist across epochs.
    """

    def __init__(self, n, seed, rank, world, batch_size, start_step):
        self.n, self.seed, self.rank, self.world, self.batch_size = n, seed, rank, world, batch_size
        self.per_rank = n // world  # drop the tail so every rank takes equal steps
        self.steps_per_epoch = self.per_rank // batch_size
        self.epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
        self.skip = step_in_epoch * batch_size

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            mine = perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            mine = mine[:self.steps_per_epoch * self.batch_size]  # whole batches: epochs align with steps
            for i in mine[skip:]:
                yield epoch, i
            epoch, skip = epoch + 1, 0


def check_cache(cache_dir, objective):
    """The cache must be a vidistill cache with what the objective reads. Returns its fingerprint."""
    try:
        meta = read_cache_json(cache_dir)
    except CacheError as e:
        raise DistillError(str(e)) from None
    fp = meta["fingerprint"]
    if fp.get("vidistill_version") != VIDISTILL_VERSION:
        raise DistillError(f"{cache_dir} was written by vidistill {fp.get('vidistill_version')}, "
                           f"this is {VIDISTILL_VERSION}; re-extract it")
    # structure only (settings of every part, chunk files present, tables consistent): cheap at any size;
    # a chunk that is present but corrupt is caught when a clip reads it
    problems, _, _ = verify_cache(cache_dir, quick=True)
    if problems:
        raise DistillError(f"{cache_dir} is damaged ({len(problems)} problem(s), e.g. {problems[0]}); "
                           "run `cli.py cache verify --repair` and extract again")
    if objective in ("distinit", "both") and fp["teacher"]["name"] == "none":
        raise DistillError(f"{cache_dir} has no teacher outputs (extracted with --teacher none); "
                           f"--objective {objective} needs them")
    if objective in ("modist", "both") and fp["flow"]["method"] == "none":
        raise DistillError(f"{cache_dir} has no optical flow (extracted with --flow none); "
                           f"--objective {objective} needs it")
    return fp


def build_training(cfg, fingerprint, total_steps):
    """Model (on cfg.device), optimiser and warmup+cosine schedule for a resolved config."""
    tcfg = fingerprint["teacher"]
    model = Distiller(cfg, tcfg.get("num_classes"), tcfg.get("embed_dim"), fingerprint["flow"].get("bound")).to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps))
    return model, opt, sched


def autocast(device):
    """bf16 autocast on CUDA; full precision on CPU (no fast bf16 on common CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def all_finite(x):
    """True on every rank, or False on every rank: under DDP one rank must not skip a step alone
    (the others would wait for its gradients forever)."""
    ok = torch.isfinite(x).all().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def train_step(model, forward, opt, sched, batch, amp):
    """One optimiser step. Returns (loss, losses, grad_norm), detached; loss None if the loss or the
    gradients were not finite (the update is skipped). `forward` is the model or its DDP wrapper."""
    with amp:
        losses = forward(batch)
        loss = model.total(losses)
    opt.zero_grad(set_to_none=True)
    detached = {k: v.detach() for k, v in losses.items()}
    if not all_finite(loss.detach()):
        return None, detached, None
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], model.cfg.grad_clip)
    if not all_finite(grad_norm):  # clipping a NaN gradient still leaves NaN: skip, or the weights are lost
        opt.zero_grad(set_to_none=True)
        return None, detached, None
    opt.step()
    sched.step()
    return loss.detach(), detached, grad_norm


# Settings that must not change between a run and its resumption (--steps / --epochs may: a larger
# value extends a finished run, the cosine schedule stretching to the new end).
_RESUME_KEYS = ("cache", "objective", "student", "clip_len", "stride", "crop", "crop_scale", "batch_size", "seed",
                "tau", "target_mode", "embed_weight", "queue_size", "proj_dim", "optimizer", "lr", "weight_decay",
                "warmup_steps", "momentum", "distinit_weight", "modist_weight", "cross_weight")


def run_distill(cfg):
    """The whole of `cli.py distill`: set-up, resume, the loop, teardown. Returns a summary dict."""
    cfg = resolve(cfg)
    fingerprint = check_cache(cfg.cache, cfg.objective)
    cfg, rank, world = init_distributed(cfg)
    dataset = training_clips(cfg)
    cfg, per_epoch, total = plan_steps(cfg, len(dataset), world, rank)
    cfg = choose_run_folder(cfg, fingerprint, world, rank)
    torch.manual_seed(cfg.seed + rank)
    model, opt, sched = build_training(cfg, fingerprint, total)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.out, "checkpoint.pt"), os.path.join(cfg.out, "log.jsonl")
    step, batches_used = resume(ckpt_path, log_path, cfg, fingerprint, model, opt, sched, world, rank)
    loader = make_loader(dataset, cfg, rank, world, batches_used)
    run = dict(model=model, opt=opt, sched=sched, cfg=cfg, fingerprint=fingerprint, world=world, rank=rank,
               ckpt_path=ckpt_path, log_path=log_path, per_epoch=per_epoch, total=total)
    first_step, t0 = step, time.time()
    step, clips, bad_steps = train_loop(run, loader, step, batches_used)
    if rank == 0:  # the checkpoint of the last step was saved in the loop
        plot_losses(log_path, os.path.join(cfg.out, "losses.png"))
    if world > 1:
        dist.destroy_process_group()
    wall = time.time() - t0
    return {"steps": step, "total_steps": total, "steps_this_run": step - first_step, "wall_seconds": wall,
            "out": cfg.out,
            "clips_per_s": clips / max(wall, 1e-9), "checkpoint": ckpt_path, "videos": len(dataset),
            "skipped_steps": bad_steps, "student": cfg.student, "device": cfg.device}


def init_distributed(cfg):
    """Join the torchrun process group when there is one. Returns (cfg, rank, world)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        gpu = cfg.device.startswith("cuda")
        if gpu:  # one GPU per process: NCCL, pinned memory and new tensors all use the current device
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            cfg = dataclasses.replace(cfg, device=f"cuda:{local_rank}")
        dist.init_process_group("nccl" if gpu else "gloo")
    return cfg, rank, world


def training_clips(cfg):
    modist = cfg.objective in ("modist", "both")
    return ClipDataset(CacheReader(cfg.cache), cfg.clip_len, cfg.stride, cfg.crop, with_flow=modist,
                       with_teacher=cfg.objective != "modist", two_views=modist, seed=cfg.seed,
                       crop_scale=cfg.crop_scale)


def plan_steps(cfg, n_videos, world, rank):
    """Steps per epoch and in all; the queue is cut to the data. Returns (cfg, per_epoch, total)."""
    per_epoch = n_videos // (cfg.batch_size * world)
    if per_epoch == 0:
        raise DistillError(f"{cfg.cache}: {n_videos} usable videos, fewer than one batch of "
                           f"{cfg.batch_size} x {world} process(es); lower --batch-size")
    if cfg.objective in ("modist", "both") and cfg.queue_size > n_videos:
        # a queue longer than the data holds several keys of the query's own video as "negatives"
        if rank == 0:
            print(f"note: --queue-size {cfg.queue_size} > {n_videos} videos in the cache; using {n_videos}")
        cfg = dataclasses.replace(cfg, queue_size=n_videos)
    return cfg, per_epoch, cfg.steps or cfg.epochs * per_epoch


def settings_changed(ckpt, cfg, fingerprint, world):
    """Why a checkpoint cannot be resumed with these settings (empty: it can)."""
    old = dict(ckpt["config"], cache=os.path.normpath(ckpt["config"].get("cache", "")))  # cache/ is cache
    new = dict(dataclasses.asdict(cfg), cache=os.path.normpath(cfg.cache))
    changed = [k for k in _RESUME_KEYS if old.get(k) != new[k]]
    if ckpt.get("world_size", 1) != world:
        changed.append(f"{ckpt.get('world_size', 1)} -> {world} processes")
    if ckpt["cache_fingerprint"] != fingerprint:
        changed.append("a cache with another fingerprint")
    return changed


def choose_run_folder(cfg, fingerprint, world, rank):
    """Without --out: the latest run if it has these settings (a rerun resumes it), else a new
    runs/<objective>-<date-time>/. runs/latest then points at it."""
    if cfg.out:
        return cfg
    out = None
    latest = latest_run()
    if rank == 0 and latest and os.path.exists(os.path.join(latest, "checkpoint.pt")):
        try:
            ckpt = load_checkpoint(os.path.join(latest, "checkpoint.pt"))
            if not settings_changed(ckpt, cfg, fingerprint, world):
                out = os.path.relpath(os.path.realpath(latest))
        except CheckpointError:
            pass  # an unreadable latest run is left alone; this run gets a folder of its own
    if rank == 0:
        out = out or new_run_dir(cfg.objective)
        os.makedirs(out, exist_ok=True)
        point_latest(out)
    if world > 1:  # every rank writes into the folder rank 0 chose
        shared = [out]
        dist.broadcast_object_list(shared, src=0)
        out = shared[0]
    return dataclasses.replace(cfg, out=out)


def resume(ckpt_path, log_path, cfg, fingerprint, model, opt, sched, world, rank):
    """Load the run's checkpoint if there is one, refusing other settings. Returns (step, batches_used)."""
    if not os.path.exists(ckpt_path):
        return 0, 0
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        raise DistillError(str(e)) from None
    changed = settings_changed(ckpt, cfg, fingerprint, world)
    if changed:
        raise DistillError(f"{ckpt_path} was trained with other settings ({', '.join(changed)}); "
                           "use another --out to start a new run")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    step = ckpt["step"]
    if world == 1:  # exact resume; DDP ranks reseed by step instead (the checkpoint holds rank 0's state)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if cfg.device.startswith("cuda") and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    else:
        torch.manual_seed(cfg.seed + rank + 7919 * step)
    if rank == 0:
        drop_log_after(log_path, step)  # steps logged after the checkpoint are redone
    return step, ckpt.get("batches_used", step)  # batches_used > step when non-finite steps were skipped


def make_loader(dataset, cfg, rank, world, batches_used):
    """One DataLoader for the whole run, starting where the last run stopped."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size,
        sampler=ClipSampler(len(dataset), cfg.seed, rank, world, cfg.batch_size, batches_used),
        num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"), persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers else None, multiprocessing_context="spawn" if cfg.workers else None)


def checkpoint_state(run, step, batches_used):
    cuda = run["cfg"].device.startswith("cuda")
    return {"model": run["model"].state_dict(), "optimizer": run["opt"].state_dict(),
            "scheduler": run["sched"].state_dict(), "step": step, "batches_used": batches_used,
            "world_size": run["world"],
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None},
            "config": dataclasses.asdict(run["cfg"]), "cache_fingerprint": run["fingerprint"],
            "feature_dim": run["model"].backbone.feature_dim, "vidistill_version": VIDISTILL_VERSION}


def train_loop(run, loader, step, batches_used):
    """Optimiser steps until the run's total, logging and checkpointing. Returns (step, clips, bad_steps)."""
    model, cfg, rank, world, total = run["model"], run["cfg"], run["rank"], run["world"], run["total"]
    device = torch.device(cfg.device)
    forward = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast(device)
    bar = tqdm(total=total, initial=step, unit="step", desc=f"distill {cfg.objective}",
               disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    t0, clips, bad_steps = time.time(), 0, 0
    model.train()
    batches = iter(loader)
    while step < total:
        try:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        except CacheError as e:  # a corrupt chunk (from a worker the message carries its traceback)
            raise DistillError(str(e).strip().splitlines()[-1]) from None
        batches_used += 1
        loss, losses, grad_norm = train_step(model, forward, run["opt"], run["sched"], batch, amp)
        if loss is None:  # NaN guard: the update was skipped; stop if it keeps happening
            bad_steps += 1
            if bad_steps > 10:
                raise DistillError(f"loss or gradients were not finite in {bad_steps} steps; lower --lr "
                                   f"(last: {({k: float(v) for k, v in losses.items()})})")
            continue
        step += 1
        clips += len(batch["video"]) * world
        clips_per_s = clips / (time.time() - t0)
        if rank == 0 and (step % cfg.log_every == 0 or step == total):
            rec = {"step": step, "epoch": step // run["per_epoch"], "loss": float(loss),
                   "lr": run["sched"].get_last_lr()[0], "grad_norm": float(grad_norm), "clips_per_s": clips_per_s,
                   **{k: float(v) for k, v in losses.items()}}
            with open(run["log_path"], "a") as f:
                f.write(json.dumps(rec) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}", clips_s=f"{clips_per_s:.1f}")
        if rank == 0 and (step % cfg.save_every == 0 or step == total):
            save_checkpoint(run["ckpt_path"], checkpoint_state(run, step, batches_used))
    bar.close()
    return step, clips, bad_steps


def drop_log_after(log_path, step):
    """Keep only the log records up to `step` (a resumed run logs the later steps again)."""
    if not os.path.exists(log_path):
        return
    keep = [line for line in open(log_path) if line.strip() and json.loads(line)["step"] <= step]
    tmp = log_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, log_path)


def plot_losses(log_path, png_path):
    """Loss curves from the JSON-lines log (every named loss and the total)."""
    if not os.path.exists(log_path):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(l) for l in open(log_path)]
    keys = [k for k in recs[-1] if k in ("loss", "distinit", "embed", "rgb_nce", "flow_nce", "cross_nce")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot([r["step"] for r in recs if k in r], [r[k] for r in recs if k in r], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
