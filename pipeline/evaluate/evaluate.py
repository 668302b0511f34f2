"""`cli.py eval`: measure a student the way the literature does, baselines in the same table.

For each row (the checkpoint, scratch, inflate, teacher) the frames come from frames.py and the
features from rows.py (which keeps them in feature_store.py), the frozen protocols from protocols.py
and fine-tuning from finetune.py (all in pipeline/evaluate/); this module runs them and writes
results.json and results.md, every number with its task, split, protocol, views, checkpoint and seed.
"""

import collections
import dataclasses
import datetime
import functools
import os

import numpy as np
import torch

from cache.fingerprint import sha256_file
from models.checkpoint import load_checkpoint
from models.start import record_label
from pipeline.common.config import INITS, PROTOCOLS, group_rule, is_teacher_row, resolve_device
from pipeline.common.errors import EvalError
from pipeline.common.precision import describe_precision, resolve_precision
from pipeline.common.runs import checkpoint_path, latest_run
from pipeline.common.teacher_spec import render_teacher
from pipeline.evaluate.backbones import concept_head_of, load_backbone
from pipeline.evaluate.eval_events import write_eval_events
from pipeline.evaluate.finetune import finetune
from pipeline.evaluate.frames import frames_source, preprocessing_of, pretrained_on
from pipeline.evaluate.protocols import chance_level, knn_classify, linear_probe, retrieval, wilson_interval, zero_shot
from pipeline.evaluate.report import NOT_ACCURACY, write_reports
from pipeline.evaluate.rows import row_features
from pipeline.evaluate.tasks import OFFICIAL, compile_group_pattern, default_root, group_of, load_task

SMALL_TEST_SET = 30  # fewer test videos: a 95 % interval wider than about ±17 points, too wide to rank rows


def check_options(cfg):
    for init in cfg.rows():
        if init not in INITS and not is_teacher_row(init):
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
    latest = latest_run() if checkpoint is None else None
    if latest:
        checkpoint = os.path.join(latest, "checkpoint.pt")
        notes.append(f"checkpoint: {checkpoint} (the latest distill run; --checkpoint to choose another)")
    elif checkpoint:
        checkpoint = checkpoint_path(checkpoint)
    teacher, teacher_weights = cfg.teacher, cfg.teacher_weights
    ckpt = load_checkpoint(checkpoint) if checkpoint and os.path.isfile(checkpoint) else {}
    # a row of its own for each further teacher the checkpoint distilled from (their files as distill saw them)
    more = tuple(render_teacher(t["name"], t.get("weights"), t.get("classes"))
                 for t in ckpt.get("teachers") or () if t["slot"] > 0)
    if teacher is None:  # the teacher row shows the teacher the checkpoint learnt from
        source = ckpt.get("teacher") or {}
        if source.get("name") in (None, "none"):  # a checkpoint from a teacher-less cache (modist)
            source = {}
        teacher, teacher_weights = source.get("name") or "efficientnet_lite0", teacher_weights or source.get("weights")
        if source.get("weights") and teacher_weights == source["weights"]:
            if not os.path.isfile(teacher_weights) or sha256_file(teacher_weights) != source["weights_sha256"]:
                raise EvalError(f"{teacher_weights}: the weights of the checkpoint's teacher {teacher} are gone or "
                                "changed since it was distilled; pass --teacher-weights FILE (the original file)")
        if teacher != "efficientnet_lite0":
            notes.append(f"teacher row: {teacher} ({teacher_weights}), the checkpoint's teacher")
    return dataclasses.replace(cfg, root=root, checkpoint=checkpoint, teacher=teacher, teacher_weights=teacher_weights,
                               more_teachers=cfg.more_teachers or more,
                               group_pattern=group_rule(cfg.task, cfg.group_pattern)), notes


