"""Features of labelled videos for evaluation, and `cli.py embed`.

The labelled videos are decoded once into a frames-only cache (stage one with --teacher none and
--flow none, at the checkpoint's own fps and frame size), so evaluation reuses the same decoder,
resumability and failure records as training data. Features of every video over clips x crops views
are computed once per backbone, stored per video in HDF5 and shared by every protocol, split and
label set over those videos.
"""
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
from tqdm import tqdm

from cache.fingerprint import sha256_file
from cache.reader import CacheReader
from models.checkpoint import load_checkpoint, load_student
from models.students import build_student, inflate_from_teacher, normalize_video
from pipeline.clips import clip_span, load_clip, view_boxes, view_starts
from pipeline.config import DEVICE_DEFAULTS, INITS, DistillConfig, EvalConfig, ExtractConfig, resolve_device
from pipeline.extract import run_extract
from pipeline.runs import checkpoint_path


class EvalError(Exception):
    """Missing checkpoint, unknown option, or no usable videos; one-line message."""


@dataclass
class Preprocessing:
    """What the student saw in training; evaluation decodes and cuts clips the same way. Without a
    checkpoint: what a default CPU run would have seen."""
    fps: float = ExtractConfig.fps
    height: int = ExtractConfig.height
    width: int = ExtractConfig.width
    clip_len: int = DEVICE_DEFAULTS["cpu"]["clip_len"]
    stride: int = DistillConfig.stride
    crop: int = DistillConfig.crop
    crop_scale: float = DistillConfig.crop_scale  # fine-tuning cuts clips with the training crops
    source: str = "defaults"
    fingerprint: dict = field(default_factory=dict)


def preprocessing_of(checkpoint):
    if checkpoint is None:
        return Preprocessing()
    ckpt = load_checkpoint(checkpoint)
    pre, cfg = ckpt["cache_fingerprint"]["preprocessing"], ckpt["config"]
    return Preprocessing(pre["fps"], pre["height"], pre["width"], cfg["clip_len"], cfg["stride"], cfg["crop"],
                         cfg["crop_scale"], source=checkpoint, fingerprint=ckpt["cache_fingerprint"])


def build_eval_cache(root, out_dir, pre, with_teacher, progress, teacher_every=1):
    """Decode the labelled videos once (frames only; teacher embeddings if the teacher row needs them).

    The cache is named by the videos' folder too: video ids are relative paths, so two data roots
    with the same layout must never share one.
    """
    root_digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:8]
    name = f"cache-{root_digest}-{pre.fps:g}fps-{pre.height}x{pre.width}" + (f"-teacher{teacher_every}" if with_teacher else "")
    cache = os.path.join(out_dir, name)
    run_extract(ExtractConfig(videos=root, cache=cache, fps=pre.fps, height=pre.height, width=pre.width,
                              flow="none", teacher="efficientnet_lite0" if with_teacher else "none",
                              teacher_every=teacher_every, shard=(0, 1), progress=progress))
    return CacheReader(cache)


def load_backbone(init, checkpoint=None, student="r3d_cpu", seed=0):
    """The network of one table row: the distilled student, or a baseline of the same architecture."""
    if init == "checkpoint":
        if not checkpoint:
            raise EvalError("--init checkpoint needs --checkpoint RUN/checkpoint.pt")
        return load_student(checkpoint)[0]
    torch.manual_seed(seed)
    if init == "scratch":  # with a checkpoint: the distilled row's architecture, random weights
        arch = load_checkpoint(checkpoint)["config"]["student"] if checkpoint else student
        return build_student(arch).eval()
    if init == "inflate":
        return inflate_from_teacher(build_student("efficientnet3d_lite0")).eval()
    raise EvalError(f"unknown --init {init!r}; choose from {', '.join(INITS)}")


@torch.no_grad()
def video_features(backbone, reader, ids, pre, clips, crops, device, batch_size, progress, desc):
    """[N, clips*crops, D] float32 features, one row of views per video."""
    backbone = backbone.to(device).eval()
    span = clip_span(pre.clip_len, pre.stride)
    boxes = view_boxes(pre.height, pre.width, crops)
    feats = []
    for vid in tqdm(ids, desc=desc, unit="video", disable=not progress, dynamic_ncols=True):
        views = [load_clip(reader, vid, int(s), pre.clip_len, pre.stride, box, False, pre.crop, False)[0]
                 for s in view_starts(reader.num_frames(vid), clips, span) for box in boxes]
        video = torch.stack(views).to(device)  # [V,3,T,S,S]
        out = torch.cat([backbone(normalize_video(video[i:i + batch_size])) for i in range(0, len(video), batch_size)])
        feats.append(out.float().cpu().numpy())
    return np.stack(feats)


