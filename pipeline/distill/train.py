"""Stage two's run: check the cache, plan the steps, build the model (pipeline/distill/distiller.py),
resume (pipeline/distill/resume.py), then the training loop.

Never imports or builds the teacher: soft targets and embeddings come from the cache, so a step
costs only the student (and the motion pathway). Runs single-process or under torchrun (DDP).
"""

import contextlib
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from cache.fingerprint import VIDISTILL_VERSION, CacheError, read_cache_json, sha256_file, teacher_array
from cache.index import committed_parts
from cache.manifest import verify_cache
from cache.reader import CacheReader
from models.checkpoint import save_checkpoint
from models.inflate import IMAGE_COUNTERPARTS, counterpart_key, inflatable, refusal
from models.students import channels_last
from models.start import INIT_WORDS, StartError, auto_init, checkpoint_student
from pipeline.common.config import DEVICE_DEFAULTS, objective_parts, resolve_device
from pipeline.common.errors import ConceptError, DistillError
from pipeline.common.precision import autocast, check_convolutions, describe_precision, resolve_precision
from pipeline.common.progress import progress_bar
from pipeline.common.tensorboard import TrainEvents
from pipeline.distill.clips import ClipDataset, clip_span, make_loader
from pipeline.distill.concepts import read_bank
from pipeline.distill.distiller import Distiller
from pipeline.distill.health import describe_health, health_advice, health_sample, measure_health, unhealthy
from pipeline.distill.resume import (
    checkpoint_state,
    choose_run_folder,
    continued_plan,
    load_run_checkpoint,
    lock_run_folder,
    resume,
    video_set,
)
from pipeline.distill.teachers import distilled_teachers, teacher_sources


def resolve(cfg):
    """Fill the "auto" fields from the device; validate."""
    try:
        objective = "+".join(objective_parts(cfg.objective))
    except ValueError as e:
        raise DistillError(str(e)) from None
    if objective == "distinit+modist":
        objective = "both"  # one name for one run: run folders, resume and the demo's rows use it
    if "lss" in objective and not cfg.concepts:
        raise DistillError("--objective with lss needs --concepts BANK.h5 (make one with `cli.py concepts`)")
    if cfg.concept_self_weight < 0:
        raise DistillError(f"--concept-self-weight must be >= 0, not {cfg.concept_self_weight}")
    if cfg.concept_self_weight > 0 and "lss" not in objective:
        raise DistillError("--concept-self-weight is part of lss: add lss to --objective")
    if cfg.target_mode not in ("average", "random"):
        raise DistillError("--target-mode must be 'average' or 'random'")
    if cfg.distill_view not in ("teacher_square", "anywhere"):
        raise DistillError("--distill-view must be 'teacher_square' or 'anywhere'")
    if cfg.bn_stats not in ("batch", "frozen"):
        raise DistillError(f"--bn-stats must be batch or frozen, not {cfg.bn_stats!r}")
    if cfg.hold_backbone < 0:
        raise DistillError(f"--hold-backbone must be 0 or more, not {cfg.hold_backbone}")
    if not 0 < cfg.backbone_lr_scale <= 1:
        raise DistillError(f"--backbone-lr-scale must be in (0, 1], not {cfg.backbone_lr_scale} "
                           f"(to hold the backbone for a while, use --hold-backbone)")
    if cfg.balance not in ("none", "grad"):
        raise DistillError(f"--balance must be none or grad, not {cfg.balance!r}")
    if cfg.colour_views not in ("key", "all"):
        raise DistillError(f"--colour-views must be 'key' or 'all', not {cfg.colour_views!r}")
    device = resolve_device(cfg.device)
    auto = DEVICE_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    if cfg.optimizer not in ("adamw", "sgd"):
        raise DistillError(f"--optimizer must be adamw or sgd, not {cfg.optimizer!r}")
    try:
        precision = resolve_precision(cfg.precision, device)
    except ValueError as e:
        raise DistillError(str(e)) from None
    student, init = cfg.student, cfg.init
    try:
        if student == "auto" and init not in INIT_WORDS:  # continuing a run: its architecture
            student = checkpoint_student(init) or "auto"
    except StartError as e:
        raise DistillError(str(e)) from None
    student = student if student != "auto" else auto["student"]
    init = auto_init(student, cfg.init_weights) if init == "auto" else init
    if init == "inflate" and not inflatable(student):
        raise DistillError(refusal(student))
    return dataclasses.replace(
        cfg, device=device, objective=objective, student=student, init=init,
        weight_decay=cfg.weight_decay if cfg.weight_decay >= 0 else (0.05 if cfg.optimizer == "adamw" else 5e-4),
        clip_len=cfg.clip_len or auto["clip_len"],
        batch_size=cfg.batch_size or auto["batch_size"], precision=precision)


