"""One table row's features: which network or teacher computes them, what they depend on (the key of
their store), and the store that keeps them."""
import dataclasses
import hashlib
import json
import os
import re

from cache.fingerprint import sha256_file
from pipeline.common.config import is_teacher_row
from pipeline.common.precision import resolve_precision
from pipeline.common.teacher_spec import parse_teacher
from pipeline.evaluate.backbones import concept_model, load_backbone, video_features
from pipeline.evaluate.feature_store import FEATURES_DIR, stored_features
from pipeline.evaluate.teacher_row import in_text_space, teacher_row


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
    if cfg.precision == "bf16" and not is_teacher_row(init):
        # bf16 features differ from fp32's in the third digit: a store of their own (fp32's key is unchanged,
        # so stores written before --precision existed are still found)
        attrs["precision"] = "bf16"
    if teacher is not None:
        attrs["teacher"] = teacher
    return attrs


def row_features(init, cfg, reader, ids, root, pre, device, work, space=None):
    """[len(ids), V, D] features of one table row (from its store, computing what it lacks), the
    attrs they depend on and the store's path. space: zeroshot's concept space ({"identity", "bridge"}):
    the row's embeddings in that text space instead of its backbone features."""
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))  # "auto": this machine's
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
                                  cfg.progress, f"{'concepts' if space else 'features'} {init}", cfg.precision)
    attrs = feature_attrs(init, cfg, root, pre, views_of(init, cfg, pre), teacher)
    if space:
        attrs["concept_space"] = space["identity"]
    digest = hashlib.sha1(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", init)  # teacher:timm:ARCH
    store = os.path.join(work, FEATURES_DIR, f"{name}{'-concepts' if space else ''}-{digest}.h5")
    return stored_features(store, ids, compute, attrs), attrs, store