def teacher_features(reader, ids):
    """The 2D teacher baseline: its 1280-d embedding averaged over every frame it saw. [N,1,1280]."""
    return np.stack([reader.read(v, fields=("embed",))["embed"].astype(np.float32).mean(0, keepdims=True)
                     for v in ids])


def feature_attrs(init, cfg, root, pre, views):
    """What a row's features depend on (the task, split and labels are not among them): the key of
    its feature store. root: the folder the video ids are relative to."""
    return {"init": init, "views": views, "root": os.path.abspath(root),
            "checkpoint": os.path.abspath(cfg.checkpoint) if cfg.checkpoint and init in ("checkpoint", "scratch") else None,
            # the weights' content, not the file's path or time: a copied or retrained checkpoint
            # never reuses stale features
            "checkpoint_sha256": sha256_file(cfg.checkpoint) if cfg.checkpoint and init == "checkpoint" else None,
            "seed": cfg.seed if init in ("scratch", "inflate") else None,
            "preprocessing": dataclasses.asdict(pre) | {"fingerprint": None},
            "student": cfg.student if init == "scratch" and not cfg.checkpoint else None}


def stored_features(path, ids, compute, attrs):
    """[len(ids), V, D] features of these videos, computing only the ones the HDF5 store lacks.

    The store holds one row per video (ids, features) for one backbone and view protocol (attrs), so
    every task, split and label set over the same videos shares it: UCF101's three splits, or the
    object and motion labels of one folder, compute each video's features once.
    """
    have = {}
    if os.path.exists(path):
        with h5py.File(path, "r") as f:
            if json.loads(f.attrs.get("config", "{}")) == attrs:
                feats = f["features"][()]
                have = {i.decode(): feats[k] for k, i in enumerate(f["ids"][()])}
    todo = [i for i in ids if i not in have]
    if todo:
        have.update(zip(todo, compute(todo)))
        keys = sorted(have)
        tmp = f"{path}.{os.getpid()}.tmp"  # two evals sharing a work folder never write one file
        with h5py.File(tmp, "w") as f:
            f.attrs["config"] = json.dumps(attrs, sort_keys=True)
            f.create_dataset("ids", data=np.array([i.encode() for i in keys], dtype=h5py.string_dtype()))
            f.create_dataset("features", data=np.stack([have[i] for i in keys]), compression="gzip")
        os.replace(tmp, path)  # atomic: a killed eval leaves the old store or the new one
    return np.stack([have[i] for i in ids])


def run_embed(videos, checkpoint, out, clips, crops, per_clip, device, batch_size=EvalConfig.batch_size, progress=True):
    """Per-video student features for downstream users: HDF5 with ids, features and the config."""
    checkpoint = checkpoint_path(checkpoint)
    if not os.path.isfile(checkpoint):
        raise EvalError(f"{checkpoint}: checkpoint not found")
    pre = preprocessing_of(checkpoint)
    reader = build_eval_cache(videos, out + ".cache", pre, False, progress)
    if not reader.ids:
        raise EvalError(f"{videos}: no video could be decoded (see `cli.py cache info {reader.cache_dir}`)")
    backbone = load_student(checkpoint)[0]
    feats = video_features(backbone, reader, reader.ids, pre, clips, crops, torch.device(resolve_device(device)),
                           batch_size, progress, "embed")
    tmp = f"{out}.{os.getpid()}.tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=np.array([i.encode() for i in reader.ids], dtype=h5py.string_dtype()))
        f.create_dataset("features", data=feats.mean(1), compression="gzip")
        if per_clip:
            f.create_dataset("clip_features", data=feats, compression="gzip")
        f.attrs["config"] = json.dumps({"checkpoint": os.path.abspath(checkpoint), "clips": clips, "crops": crops,
                                        "preprocessing": dataclasses.asdict(pre) | {"fingerprint": None},
                                        "cache_fingerprint": pre.fingerprint}, sort_keys=True)
    os.replace(tmp, out)
    failed = [(i, r["error"]) for i, (_, r) in reader.index.items() if r["status"] == "failed"]
    return {"videos": len(reader.ids), "dim": feats.shape[-1], "out": out, "failed": failed}