def lr_lambda(step, warmup, total):
    """Linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def check_cache(cfg):
    """The cache must be a vidistill cache with what the run's objective reads, every teacher it distils
    from in every part. Returns its fingerprint."""
    cache_dir, objective = cfg.cache, cfg.objective
    try:
        meta = read_cache_json(cache_dir)
    except CacheError as e:
        raise DistillError(str(e)) from None
    fp = meta["fingerprint"]
    if fp.get("vidistill_version") != VIDISTILL_VERSION:
        raise DistillError(f"{cache_dir} was written by vidistill {fp.get('vidistill_version')}, "
                           f"this is {VIDISTILL_VERSION}; re-extract it")
    # structure only (every part's settings from its commit record, every shard and chunk present): cheap
    # at any size; a chunk that is present but corrupt is caught when a clip reads it
    try:
        problems, _, checked = verify_cache(cache_dir, quick=True, with_tables=False)
    except CacheError as e:  # the store refused or kept failing: its one line
        raise DistillError(str(e)) from None
    if problems:
        raise DistillError(f"{cache_dir} is damaged ({len(problems)} problem(s), e.g. {problems[0]}); "
                           "run `cli.py cache verify --repair` and extract again")
    parts = objective_parts(objective)
    if ("distinit" in parts or "lss" in parts) and fp["teacher"]["name"] == "none":
        raise DistillError(f"{cache_dir} has no teacher outputs (extracted with --teacher none); "
                           f"--objective {objective} needs them")
    if "modist" in parts and fp["flow"]["method"] == "none":
        raise DistillError(f"{cache_dir} has no optical flow (extracted with --flow none); "
                           f"--objective {objective} needs it")
    for t in distilled_teachers(cfg, fp):
        if t["name"] in checked["lacking_teachers"]:
            raise DistillError(f"{cache_dir}: {checked['lacking_teachers'][t['name']]} part(s) do not hold teacher "
                               f"{t['name']} yet: rerun its `extract --add-teacher` to finish, or leave it out "
                               "with --teacher-weight")
    return fp


def build_training(cfg, fingerprint, plan, ckpt=None):
    """Model (on cfg.device), optimiser and warmup+cosine schedule for a resolved config and plan; the
    model starts where cfg.init says, or, resuming (`ckpt`), keeps the checkpoint's start record."""
    tcfg = fingerprint["teacher"]
    concepts = load_concepts(cfg.concepts, tcfg, teacher_sources(cfg.cache, fingerprint)[0]) \
        if "lss" in objective_parts(cfg.objective) else None
    model = Distiller(cfg, distilled_teachers(cfg, fingerprint), fingerprint["flow"].get("bound"),
                      plan["momentum"], concepts).to(cfg.device)
    if cfg.channels_last:
        channels_last(model)
    try:
        model.start_record = ckpt.get("start", {"init": "scratch"}) if ckpt else model.start()
    except StartError as e:
        raise DistillError(str(e)) from None
    if cfg.precision == "bf16":
        check_convolutions(model)  # the few layers whose bf16 gradients oneDNN gets wrong train in fp32
    if cfg.compile:
        model.compile_networks()
    hold = cfg.hold_backbone
    schedule = lambda s: lr_lambda(s, plan["warmup"], plan["total"])  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    groups, schedules = [{"params": params}], [schedule]
    if hold or cfg.backbone_lr_scale != 1:  # the backbone in a group of its own, at its share of the lr:
        # held, then warmed up and decayed over the steps left
        backbone = {id(p) for p in model.backbone.parameters()}
        groups = [{"params": [p for p in params if id(p) in backbone], "lr": cfg.lr * cfg.backbone_lr_scale},
                  {"params": [p for p in params if id(p) not in backbone]}]
        schedules = [lambda s: 0.0 if s < hold else lr_lambda(s - hold, plan["warmup"], plan["total"] - hold),
                     schedule]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules)
    return model, opt, sched


