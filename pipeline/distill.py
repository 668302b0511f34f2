"""Stage two: train a 3D student against the cache alone (DistInit, MoDist, or both).

Never imports or builds the teacher: soft targets and embeddings come from the cache, so a step
costs only the student (and the motion pathway). Runs single-process or under torchrun (DDP).
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from cache.fingerprint import VIDISTILL_VERSION, CacheError, read_cache_json, sha256_file
from cache.manifest import verify_cache
from cache.reader import CacheReader
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.students import ProjectionHead, build_motion_pathway, build_student, normalize_video
from pipeline.clips import ClipDataset, clip_span, colour_augment
from pipeline.config import DEVICE_DEFAULTS, DistillConfig, objective_parts, resolve_device
from pipeline.locks import FileLock, LockBusy
from pipeline.concepts import ConceptError, read_bank
from pipeline.losses import (bridged_teacher, concept_align, concept_distill, distill_kl, embed_cosine, info_nce,
                             joint_teacher, teacher_targets)
from pipeline.runs import RUN_LOCK, latest_run, new_run_dir, point_latest
from pipeline.tblog import TrainEvents

class DistillError(Exception):
    """Bad arguments, an unusable cache or an incompatible checkpoint; one-line message."""


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
    if cfg.colour_views not in ("key", "all"):
        raise DistillError(f"--colour-views must be 'key' or 'all', not {cfg.colour_views!r}")
    device = resolve_device(cfg.device)
    auto = DEVICE_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    if cfg.optimizer not in ("adamw", "sgd"):
        raise DistillError(f"--optimizer must be adamw or sgd, not {cfg.optimizer!r}")
    return dataclasses.replace(
        cfg, device=device, objective=objective,
        weight_decay=cfg.weight_decay if cfg.weight_decay >= 0 else (0.05 if cfg.optimizer == "adamw" else 5e-4),
        student=cfg.student if cfg.student != "auto" else auto["student"],
        clip_len=cfg.clip_len or auto["clip_len"],
        batch_size=cfg.batch_size or auto["batch_size"])


class Distiller(nn.Module):
    """The student backbone plus whatever the objective needs: heads, motion pathway, momentum copies."""

    def __init__(self, cfg, num_classes, embed_dim, flow_bound, momentum=0.99, concepts=None):
        super().__init__()
        self.cfg = cfg
        self.momentum = momentum  # of the key encoders: from the run's plan unless set
        self.flow_bound = flow_bound  # the cache's flow bound scales flow inputs to about [-1, 1]
        self.backbone = build_student(cfg.student)
        d = self.backbone.feature_dim
        parts = objective_parts(cfg.objective)
        self.use_distinit, self.use_modist, self.use_lss = ("distinit" in parts), ("modist" in parts), ("lss" in parts)
        if self.use_lss:
            # the concept bank as fixed buffers (saved with the weights): nothing text-side runs in the loop
            for key in ("category_vectors", "description_vectors", "membership", "bridge_vectors"):
                self.register_buffer(key, torch.as_tensor(concepts[key], dtype=torch.float32))
            self.concept_head = ProjectionHead(d, dim_out=self.category_vectors.shape[1])
        # LSS self-distillation's teacher: an EMA copy of the student and its concept head
        self.ema_concepts = None
        if self.use_lss and cfg.concept_self_weight > 0:
            self.ema_concepts = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.concept_head))
            self.ema_concepts.requires_grad_(False)
        self.bank = concepts["identity"] if self.use_lss else None  # which bank: saved in the checkpoint
        # a CLIP teacher's cached embeddings already live in the bank's space; an ImageNet teacher's
        # logits reach it through the bridge
        self.teacher_in_text_space = self.use_lss and concepts["identity"]["teacher_space"] == "joint"
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
            self.register_buffer("queue_ids", torch.full((cfg.queue_size,), -1, dtype=torch.long))  # video of each key
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        """Every momentum copy (MoDist's key encoders, lss's EMA teacher) moves towards the student."""
        m, pairs = self.momentum, []
        if self.use_modist:
            pairs += [(nn.Sequential(self.backbone, self.proj_rgb), self.key_rgb),
                      (nn.Sequential(self.motion, self.proj_flow), self.key_flow)]
        if self.ema_concepts is not None:
            pairs.append((nn.Sequential(self.backbone, self.concept_head), self.ema_concepts))
        for q_mod, k_mod in pairs:
            for q, k in zip(q_mod.parameters(), k_mod.parameters()):
                k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, k_rgb, k_flow, ids):
        k_rgb, k_flow, ids = all_gather(k_rgb), all_gather(k_flow), all_gather(ids)
        n, size = len(k_rgb), len(self.queue_rgb)
        idx = (self.queue_ptr + torch.arange(n, device=k_rgb.device)) % size
        self.queue_rgb[idx] = k_rgb.to(self.queue_rgb.dtype)
        self.queue_flow[idx] = k_flow.to(self.queue_flow.dtype)
        self.queue_ids[idx] = ids
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def augment(self, video):
        """Colour augmentations on the device, one draw per clip (geometry was drawn in the loader)."""
        cfg = self.cfg
        if cfg.jitter_p == cfg.grayscale_p == cfg.blur_p == 0:
            return video
        return colour_augment(video, cfg.jitter, cfg.hue, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p)

    def forward(self, batch):
        """Returns a dict of named scalar losses for one batch (already on the device)."""
        cfg, losses = self.cfg, {}
        self.momentum_update()
        video = self.augment(batch["video"]) if cfg.colour_views == "all" else batch["video"]
        feat = self.backbone(normalize_video(video))  # [B,D]
        if self.use_distinit:
            target = teacher_targets(batch["teacher_logits"], batch["teacher_mask"], cfg.tau, cfg.target_mode)
            losses["distinit"] = distill_kl(self.distill_head(feat), target, cfg.tau)
            if self.embed_head is not None:
                losses["embed"] = embed_cosine(self.embed_head(feat), batch["teacher_embed"], batch["teacher_mask"])
        if self.use_modist:
            losses.update(self.contrastive_losses(feat, batch))
        if self.use_lss:
            losses.update(self.concept_losses(feat, batch))
        return losses

    def concept_losses(self, feat, batch):
        """LSS: the student's distributions over the bank's concepts match the teacher's (concept
        distillation), and its category distribution, carried through the membership, agrees with its
        own description distribution (concept alignment)."""
        cfg = self.cfg
        student = self.concept_head(feat)  # [B,D] unit
        teacher = (joint_teacher(batch["teacher_embed"], batch["teacher_mask"]) if self.teacher_in_text_space
                   else bridged_teacher(batch["teacher_logits"], batch["teacher_mask"], self.bridge_vectors))  # [B,D]
        def distill(target):  # over the categories and over the descriptions
            return sum(concept_distill(student, target, vectors, cfg.concept_tau, cfg.concept_teacher_tau)
                       for vectors in (self.category_vectors, self.description_vectors))
        losses = {"concept": distill(teacher)}
        if self.ema_concepts is not None:  # the EMA student's view of another clip of the video
            with torch.no_grad():
                video2 = normalize_video(self.augment(batch["video2"]))
                ema = shuffled_forward(self.ema_concepts, video2, cfg.shuffle_bn_groups)  # [B,D] unit
            losses["concept_self"] = distill(ema)
        if cfg.align_weight > 0:
            losses["align"] = concept_align(student, self.category_vectors, self.description_vectors, self.membership,
                                            cfg.concept_tau)
        return losses

    def contrastive_losses(self, feat, batch):
        """MoDist: the student's clip (query) against the momentum encoders' keys of another clip of
        the same video, in both modalities, with the queue as negatives."""
        cfg, ids = self.cfg, batch["index"] if self.cfg.mask_own_video else None
        q_rgb = self.proj_rgb(feat)  # [B,128]
        q_flow = self.proj_flow(self.motion(batch["flow"].float() / self.flow_bound))  # [B,128]
        with torch.no_grad():
            video2 = normalize_video(self.augment(batch["video2"]))
            k_rgb = shuffled_forward(self.key_rgb, video2, cfg.shuffle_bn_groups)
            k_flow = shuffled_forward(self.key_flow, batch["flow2"].float() / self.flow_bound, cfg.shuffle_bn_groups)
        # copies: enqueue() below overwrites the buffers in place, which autograd must not see
        queue_rgb, queue_flow, queue_ids = self.queue_rgb.clone(), self.queue_flow.clone(), self.queue_ids.clone()

        def nce(query, key, queue):
            return info_nce(query, key, queue, cfg.nce_tau, ids=ids, queue_ids=queue_ids)
        losses = {"rgb_nce": nce(q_rgb, k_rgb, queue_rgb),
                  # summed, not averaged: in flow->rgb the RGB side is a key without gradient, so the
                  # student's gradient comes from rgb->flow alone and --cross-weight w gives it w
                  "cross_nce": nce(q_rgb, k_flow, queue_flow) + nce(q_flow, k_rgb, queue_rgb)}
        if cfg.flow_weight > 0:
            losses["flow_nce"] = nce(q_flow, k_flow, queue_flow)
        self.enqueue(k_rgb, k_flow, batch["index"])
        return losses

    def total(self, losses):
        cfg = self.cfg
        weights = {"distinit": cfg.distinit_weight, "embed": cfg.embed_weight * cfg.distinit_weight,
                   "rgb_nce": cfg.modist_weight, "flow_nce": cfg.modist_weight * cfg.flow_weight,
                   "cross_nce": cfg.modist_weight * cfg.cross_weight,
                   "concept": cfg.lss_weight, "align": cfg.lss_weight * cfg.align_weight,
                   "concept_self": cfg.lss_weight * cfg.concept_self_weight}
        return sum(weights[k] * v for k, v in losses.items())


def shuffled_forward(encoder, x, groups):
    """A key encoder's forward with shuffle-BN (MoCo, section 3.3): in train mode, BatchNorm statistics
    of a batch whose order matches the queries' would let a query tell its key from the negatives.
    Under DDP the batch is shuffled across processes, as MoCo does; on one device it is permuted and
    normalised in `groups` sub-batches. Outputs come back in the input's order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, rank = dist.get_world_size(), dist.get_rank()
        x_all = all_gather(x)
        perm = torch.randperm(len(x_all), device=x.device)
        dist.broadcast(perm, src=0)
        out_all = all_gather(encoder(x_all[perm.view(world, -1)[rank]]))
        return out_all[torch.argsort(perm).view(world, -1)[rank]]
    perm = torch.randperm(len(x), device=x.device)
    out = torch.cat([encoder(chunk) for chunk in x[perm].chunk(max(1, groups))])
    return out[torch.argsort(perm)]


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
        # n items: videos x clips per video; the dataset maps item i to video i % videos
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
    parts = objective_parts(objective)
    if ("distinit" in parts or "lss" in parts) and fp["teacher"]["name"] == "none":
        raise DistillError(f"{cache_dir} has no teacher outputs (extracted with --teacher none); "
                           f"--objective {objective} needs them")
    if "modist" in parts and fp["flow"]["method"] == "none":
        raise DistillError(f"{cache_dir} has no optical flow (extracted with --flow none); "
                           f"--objective {objective} needs it")
    return fp


