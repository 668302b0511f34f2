"""A run folder and its checkpoint: which folder a run trains into (a rerun with the same settings
resumes the latest), its lock, what the checkpoint holds, and the settings a resume must not change."""
import contextlib
import dataclasses
import hashlib
import json
import os

import torch
import torch.distributed as dist

from cache.fingerprint import VIDISTILL_VERSION, fingerprint_sha256, sha256_file
from cache.storage import is_url
from models.checkpoint import CheckpointError, load_checkpoint
from models.start import start_label
from pipeline.common.config import DistillConfig
from pipeline.common.errors import DistillError
from pipeline.common.locks import FileLock, LockBusy
from pipeline.common.runs import RUN_LOCK, latest_run, new_run_dir, point_latest
from pipeline.distill.teachers import distilled_teachers, teachers_changed

# Settings that do not change what a run learns: where it writes, how long it is (a larger --steps or
# --epochs extends a finished run), how it reports and loads data, and where and how fast it runs (memory
# layout and compilation change the last float digits, not what is learnt; bf16 rounds more, and its losses
# track fp32's step for step: a run started on a GPU or a bf16 CPU may go on elsewhere). Every other
# setting must match for a resume; a setting added later is compared too, so no list can fall behind.
# teacher_weight is compared as the teachers and weights it resolves to (the cache may have gained one).
NOT_RESULT_KEYS = ("out", "steps", "epochs", "workers", "read_cache_mb", "save_every", "log_every", "health_every", "progress",
                   "device", "channels_last", "compile", "precision", "teacher_weight")


def result_keys():
    """The DistillConfig fields a resume must not change."""
    return [f.name for f in dataclasses.fields(DistillConfig) if f.name not in NOT_RESULT_KEYS]