def run_eval(cfg):
    """The whole of `cli.py eval`. Returns (rows, task, report lines)."""
    cfg, notes = with_defaults(cfg)
    check_options(cfg)
    device = torch.device(resolve_device(cfg.device))
    try:  # resolved once: the report's config and every student-side row say which it was
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    except ValueError as e:
        raise EvalError(str(e)) from None
    task = load_task(cfg.task, cfg.root, cfg.split, cfg.splits, cfg.test_fraction, cfg.seed, cfg.train_list, cfg.test_list,
                     cfg.labels, cfg.label_column, cfg.id_column, cfg.group_pattern)
    scored_sides(cfg, task)  # before any decoding: a split that cannot be scored fails at once
    os.makedirs(cfg.out, exist_ok=True)
    pre = preprocessing_of(cfg.checkpoint)
    work = cfg.work or cfg.out
    reader, source = labelled_frames(cfg, task, pre, work)
    unreadable = len(task.train) + len(task.test) - len(set(reader.ids) & {vid for vid, _, _ in task.train + task.test})
    failed = f"{unreadable} videos failed to decode (see `cli.py cache info {reader.cache_dir}`)" if unreadable else None
    train, test = scored_sides(cfg, task, set(reader.ids), failed)
    counts = class_counts(task.classes, train, test)
    trl, tel = np.array([label for _, label in train]), np.array([label for _, label in test])
    warnings = small_data_warnings(counts, len(test))
    scope = [f"zeroshot alone: all {len(test)} videos are scored, none is trained on"] if not train else []
    prior = trl if len(trl) else tel  # the class frequencies "always name the most frequent" reads
    notes += [task.describe()] + scope + ([source] if source else []) + ([failed] if failed else []) + \
        [per_class_line(counts), chance_line(task.classes, prior, tel)] + [f"warning: {w}" for w in warnings] + \
        [describe_precision(cfg.precision, device)]
    seen = transductive_check(cfg, pre, task, test, notes)
    space = concept_space(cfg, task.classes, notes) if "zeroshot" in cfg.protocols else None
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows, start = [], record_label(load_checkpoint(cfg.checkpoint).get("start")) if cfg.checkpoint else None
    for init in cfg.rows():
        results, attrs, store = evaluate_row(init, cfg, reader, task, train, test, pre, device, work, notes, space)
        for protocol, metrics in results.items():
            for metric, value in metrics.items():
                accuracy = metric not in NOT_ACCURACY
                rows.append({"task": task.name, "split": task.split, "init": init, "protocol": protocol,
                             "metric": metric, "value": value,
                             # over the test videos (clip-level numbers too: views of a video are not independent)
                             "ci95": wilson_interval(value, len(test)) if accuracy else None,
                             "chance": chance_level(metric, trl, len(task.classes), tel) if accuracy else None,
                             "views": attrs["views"] if protocol != "finetune" else f"{cfg.clips} clips x {cfg.crops} crops",
                             "checkpoint": attrs["checkpoint"], "features": os.path.abspath(store),
                             # where the checkpoint's student started (scratch, inflate, from-RUN): the table says
                             "start": start if init == "checkpoint" else None,
                             # the distillation cache the checkpoint learnt from; baselines learnt nothing from it
                             "cache_fingerprint": pre.fingerprint if init == "checkpoint" else None,
                             # test videos the checkpoint pre-trained on (unlabelled); None: unknown
                             "transductive": seen if init == "checkpoint" else 0,
                             # the student-side rows' arithmetic (a teacher row runs at its own)
                             "precision": None if is_teacher_row(init) else cfg.precision,
                             "seed": cfg.seed, "date": date, "train_videos": len(train), "test_videos": len(test)})
    run = {"date": date, "task": task.name, "split": task.split, "seed": cfg.seed, "train_videos": len(train),
           "test_videos": len(test), "classes": [{"name": c, "train": a, "test": b} for c, a, b in counts],
           "chance_top1": 1 / len(task.classes), "majority": majority(task.classes, prior, tel),
           "warnings": warnings, "notes": notes, "config": dataclasses.asdict(cfg)}
    notes += write_eval_events(cfg, rows, task, train, test)  # TensorBoard: beside the checkpoint
    write_reports(cfg.out, rows, run)
    return rows, task, notes


def transductive_check(cfg, pre, task, test, notes):
    """How many test videos the checkpoint was pre-trained on (its distillation cache holds them): its
    numbers are then transductive, which a reader must be told. Adds a note; returns the count (None
    when the cache is not there to tell)."""
    if "checkpoint" not in cfg.rows() or not cfg.checkpoint:
        return 0
    tested = {vid for vid, _ in test}
    seen = pretrained_on(pre, [(vid, path) for vid, path, _ in task.test if vid in tested])
    if seen is None:
        notes.append(f"could not check whether the checkpoint pre-trained on the test videos: its distillation cache "
                     f"{pre.distill_cache} is not there")
    elif seen:
        notes.append(f"transductive: the checkpoint was pre-trained (without labels) on {len(seen)} of the "
                     f"{len(test)} test videos (its cache {pre.distill_cache} holds them, e.g. {seen[0]}); its row "
                     "is marked † and is not comparable with numbers from unseen videos")
    return None if seen is None else len(seen)


