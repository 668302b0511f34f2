"""eval's numbers as TensorBoard events beside the evaluated run: one TensorBoard run per table row,
the table and per-class kNN accuracy as text."""
import os

import h5py
import numpy as np

from pipeline.common.tensorboard import event_writer
from pipeline.evaluate.protocols import knn_classify
from pipeline.evaluate.report import format_table

PER_CLASS_K = 20  # per-class accuracy is the kNN protocol's (k 20, the table's kNN column): it needs no fit


def eval_events_dir(cfg, task_name, split):
    """RUN/eval-<task>-split<k>/ beside the evaluated checkpoint (so `tensorboard --logdir RUN` has both
    its training curves and its evaluations), else OUT/tensorboard/eval-<task>-split<k>/."""
    name = f"eval-{task_name}-split{split}".replace(os.sep, "_").replace(" ", "_")
    run_dir = os.path.dirname(os.path.abspath(cfg.checkpoint)) if cfg.checkpoint and "checkpoint" in cfg.rows() else None
    if run_dir and os.access(run_dir, os.W_OK):
        return os.path.join(run_dir, name)
    return os.path.join(cfg.out, "tensorboard", name)


def write_eval_events(cfg, rows, task, train, test):
    """eval's numbers as TensorBoard events. One TensorBoard run per table row (init), so the rows
    overlay on one chart per metric; the step is the checkpoint's training step, so evaluations of
    successive checkpoints draw a curve. Also the Markdown table and per-class accuracy as text.
    Returns the note that says where they are."""
    if not rows:
        return []
    base = eval_events_dir(cfg, task.name, task.split)
    try:
        _write_eval_events(base, cfg, rows, task, train, test)
    except OSError as e:  # the numbers are in results.json whatever happens here
        return [f"TensorBoard events not written to {base}: {e}"]
    return [f"TensorBoard: {base} (`tensorboard --logdir {os.path.dirname(base)}`)"]


def _write_eval_events(base, cfg, rows, task, train, test):
    step = _checkpoint_step(cfg.checkpoint)
    per_class = {}
    for init in dict.fromkeys(r["init"] for r in rows):
        mine = [r for r in rows if r["init"] == init]
        # per-class kNN of the row's backbone features: only where kNN ran (zero-shot alone has no train side)
        per_class[init] = (per_class_accuracy(mine[0]["features"], task.classes, train, test)
                           if "knn" in cfg.protocols and train else [None] * len(task.classes))
        w = event_writer(os.path.join(base, init))
        for r in mine:
            w.add_scalar(f"{task.name}/{r['protocol']} {r['metric']}", r["value"], step)
        for name, acc in zip(task.classes, per_class[init]):
            if acc is not None:
                w.add_scalar(f"{task.name} per-class kNN k{PER_CLASS_K}/{name}", acc, step)
        w.close()
    w = event_writer(base)
    w.add_text(f"{task.name}/table", format_table(rows), step)
    w.add_text(f"{task.name}/per-class", per_class_table(task.classes, train, test, per_class), step)
    w.close()


def _checkpoint_step(checkpoint):
    if not checkpoint:
        return 0
    from models.checkpoint import load_checkpoint
    return int(load_checkpoint(checkpoint).get("step", 0))


def per_class_accuracy(store, classes, train, test, k=PER_CLASS_K):
    """kNN top-1 of each class's test videos (None for a class without test videos), from a row's
    feature store (ids, features [N,V,D]); train/test: [(id, label)]."""
    with h5py.File(store, "r") as f:
        index = {i.decode(): n for n, i in enumerate(f["ids"][()])}
        feats = f["features"][()]
    trf = feats[[index[v] for v, _ in train]]
    tef = feats[[index[v] for v, _ in test]]
    trl, tel = np.array([label for _, label in train]), np.array([label for _, label in test])
    out = []
    for c in range(len(classes)):
        mine = tel == c
        out.append(next(iter(knn_classify(trf, trl, tef[mine], tel[mine], len(classes), ks=(k,)).values()))
                   if mine.any() else None)
    return out


def per_class_table(classes, train, test, per_class):
    inits = list(per_class)
    n_train = np.bincount([label for _, label in train], minlength=len(classes))
    n_test = np.bincount([label for _, label in test], minlength=len(classes))
    lines = [f"kNN (k {PER_CLASS_K}) top-1 per class, in %", "",
             "| class | train | test | " + " | ".join(inits) + " |", "|---|---|---|" + "---|" * len(inits)]
    for c, name in enumerate(classes):
        cells = ["–" if per_class[i][c] is None else f"{100 * per_class[i][c]:.1f}" for i in inits]
        lines.append(f"| {name} | {n_train[c]} | {n_test[c]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