def build_training(cfg, fingerprint, plan):
    """Model (on cfg.device), optimiser and warmup+cosine schedule for a resolved config and plan."""
    tcfg = fingerprint["teacher"]
    concepts = load_concepts(cfg.concepts, tcfg, teacher_source(cfg.cache, fingerprint)) \
        if "lss" in objective_parts(cfg.objective) else None
    model = Distiller(cfg, tcfg.get("num_classes"), tcfg.get("embed_dim"), fingerprint["flow"].get("bound"),
                      plan["momentum"], concepts).to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, plan["warmup"], plan["total"]))
    return model, opt, sched


def teacher_source(cache_dir, fingerprint):
    """How the cache's teacher was loaded (name as given to extract, weights file, sha256): an evaluation
    runs the same teacher for its teacher row, without the cache at hand."""
    extracted = read_cache_json(cache_dir).get("config", {})
    return {"name": extracted.get("teacher"), "weights": extracted.get("teacher_weights"),
            "weights_sha256": fingerprint["teacher"].get("weights_sha256")}


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
                "warmup_steps", "momentum", "distinit_weight", "modist_weight", "cross_weight", "flow_weight",
                "distill_view", "colour_views", "jitter", "concepts", "lss_weight", "align_weight", "concept_tau",
                "concept_teacher_tau", "concept_self_weight", "hue", "jitter_p", "grayscale_p", "blur_p", "shuffle_bn_groups",
                "mask_own_video")