def teacher_in_text_space(teacher):
    """A CLIP teacher (its cache fingerprint): its embeddings are in its text tower's space."""
    return teacher.get("space") == "clip joint"


def load_concepts(path, teacher, source):
    """The bank's vectors, refused when it is not in the teacher's space: a CLIP teacher's bank must come
    from its own text tower; an ImageNet teacher's bridge must map its classes."""
    try:
        bank = read_bank(path)
    except ConceptError as e:
        raise DistillError(str(e)) from None
    encoder = bank["text_encoder"]
    if teacher_in_text_space(teacher):
        if (encoder["name"], encoder["weights_sha256"]) != (teacher["name"], teacher["weights_sha256"]):
            raise DistillError(f"{path}: made with text encoder {encoder['name']} (weights {encoder['weights_sha256'][:12]}),"
                               f" but the cache's teacher is {teacher['name']} (weights {teacher['weights_sha256'][:12]}): "
                               f"its embeddings live in that model's space; rebuild the bank with `cli.py concepts "
                               f"--text-encoder {source['name']} --text-weights {source['weights']}`")
    elif teacher.get("num_classes") != len(bank["bridge_vectors"]):
        raise DistillError(f"{path}: its bridge maps {len(bank['bridge_vectors'])} ImageNet classes into the text "
                           f"space, but the cache's teacher ({teacher.get('name')}) has {teacher.get('num_classes')} "
                           f"outputs; lss needs the ImageNet teacher")
    bank["identity"] = {"path": os.path.abspath(path), "sha256": sha256_file(path), "text_encoder": encoder,
                        "categories": len(bank["categories"]), "descriptions": len(bank["descriptions"]),
                        "teacher_space": "joint" if teacher_in_text_space(teacher) else "bridge"}
    return bank


def all_finite(x):
    """True on every rank, or False on every rank: under DDP one rank must not skip a step alone
    (the others would wait for its gradients forever)."""
    ok = torch.isfinite(x).all().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def train_step(model, forward, opt, sched, batch, amp, measure=False):
    """One optimiser step. Returns (loss, losses, grad_norm), detached; loss None if the loss or the
    gradients were not finite (the update is skipped). `forward` is the model or its DDP wrapper.
    measure: also measure each term's share of the gradient reaching the backbone (model.shares)."""
    with amp:
        losses = forward(batch)
        loss = model.total(losses)
    opt.zero_grad(set_to_none=True)
    detached = {k: v.detach() for k, v in losses.items()}
    if not all_finite(loss.detach()):
        model.drop_step()
        return None, detached, None
    if measure:
        model.shares = model.measure_shares(losses)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], model.cfg.grad_clip)
    if not all_finite(grad_norm):  # clipping a NaN gradient still leaves NaN: skip, or the weights are lost
        opt.zero_grad(set_to_none=True)
        model.drop_step()
        return None, detached, None
    opt.step()
    sched.step()
    model.after_step()  # momentum copies and the queue move only with an accepted step
    return loss.detach(), detached, grad_norm


def run_distill(cfg):
    """The whole of `cli.py distill`: set-up, resume, the loop, teardown. Returns a summary dict.

    The run folder is locked while the run lives (RUN/.lock): a second distill into it is refused."""
    with contextlib.ExitStack() as held:  # the run folder's lock, released however the run ends
        return _run_distill(cfg, held)


