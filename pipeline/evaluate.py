"""`cli.py eval`: measure a student the way the literature does, baselines in the same table.

For each row (the checkpoint, scratch, inflate, teacher) the features of the task's videos come from
pipeline/features.py, the frozen protocols from pipeline/protocols.py and fine-tuning from
pipeline/finetune.py; this module runs them and writes results.json and results.md, every number
with its task, split, protocol, views, checkpoint and seed.
"""
import dataclasses
import datetime
import hashlib
import json
import os

import numpy as np
import torch

from pipeline.config import INITS, PROTOCOLS, resolve_device
from pipeline.features import (EvalError, build_eval_cache, feature_attrs, load_backbone, preprocessing_of,
                               stored_features, teacher_features, video_features)
from pipeline.finetune import finetune
from pipeline.protocols import knn_classify, linear_probe, retrieval
from pipeline.runs import checkpoint_path, latest_run
from pipeline.tasks import OFFICIAL, default_root, load_task

# the columns of the printed table, in order; a column is shown when some row has it
MAIN_METRICS = [("linear", "video_top1"), ("linear", "clip_top1"), ("knn", "k20_top1"), ("knn", "k200_top1"),
                ("retrieval", "R@1"), ("retrieval", "R@5"), ("finetune", "video_top1")]


def check_options(cfg):
    for init in cfg.rows():
        if init not in INITS:
            raise EvalError(f"unknown --init {init!r}; choose from {', '.join(INITS)}")
    for p in cfg.protocols:
        if p not in PROTOCOLS:
            raise EvalError(f"unknown --protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    if cfg.crops not in (1, 3):
        raise EvalError("--crops must be 1 or 3")
    if cfg.checkpoint and not os.path.isfile(cfg.checkpoint):
        raise EvalError(f"{cfg.checkpoint}: checkpoint not found")


def with_defaults(cfg):
    """Fill what the user left out: the benchmark's default data root, and the latest distill run's
    checkpoint (a run folder stands for its checkpoint.pt). Returns (cfg, notes)."""
    notes = []
    root, checkpoint = cfg.root, cfg.checkpoint
    if not root:
        if cfg.task not in OFFICIAL:
            raise EvalError(f"--task {cfg.task} needs --root (the folder with the labelled videos)")
        root = default_root(cfg.task)
    if checkpoint is None and latest_run():
        checkpoint = os.path.join(latest_run(), "checkpoint.pt")
        notes.append(f"checkpoint: {checkpoint} (the latest distill run; --checkpoint to choose another)")
    elif checkpoint:
        checkpoint = checkpoint_path(checkpoint)
    return dataclasses.replace(cfg, root=root, checkpoint=checkpoint), notes


def run_eval(cfg):
    """The whole of `cli.py eval`. Returns (rows, task, report lines)."""
    cfg, notes = with_defaults(cfg)
    check_options(cfg)
    device = torch.device(resolve_device(cfg.device))
    task = load_task(cfg.task, cfg.root, cfg.split, cfg.splits, cfg.test_fraction, cfg.seed, cfg.train_list, cfg.test_list,
                     cfg.labels, cfg.label_column, cfg.id_column, cfg.group_pattern)
    os.makedirs(cfg.out, exist_ok=True)
    pre = preprocessing_of(cfg.checkpoint)
    work = cfg.work or cfg.out
    # task.root: the folder the video ids are relative to (e.g. ROOT/UCF-101 of an official layout)
    reader = build_eval_cache(task.root, work, pre, "teacher" in cfg.rows(), cfg.progress, cfg.teacher_every)
    usable = set(reader.ids)
    train = [(vid, label) for vid, _, label in task.train if vid in usable]
    test = [(vid, label) for vid, _, label in task.test if vid in usable]
    if not train or not test:
        raise EvalError(f"{task.describe()}: no decodable train or test videos")
    unreadable = len(task.train) + len(task.test) - len(train) - len(test)
    notes += [task.describe()] + ([f"{unreadable} videos failed to decode (see `cli.py cache info {reader.cache_dir}`)"]
                                 if unreadable else [])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for init in cfg.rows():
        results, attrs, store = evaluate_row(init, cfg, reader, task, train, test, pre, device, work, notes)
        for protocol, metrics in results.items():
            for metric, value in metrics.items():
                rows.append({"task": task.name, "split": task.split, "init": init, "protocol": protocol,
                             "metric": metric, "value": value,
                             "views": attrs["views"] if protocol != "finetune" else f"{cfg.clips} clips x {cfg.crops} crops",
                             "checkpoint": attrs["checkpoint"], "features": os.path.abspath(store),
                             # the distillation cache the checkpoint learnt from; baselines learnt nothing from it
                             "cache_fingerprint": pre.fingerprint if init == "checkpoint" else None,
                             "seed": cfg.seed, "date": date, "train_videos": len(train), "test_videos": len(test)})
    write_reports(cfg.out, rows, notes)
    return rows, task, notes


def evaluate_row(init, cfg, reader, task, train, test, pre, device, work, notes):
    """One row of the table: its features (from the store, computing what it lacks) through every
    protocol asked for. Returns ({protocol: metrics}, what the features depend on, feature store path)."""
    views = f"teacher embeddings of every {cfg.teacher_every}. frame averaged (2D)" if init == "teacher" else \
        f"{cfg.clips} clips x {cfg.crops} crops, {pre.clip_len}x{pre.crop}^2 stride {pre.stride}"
    attrs = feature_attrs(init, cfg, task.root, pre, views)
    backbone = None if init == "teacher" else load_backbone(init, cfg.checkpoint, cfg.student, cfg.seed)

    def compute(ids):
        return teacher_features(reader, ids) if init == "teacher" else video_features(
            backbone, reader, ids, pre, cfg.clips, cfg.crops, device, cfg.batch_size, cfg.progress, f"features {init}")
    digest = hashlib.sha1(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:12]
    store = os.path.join(work, f"features-{init}-{digest}.h5")
    feats = stored_features(store, [v for v, _ in train + test], compute, attrs)
    trf, tef = feats[:len(train)], feats[len(train):]
    trl, tel = np.array([label for _, label in train]), np.array([label for _, label in test])
    num_classes = len(task.classes)
    results = {}
    if "linear" in cfg.protocols:
        results["linear"] = linear_probe(trf, trl, tef, tel, num_classes, cfg.seed)
    if "knn" in cfg.protocols:
        results["knn"] = knn_classify(trf, trl, tef, tel, num_classes)
    if "retrieval" in cfg.protocols:
        results["retrieval"] = retrieval(trf, trl, tef, tel)
    if "finetune" in cfg.protocols:
        if init == "teacher":
            notes.append("finetune skipped for the 2D teacher row (not a video network)")
        else:
            fresh = load_backbone(init, cfg.checkpoint, cfg.student, cfg.seed)  # features must not see tuned weights
            results["finetune"] = finetune(fresh, reader, train, test, num_classes, pre, cfg, device)
    return results, attrs, store


def format_table(rows):
    cols = [(p, m) for p, m in MAIN_METRICS if any(r["protocol"] == p and r["metric"] == m for r in rows)]
    inits = list(dict.fromkeys(r["init"] for r in rows))
    value = {(r["init"], r["protocol"], r["metric"]): r["value"] for r in rows}
    header = "| init | " + " | ".join(f"{p} {m}" for p, m in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    for init in inits:
        cells = [f"{100 * value[(init, p, m)]:.1f}" if (init, p, m) in value else "–" for p, m in cols]
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(out, rows, notes):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"notes": notes, "results": rows}, f, indent=2)
    r0 = rows[0] if rows else {}
    protocol = (f"task {r0.get('task')} split {r0.get('split')}, seed {r0.get('seed')}, "
                f"{r0.get('train_videos')} train / {r0.get('test_videos')} test videos; views: "
                + "; ".join(sorted({f"{r['init']}: {r['views']}" for r in rows})))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Evaluation\n\n{protocol}\n\nAccuracy in %. linear: logistic regression on frozen "
                f"L2-normalised features; knn: cosine, T 0.07 weighted vote; retrieval: test queries the train "
                f"set.\n\n{format_table(rows)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