def labelled_frames(cfg, task, pre, work):
    """(reader, note) of the task's videos, decoded once; the teacher row's teacher runs inside that
    decode. task.root: the folder the video ids are relative to (ROOT/UCF-101 of an official layout)."""
    teacher = (cfg.teacher, cfg.teacher_weights, cfg.teacher_every) \
        if "teacher" in cfg.rows() and set(cfg.protocols) - {"finetune"} else None
    return frames_source(task.root, [(vid, path) for vid, path, _ in task.train + task.test], work, pre,
                         cfg.progress, teacher, cfg.decode_workers)


def scored_sides(cfg, task, usable=None, failed=None):
    """(train, test) as [(id, label)]: the split's sides, or, with zero-shot alone on a folder or csv
    task, no train side and every video to score. usable: the ids that decoded (None: not decoded
    yet). Refuses what cannot be scored, saying why."""
    train, test = [(vid, label) for vid, _, label in task.train], [(vid, label) for vid, _, label in task.test]
    if usable is not None:
        train, test = ([(vid, label) for vid, label in side if vid in usable] for side in (train, test))
    if not zeroshot_alone(cfg, task):
        require_both_sides(task, train, test, failed)
        return train, test
    if not train + test:
        raise EvalError(f"{task.describe()}: no videos that decode" + (f" ({failed})" if failed else ""))
    return [], train + test


def require_both_sides(task, train, test, failed=None):
    """Refuse a split that leaves one side empty, saying why: every class needs two videos (two
    groups of clips), one to learn from and one to test on."""
    if train and test:
        return
    counts = class_counts(task.classes, train, test)
    few = [(c, a + b) for c, a, b in counts if a + b < 2]
    message = (f"{task.describe()}: no {'test' if not test else 'train'} videos"
               + (f" that decode ({failed})" if failed else "")
               + "; each class needs at least two videos, one to train on and one to test on (clips of one source "
                 "video, by --group-pattern, count as one)")
    if few:
        message += (f"; {len(few)} of {len(counts)} classes have fewer: "
                    + ", ".join(f"{c} ({n})" for c, n in few[:10]) + (" …" if len(few) > 10 else ""))
    raise EvalError(message)


def class_counts(classes, train, test):
    """[(class, train videos, test videos)] of (id, label) lists."""
    a, b = collections.Counter(label for _, label in train), collections.Counter(label for _, label in test)
    return [(c, a[i], b[i]) for i, c in enumerate(classes)]


def per_class_line(counts):
    if len(counts) <= 20:
        return "per class, train/test videos: " + ", ".join(f"{c} {a}/{b}" for c, a, b in counts)
    tr, te = [a for _, a, _ in counts], [b for _, _, b in counts]
    return (f"per class, train/test videos: train {min(tr)}-{max(tr)}, test {min(te)}-{max(te)} "
            "(each class in results.md)")


def majority(classes, train_labels, test_labels):
    """The most frequent training class, and the share of the test videos that always naming it gets."""
    top = int(np.bincount(train_labels, minlength=len(classes)).argmax())
    return {"class": classes[top], "accuracy": float(np.mean(test_labels == top))}


def chance_line(classes, train_labels, test_labels):
    m = majority(classes, train_labels, test_labels)
    return (f"chance: {100 / len(classes):.1f} % top-1 ({len(classes)} classes guessed at random); always naming the "
            f"most frequent training class ({m['class']}) scores {100 * m['accuracy']:.1f} % on this test set")


def small_data_warnings(counts, n_test):
    """What makes the numbers of this split weak: classes without test or train videos, a test set too
    small for its accuracies to rank rows."""
    warnings = []
    untested = [c for c, a, b in counts if b == 0]
    if untested:
        warnings.append(f"{len(untested)} of {len(counts)} classes have no test video, so nothing measures them "
                        f"(a class needs at least two videos to be on both sides): "
                        + ", ".join(untested[:10]) + (" …" if len(untested) > 10 else ""))
    unlearnt = [c for c, a, b in counts if a == 0 and b > 0] if any(a for _, a, _ in counts) else []  # zero-shot
    if unlearnt:
        warnings.append(f"{len(unlearnt)} classes have test videos but no train video, so every test video of "
                        "theirs counts as an error: " + ", ".join(unlearnt[:10]) + (" …" if len(unlearnt) > 10 else ""))
    if n_test < SMALL_TEST_SET:
        low, high = wilson_interval(0.5, n_test)
        warnings.append(f"only {n_test} test video{'s' * (n_test != 1)}: one video moves an accuracy by "
                        f"{100 / n_test:.1f} points and a 95 % interval spans {100 * low:.0f}-{100 * high:.0f} % "
                        "around 50 %, so these numbers cannot tell the rows apart; label more videos (ideally "
                        "10+ test videos per class) or raise --test-fraction")
    return warnings