def run_distill(cfg):
    """The whole of `cli.py distill`: set-up, resume, the loop, teardown. Returns a summary dict.

    The run folder is locked while the run lives (RUN/.lock): a second distill into it is refused."""
    with contextlib.ExitStack() as held:  # the run folder's lock, released however the run ends
        return _run_distill(cfg, held)


def _run_distill(cfg, held):
    cfg = resolve(cfg)
    fingerprint = check_cache(cfg.cache, cfg.objective)
    cfg, rank, world = init_distributed(cfg)
    dataset = training_clips(cfg, fingerprint)
    cfg, plan = plan_steps(cfg, len(dataset), world, rank)
    if rank == 0:
        for line in describe_plan(cfg, plan, dataset.shorter_than_a_clip(), world):
            print(line)
    videos = video_set(dataset.ids)
    cfg = choose_run_folder(cfg, fingerprint, world, rank, videos)
    held.enter_context(lock_run_folder(cfg.out, world, rank))
    torch.manual_seed(cfg.seed + rank)
    model, opt, sched = build_training(cfg, fingerprint, plan)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.out, "checkpoint.pt"), os.path.join(cfg.out, "log.jsonl")
    step, batches_used = resume(ckpt_path, log_path, cfg, fingerprint, videos, model, opt, sched, world, rank)
    loader = make_loader(dataset, cfg, rank, world, batches_used, plan["clips_per_video"])
    run = dict(model=model, opt=opt, sched=sched, cfg=cfg, fingerprint=fingerprint, videos=videos, world=world, rank=rank,
               ckpt_path=ckpt_path, log_path=log_path, plan=plan, teacher=teacher_source(cfg.cache, fingerprint))
    first_step, t0 = step, time.time()
    step, clips, bad_steps = train_loop(run, loader, step, batches_used)
    if rank == 0:  # the checkpoint of the last step was saved in the loop
        plot_losses(log_path, os.path.join(cfg.out, "losses.png"))
    if world > 1:
        dist.destroy_process_group()
    wall = time.time() - t0
    return {"steps": step, "total_steps": plan["total"], "steps_this_run": step - first_step, "wall_seconds": wall,
            "out": cfg.out, "clips_per_s": clips / max(wall, 1e-9), "checkpoint": ckpt_path, "videos": len(dataset),
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


def training_clips(cfg, fingerprint):
    parts = objective_parts(cfg.objective)
    modist, teacher = "modist" in parts, "distinit" in parts or "lss" in parts
    # the teacher's embedding is read only when a loss uses it (--embed-weight, lss on a CLIP teacher):
    # most runs never do
    embeds = ("distinit" in parts and cfg.embed_weight > 0) or ("lss" in parts and teacher_in_text_space(fingerprint["teacher"]))
    fields = ("logits", "embed") if embeds else ("logits",) if teacher else ()
    # a second clip of each video: MoDist's keys, lss self-distillation's EMA view
    two_views = modist or ("lss" in parts and cfg.concept_self_weight > 0)
    return ClipDataset(CacheReader(cfg.cache, cfg.read_cache_mb), cfg.clip_len, cfg.stride, cfg.crop, with_flow=modist,
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
             + (f", key momentum {p['momentum']:.3f}" if "modist" in objective_parts(cfg.objective) else "")]
    if short_videos:
        lines.append(f"note: {short_videos} of {p['videos']} videos are shorter than a clip "
                     f"({clip_span(cfg.clip_len, cfg.stride)} frames); their clips repeat the last frame")
    if p["total"] < TOO_FEW_STEPS:
        lines.append(f"warning: {p['total']} steps are too few to learn much (on the demo's videos 150 steps "
                     f"taught almost nothing, 400-600 did); e.g. `cli.py distill --cache {cfg.cache} --steps 400`")
    return lines


def video_set(ids):
    """Which videos a run trains on: a cache that grew or was repaired since changes the epoch length,
    the schedule and the sampler, so a resume must see the same set."""
    return {"count": len(ids), "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def settings_changed(ckpt, cfg, fingerprint, world, videos):
    """Why a checkpoint cannot be resumed with these settings and videos (empty: it can)."""
    old = dict(ckpt["config"], cache=os.path.normpath(ckpt["config"].get("cache", "")))  # cache/ is cache
    new = dict(dataclasses.asdict(cfg), cache=os.path.normpath(cfg.cache))
    # a key newer than the checkpoint: it trained at that key's default
    changed = [k for k in _RESUME_KEYS if old.get(k, getattr(DistillConfig, k)) != new[k]]
    if ckpt.get("world_size", 1) != world:
        changed.append(f"{ckpt.get('world_size', 1)} -> {world} processes")
    if ckpt["cache_fingerprint"] != fingerprint:
        changed.append("a cache with another fingerprint")
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
        out = out or new_run_dir(cfg.objective)
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


def resume(ckpt_path, log_path, cfg, fingerprint, videos, model, opt, sched, world, rank):
    """Load the run's checkpoint if there is one, refusing other settings. Returns (step, batches_used)."""
    if not os.path.exists(ckpt_path):
        return 0, 0
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        raise DistillError(str(e)) from None
    changed = settings_changed(ckpt, cfg, fingerprint, world, videos)
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


def make_loader(dataset, cfg, rank, world, batches_used, clips_per_video=1):
    """One DataLoader for the whole run, starting where the last run stopped."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size,
        sampler=ClipSampler(len(dataset) * clips_per_video, cfg.seed, rank, world, cfg.batch_size, batches_used),
        num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"), persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers else None, multiprocessing_context="spawn" if cfg.workers else None,
        # its own generator: creating the iterator would otherwise draw from the global one, which the
        # step's augmentations use, and a resumed run would draw one number more than a straight one
        generator=torch.Generator().manual_seed(cfg.seed))


def checkpoint_state(run, step, batches_used):
    cuda = run["cfg"].device.startswith("cuda")
    return {"model": run["model"].state_dict(), "optimizer": run["opt"].state_dict(),
            "scheduler": run["sched"].state_dict(), "step": step, "batches_used": batches_used,
            "world_size": run["world"],
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None},
            "config": dataclasses.asdict(run["cfg"]), "cache_fingerprint": run["fingerprint"], "videos": run["videos"],
            "plan": run["plan"],
            "feature_dim": run["model"].backbone.feature_dim, "vidistill_version": VIDISTILL_VERSION,
            "concepts": run["model"].bank, "teacher": run["teacher"]}


def train_loop(run, loader, step, batches_used):
    """Optimiser steps until the run's total, logging and checkpointing. Returns (step, clips, bad_steps)."""
    model, cfg, rank, world, total = run["model"], run["cfg"], run["rank"], run["world"], run["plan"]["total"]
    device = torch.device(cfg.device)
    forward = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast(device)
    bar = tqdm(total=total, initial=step, unit="step", desc=f"distill {cfg.objective}",
               disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    t0, clips, bad_steps = time.time(), 0, 0
    model.train()
    batches = iter(loader)
    events = TrainEvents(cfg.out, step) if rank == 0 else None  # TensorBoard, beside log.jsonl
    waited, t_log = 0.0, time.perf_counter()  # seconds blocked on the loader since the last record
    while step < total:
        t_wait = time.perf_counter()
        try:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        except CacheError as e:  # a corrupt chunk (from a worker the message carries its traceback)
            raise DistillError(str(e).strip().splitlines()[-1]) from None
        waited += time.perf_counter() - t_wait
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
            rec = {"step": step, "epoch": step // run["plan"]["per_epoch"], "loss": float(loss),
                   "lr": run["sched"].get_last_lr()[0], "grad_norm": float(grad_norm), "clips_per_s": clips_per_s,
                   **{k: float(v) for k, v in losses.items()}}
            rec["loader_share"] = waited / max(time.perf_counter() - t_log, 1e-9)  # of the wall time since the last record
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