def video_set(ids):
    """Which videos a run trains on: a cache that grew or was repaired since changes the epoch length,
    the schedule and the sampler, so a resume must see the same set."""
    return {"count": len(ids), "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def settings_changed(ckpt, cfg, fingerprint, world, videos):
    """Why a checkpoint cannot be resumed with these settings and videos (empty: it can)."""
    def same_spelling(cache):  # cache/ is cache; s3://b/c/ is s3://b/c (normpath would break the URL)
        return cache.rstrip("/") if is_url(cache) else os.path.normpath(cache)
    old = dict(ckpt["config"], cache=same_spelling(ckpt["config"].get("cache", "")))
    new = dict(dataclasses.asdict(cfg), cache=same_spelling(cfg.cache))
    # a key newer than the checkpoint: it trained at that key's default
    changed = [k for k in result_keys() if old.get(k, getattr(DistillConfig, k)) != new[k]]
    if ckpt.get("world_size", 1) != world:
        changed.append(f"{ckpt.get('world_size', 1)} -> {world} processes")
    # teachers added to the cache since (extract --add-teacher) change nothing for a run that does not
    # distil from them: the teachers the run would distil from now are compared instead
    if fingerprint_sha256(ckpt["cache_fingerprint"]) != fingerprint_sha256(fingerprint):
        changed.append("a cache with another fingerprint")
    elif other_teachers := teachers_changed(ckpt, distilled_teachers(cfg, fingerprint)):
        changed.append(other_teachers)
    elif ckpt.get("videos") != videos:
        was = ckpt.get("videos", {}).get("count", "unrecorded")
        changed.append(f"the cache's videos changed since: {was} then, {videos['count']} now")
    bank = ckpt.get("concepts")
    if bank and os.path.isfile(cfg.concepts) and bank["sha256"] != sha256_file(cfg.concepts):
        # resuming would keep training against the checkpoint's copy of the old vectors
        changed.append(f"another concept bank in {cfg.concepts} (rebuilt since)")
    return changed


def choose_run_folder(cfg, fingerprint, world, rank, videos):
    """Without --out: the latest run if it has these settings (a rerun resumes it), else a new
    runs/<objective>-<date-time>/. runs/latest then points at it."""
    if cfg.out:
        return cfg
    out = None
    latest = latest_run()
    if rank == 0 and latest and os.path.exists(os.path.join(latest, "checkpoint.pt")):
        try:
            ckpt = load_checkpoint(os.path.join(latest, "checkpoint.pt"))
            if not settings_changed(ckpt, cfg, fingerprint, world, videos):
                out = os.path.relpath(os.path.realpath(latest))
        except CheckpointError:
            pass  # an unreadable latest run is left alone; this run gets a folder of its own
    if rank == 0:
        out = out or new_run_dir(f"{cfg.objective}-{start_label(cfg.init)}")
        os.makedirs(out, exist_ok=True)
        point_latest(out)
    if world > 1:  # every rank writes into the folder rank 0 chose
        shared = [out]
        dist.broadcast_object_list(shared, src=0)
        out = shared[0]
    return dataclasses.replace(cfg, out=out)


def lock_run_folder(out, world, rank):
    """Rank 0 takes RUN/.lock for the whole run (every rank learns whether it could, so none of them
    waits on a refused one). Two runs into one folder would interleave log.jsonl and race on
    checkpoint.pt. Returns the lock (a context manager)."""
    lock, refusal = contextlib.nullcontext(), None
    if rank == 0:
        try:
            lock = FileLock(os.path.join(out, RUN_LOCK))
        except LockBusy as e:
            refusal = (f"{out} is being trained by another distill ({e.holder}); wait for it to finish, "
                       "or pass --out NEW for a separate run")
    if world > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise DistillError(refusal)
    return lock


def load_run_checkpoint(ckpt_path, cfg, fingerprint, videos, world):
    """The run folder's checkpoint, or None for a new run; refused with one line when it was trained
    with other settings or videos."""
    if not os.path.exists(ckpt_path):
        return None
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        raise DistillError(str(e)) from None
    changed = settings_changed(ckpt, cfg, fingerprint, world, videos)
    if changed:
        raise DistillError(f"{ckpt_path} was trained with other settings ({', '.join(changed)}); "
                           "use another --out to start a new run")
    return ckpt


def continued_plan(plan, ckpt):
    """An extended run (a larger --steps than it was planned with) keeps the warm-up and key momentum it
    started with: recomputed from the new length, the learning rate would fall back into warm-up mid-run
    and the key encoders would change pace. Only the cosine decay stretches to the new end."""
    if ckpt is None or "plan" not in ckpt:
        return plan
    return dict(plan, warmup=ckpt["plan"]["warmup"], momentum=ckpt["plan"]["momentum"])


def resume(ckpt, log_path, cfg, model, opt, sched, world, rank):
    """Continue from the run's checkpoint (None: a new run). Returns (step, batches_used)."""
    if ckpt is None:
        return 0, 0
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # e.g. saved before lss's self-distillation kept its centres
        raise DistillError(f"{os.path.join(cfg.out, 'checkpoint.pt')} does not fit this vidistill's model "
                           f"({str(e).strip().splitlines()[-1].strip()}); use another --out to start a new run") from None
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


def checkpoint_state(run, step, batches_used):
    cuda = run["cfg"].device.startswith("cuda")
    return {"model": run["model"].state_dict(), "optimizer": run["opt"].state_dict(),
            "scheduler": run["sched"].state_dict(), "step": step, "batches_used": batches_used,
            "world_size": run["world"],
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None},
            "config": dataclasses.asdict(run["cfg"]), "cache_fingerprint": run["fingerprint"], "videos": run["videos"],
            "plan": run["plan"],
            "feature_dim": run["model"].backbone.feature_dim, "vidistill_version": VIDISTILL_VERSION,
            "concepts": run["model"].bank, "teacher": run["teacher"],
            # where the student started: {"init": scratch|inflate|path, "weights", "weights_sha256", ...}
            "start": run["model"].start_record,
            # what distinit distilled from: {slot, name, weight, num_classes, embed_dim, weights, classes, weights_sha256}
            "teachers": run["teachers"]}


def drop_log_after(log_path, step):
    """Keep only the log records up to `step` (a resumed run logs the later steps again)."""
    if not os.path.exists(log_path):
        return
    keep = [line for line in open(log_path) if line.strip() and json.loads(line)["step"] <= step]
    tmp = log_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, log_path)