def evaluate_row(init, cfg, reader, task, train, test, pre, device, work, notes, space=None):
    """One row of the table: its features (from the store, computing what it lacks) through every
    protocol asked for. Returns ({protocol: metrics}, what the features depend on, feature store path)."""
    trl, tel = np.array([label for _, label in train]), np.array([label for _, label in test])
    num_classes = len(task.classes)
    results, attrs, store = {}, None, None
    if {"linear", "knn", "retrieval"} & set(cfg.protocols):
        feats, attrs, store = row_features(init, cfg, reader, [v for v, _ in train + test], task.root, pre, device, work)
        trf, tef = feats[:len(train)], feats[len(train):]
    if "linear" in cfg.protocols:
        pattern = compile_group_pattern(cfg.group_pattern)
        groups = [group_of(vid, pattern) for vid, _ in train]  # the weight-decay hold-out splits as the task does
        results["linear"] = linear_probe(trf, trl, tef, tel, num_classes, cfg.seed, groups)
    if "knn" in cfg.protocols:
        results["knn"] = knn_classify(trf, trl, tef, tel, num_classes)
    if "retrieval" in cfg.protocols:
        results["retrieval"] = retrieval(trf, trl, tef, tel)
    if "zeroshot" in cfg.protocols:
        if init != "teacher" and is_teacher_row(init):
            notes.append(f"zeroshot skipped for the {init} row (the first teacher's row has it)")
        elif init != "teacher" and concept_head_of(init, cfg) is None:
            notes.append(f"zeroshot skipped for the {init} row (its network has no concept head nor ImageNet head)")
        else:
            feats, z_attrs, z_store = row_features(init, cfg, reader, [v for v, _ in test], task.root, pre, device,
                                                   work, space)
            results["zeroshot"] = zero_shot(feats, tel, space["classes"])
            attrs, store = attrs or z_attrs, store or z_store
    if "finetune" in cfg.protocols:
        if is_teacher_row(init):
            notes.append(f"finetune skipped for the 2D {init} row (not a video network)")
        else:
            fresh = load_backbone(init, cfg.checkpoint, cfg.student, cfg.seed)  # features must not see tuned weights
            results["finetune"] = finetune(fresh, reader, train, test, num_classes, pre, cfg, device)
    return results, attrs or {"views": None, "checkpoint": None}, store or ""


def zeroshot_alone(cfg, task):
    """Zero-shot is the only protocol on a folder or csv task: every video is scored (on ucf101 and
    hmdb51 the official split's test side is, so numbers compare with the literature's)."""
    return tuple(cfg.protocols) == ("zeroshot",) and task.name not in OFFICIAL


def concept_space(cfg, classes, notes):
    """Zero-shot's text space: the encoder (--text-encoder, else the checkpoint's concept bank's, else a
    CLIP teacher's own text tower, else minilm), the ImageNet bridge into it, and the task's class
    names in it ({"identity", "bridge", "classes"})."""
    from pipeline.common.errors import ConceptError
    from pipeline.distill.concepts import check_encoder, class_vectors, words_of
    bank = load_checkpoint(cfg.checkpoint).get("concepts") if cfg.checkpoint else None
    if cfg.text_encoder:
        name, weights = cfg.text_encoder, cfg.text_weights
    elif bank:  # how the bank's encoder was loaded (banks made before this was recorded: by name)
        load = bank["text_encoder"].get("load") or {"name": bank["text_encoder"]["name"]}
        name, weights = load["name"], load.get("weights")
    elif (cfg.teacher or "").startswith("clip:"):
        name, weights = cfg.teacher, cfg.teacher_weights
    else:
        name, weights = "minilm", None
    try:
        encoder, identity, bridge = text_space(name, weights)
        if bank:
            check_encoder(bank["text_encoder"], identity, f"{cfg.checkpoint}'s concept bank")
    except (ValueError, ConceptError) as e:
        raise EvalError(str(e)) from None
    notes.append(f"zeroshot: class names in {encoder.name}'s space, e.g. {classes[0]!r} -> '{words_of(classes[0])}'")
    return {"identity": identity, "bridge": bridge, "classes": class_vectors(encoder, classes)}


@functools.lru_cache(maxsize=2)
def text_space(name, weights=None):
    """(encoder, its identity, the teacher's bridge into its space): loaded and embedded once per
    process, however many evaluations (the demo's rows and label sets) ask."""
    from models.text import load_text_encoder
    from pipeline.distill.concepts import bridge_vectors, encoder_identity
    encoder = load_text_encoder(name, weights)
    return encoder, encoder_identity(encoder), bridge_vectors(encoder)