def _run_distill(cfg, held):
    cfg = resolve(cfg)
    fingerprint = check_cache(cfg)
    cfg, rank, world = init_distributed(cfg)
    dataset = training_clips(cfg, fingerprint)
    cfg, plan = plan_steps(cfg, len(dataset), world, rank)
    videos = video_set(dataset.ids)
    cfg = choose_run_folder(cfg, fingerprint, world, rank, videos)
    held.enter_context(lock_run_folder(cfg.out, world, rank))
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.out, "checkpoint.pt"), os.path.join(cfg.out, "log.jsonl")
    ckpt = load_run_checkpoint(ckpt_path, cfg, fingerprint, videos, world)
    plan = continued_plan(plan, ckpt)
    if rank == 0:
        for line in describe_plan(cfg, plan, dataset.shorter_than_a_clip(), world):
            print(line)
    torch.manual_seed(cfg.seed + rank)
    model, opt, sched = build_training(cfg, fingerprint, plan, ckpt)
    step, batches_used = resume(ckpt, log_path, cfg, model, opt, sched, world, rank)
    loader = make_loader(dataset, cfg, rank, world, batches_used, plan["clips_per_video"])
    sources = teacher_sources(cfg.cache, fingerprint)
    try:  # read here, in this process: a corrupt chunk is the loader's one line too
        sample = health_sample(dataset) if rank == 0 else None
    except CacheError as e:
        raise DistillError(str(e).strip().splitlines()[-1]) from None
    run = dict(health_sample=sample, health={}, model=model, opt=opt, sched=sched, cfg=cfg, fingerprint=fingerprint, videos=videos, world=world, rank=rank,
               ckpt_path=ckpt_path, log_path=log_path, plan=plan, teacher=sources[0] if sources else {},
               teachers=[t | sources[t["slot"]] for t in model.teachers])
    first_step, t0 = step, time.time()
    step, clips, bad_steps = train_loop(run, loader, step, batches_used)
    if rank == 0:  # the checkpoint of the last step was saved in the loop
        plot_losses(log_path, os.path.join(cfg.out, "losses.png"))
    if world > 1:
        dist.destroy_process_group()
    wall = time.time() - t0
    return {"steps": step, "total_steps": plan["total"], "steps_this_run": step - first_step, "wall_seconds": wall,
            "out": cfg.out, "clips_per_s": clips / max(wall, 1e-9), "checkpoint": ckpt_path, "videos": len(dataset),
            "skipped_steps": bad_steps, "health": describe_health(run["health"]), "student": cfg.student, "start": model.start_record["init"], "device": cfg.device}


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


def training_clips(cfg, fingerprint):
    parts = objective_parts(cfg.objective)
    modist, teacher = "modist" in parts, "distinit" in parts or "lss" in parts
    # the teacher's embedding is read only when a loss uses it (--embed-weight, lss on a CLIP teacher):
    # most runs never do
    lss_field = "embed" if teacher_in_text_space(fingerprint["teacher"]) else "logits"  # the first teacher's
    fields = [teacher_array(name, t["slot"]) for t in distilled_teachers(cfg, fingerprint)
              for name in (("logits", "embed") if cfg.embed_weight > 0 else ("logits",))]
    fields += [lss_field] if "lss" in parts and lss_field not in fields else []
    # a second clip of each video: MoDist's keys, lss self-distillation's EMA view
    two_views = modist or ("lss" in parts and cfg.concept_self_weight > 0)
    try:  # rank 0 lists the committed parts for every rank: a part committed between two ranks' starts
        # would otherwise give them different videos
        ddp = dist.is_available() and dist.is_initialized()
        parts = [committed_parts(cfg.cache) if ddp and dist.get_rank() == 0 else None]
        if ddp:
            dist.broadcast_object_list(parts, src=0)
        reader = CacheReader(cfg.cache, cfg.read_cache_mb, parts=parts[0])
    except CacheError as e:
        raise DistillError(str(e)) from None
    return ClipDataset(reader, cfg.clip_len, cfg.stride, cfg.crop, with_flow=modist,
                       teacher_fields=fields, two_views=two_views, seed=cfg.seed, crop_scale=cfg.crop_scale,
                       first_view_in_teacher_square=teacher and cfg.distill_view == "teacher_square")


MIN_EPOCH_STEPS = 25  # a small cache is sampled several times per epoch, so an epoch means something


TOO_FEW_STEPS = 200  # below this a student learns little (the demo's students pass scratch at ~400)


def plan_steps(cfg, n_videos, world, rank):
    """How long the run is and what scales with it: clips per video per epoch, steps per epoch and in
    all, warm-up and key-encoder momentum (unless set); the queue is cut to the data. Returns (cfg, plan)."""
    if n_videos < cfg.batch_size * world:
        raise DistillError(f"{cfg.cache}: {n_videos} usable videos, fewer than one batch of "
                           f"{cfg.batch_size} x {world} process(es); lower --batch-size")
    clips_per_video = cfg.clips_per_video or max(1, math.ceil(MIN_EPOCH_STEPS * cfg.batch_size * world / n_videos))
    per_epoch = n_videos * clips_per_video // (cfg.batch_size * world)
    total = cfg.steps or cfg.epochs * per_epoch
    if cfg.hold_backbone >= total:  # known only here when the run is given in --epochs
        raise DistillError(f"--hold-backbone {cfg.hold_backbone} holds the backbone for the whole run ({total} steps); "
                           f"hold it for fewer steps")
    plan = {"videos": n_videos, "clips_per_video": clips_per_video, "per_epoch": per_epoch, "total": total,
            "warmup": cfg.warmup_steps or max(1, round(0.05 * total)),
            # the key encoders' time constant 1 / (1 - m) is a quarter of the run (0.99 at 400 steps)
            "momentum": cfg.momentum or min(0.999, max(0.9, 1 - 4 / total))}
    if "modist" in objective_parts(cfg.objective) and cfg.queue_size > n_videos:
        # a queue longer than the data holds several keys of the query's own video as "negatives"
        if rank == 0:
            print(f"note: --queue-size {cfg.queue_size} > {n_videos} videos in the cache; using {n_videos}")
        cfg = dataclasses.replace(cfg, queue_size=n_videos)
    return cfg, plan


def describe_plan(cfg, plan, short_videos, world):
    """What the run will do, said before it starts, and a warning when that cannot teach much."""
    p = plan
    lines = [f"plan: {p['videos']} videos x {p['clips_per_video']} clip(s) each per epoch = {p['per_epoch']} steps "
             f"of {cfg.batch_size} x {world} clips; {p['total']} steps = {p['total'] / p['per_epoch']:.1f} epochs; "
             f"warm-up {p['warmup']} steps, peak lr {cfg.lr:g}"
             + (f" (backbone {cfg.lr * cfg.backbone_lr_scale:g})" if cfg.backbone_lr_scale != 1 else "")
             + (f", key momentum {p['momentum']:.3f}" if "modist" in objective_parts(cfg.objective) else ""),
             f"student: {cfg.student}, starting from {describe_start(cfg)}"]
    lines.append(describe_precision(cfg.precision, cfg.device))  # a warning when bf16 would be emulated
    if short_videos:
        lines.append(f"note: {short_videos} of {p['videos']} videos are shorter than a clip "
                     f"({clip_span(cfg.clip_len, cfg.stride)} frames); their clips repeat the last frame")
    if p["total"] < TOO_FEW_STEPS and cfg.init in ("scratch", "auto"):  # a trained start needs fewer
        lines.append(f"warning: {p['total']} steps are too few to learn much (on the demo's videos 150 steps "
                     f"taught almost nothing, 400-600 did); e.g. `cli.py distill --cache {cfg.cache} --steps 400`")
    return lines


def describe_start(cfg):
    if cfg.init == "inflate":
        return f"its image network made temporal ({IMAGE_COUNTERPARTS[counterpart_key(cfg.student)]}{', ' + cfg.init_weights if cfg.init_weights else ''})"
    return "random weights" if cfg.init == "scratch" else cfg.init


def train_loop(run, loader, step, batches_used):
    """Optimiser steps until the run's total, logging and checkpointing. Returns (step, clips, bad_steps)."""
    model, cfg, rank, world, total = run["model"], run["cfg"], run["rank"], run["world"], run["plan"]["total"]
    device = torch.device(cfg.device)
    forward = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast(cfg.precision, device)
    bar = progress_bar(total=total, initial=step, unit="step", desc=f"distill {cfg.objective}",
                       disable=not cfg.progress or rank != 0)
    t0, clips, bad_steps = time.time(), 0, 0
    model.train()
    batches = iter(loader)
    events = TrainEvents(cfg.out, step) if rank == 0 else None  # TensorBoard, beside log.jsonl
    waited, t_log = 0.0, time.perf_counter()  # seconds blocked on the loader since the last record
    warned = False  # the training-health warning is said once
    while step < total:
        t_wait = time.perf_counter()
        try:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        except CacheError as e:  # a corrupt chunk (from a worker the message carries its traceback)
            raise DistillError(str(e).strip().splitlines()[-1]) from None
        waited += time.perf_counter() - t_wait
        batches_used += 1
        # balancing needs every step's norms; otherwise they are measured for the log only, on every rank
        # (the norms are averaged over the ranks: one rank alone would wait for the others forever)
        log_step = (step + 1) % cfg.log_every == 0 or step + 1 == total
        loss, losses, grad_norm = train_step(model, forward, run["opt"], run["sched"], batch, amp,
                                             measure=cfg.balance == "grad" or log_step)
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
            rec = {"step": step, "epoch": step // run["plan"]["per_epoch"], "loss": float(loss),
                   "lr": run["sched"].get_last_lr()[-1], "grad_norm": float(grad_norm), "clips_per_s": clips_per_s,
                   **{k: float(v) for k, v in losses.items()}, **model.shares,
                   **{f"scale/{p}": v for p, v in model.part_scales().items()}}
            if len(run["opt"].param_groups) > 1:  # the backbone's group (build_training)
                rec["lr_backbone"] = run["sched"].get_last_lr()[0]
            rec["loader_share"] = waited / max(time.perf_counter() - t_log, 1e-9)  # of the wall time since the last record
            if step % cfg.health_every == 0 or step == total:
                rec.update(measure_health(model, run["health_sample"], device, cfg.batch_size))
                run["health"] = rec
                sick = unhealthy(rec) if step > run["plan"]["warmup"] and not warned else []
                if sick:
                    warned = True
                    print(f"warning: step {step}: {', '.join(sick)} no better than a student that ignores its input "
                          f"({describe_health(rec)}, on {len(run['health_sample']['video'])} fixed clips): "
                          f"{health_advice(sick, cfg.lr)}")
            waited, t_log = 0.0, time.perf_counter()
            with open(run["log_path"], "a") as f:
                f.write(json.dumps(rec) + "\n")
            events.add(rec, losses)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}", clips_s=f"{clips_per_s:.1f}")
        if rank == 0 and (step % cfg.save_every == 0 or step == total):
            save_checkpoint(run["ckpt_path"], checkpoint_state(run, step, batches_used))
    bar.close()
    if events:
        events.close()
    return step, clips, bad_steps


# what a log.jsonl record holds besides the total and the loss terms (and the share/, objective_share/, scale/ and
# health/ figures: which term and objective drive the backbone, each objective's scale, the training-health check)
LOG_FIELDS = ("step", "epoch", "lr", "grad_norm", "clips_per_s", "loader_share")
LOG_GROUPS = ("share/", "objective_share/", "scale/", "health/")


def loss_keys(record):
    """The total and every loss term of a log record, whichever objective wrote it."""
    return [k for k in record if k not in LOG_FIELDS and not k.startswith(LOG_GROUPS)]


def plot_losses(log_path, png_path):
    """Loss curves from the JSON-lines log (every named loss and the total)."""
    if not os.path.exists(log_path):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(l) for l in open(log_path)]
    keys = loss_keys(recs[-1])
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
