"""`cli.py eval` and `cli.py embed`: measure a student the way the literature does.

The labelled videos are decoded once into a frames-only cache (stage one with --teacher none and
--flow none, at the checkpoint's own fps and frame size), so evaluation reuses the same decoder,
resumability and failure records as training data. Features of every video over clips x crops views
are computed once per initialisation, stored per video in HDF5 and shared by every protocol, split
and label set over those videos.
"""
import dataclasses
import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from cache.dataset import load_clip, normalize_video, random_box
from cache.reader import CacheReader
from models.teacher import sha256_file
from pipeline.extract import ExtractConfig, run_extract
from pipeline.tasks import UCF_GROUPS, load_task

INITS = ("checkpoint", "scratch", "inflate", "teacher")
PROTOCOLS = ("linear", "knn", "retrieval", "finetune")
KNN_KS = (10, 20, 100, 200)
RECALL_KS = (1, 5, 10, 20, 50)


class EvalError(Exception):
    """Missing checkpoint, unknown option, or no usable videos; one-line message."""


@dataclass
class EvalConfig:
    task: str
    root: str
    out: str = "eval_out"
    split: int = 1
    splits: str = None  # folder with the split files (default: looked up beside the data)
    checkpoint: str = None
    inits: tuple = ("checkpoint",)
    protocols: tuple = ("linear", "knn")
    clips: int = 4  # temporal views per video, uniformly spaced
    crops: int = 1  # spatial views: 1 = centre, 3 = left/centre/right
    student: str = "r3d_cpu"  # architecture for --init scratch without a checkpoint
    seed: int = 0
    batch_size: int = 16
    finetune_epochs: int = 5
    finetune_lr: float = 1e-3
    test_fraction: float = 0.3  # folder and csv tasks: stratified split, groups kept on one side
    group_pattern: str = UCF_GROUPS
    train_list: str = None
    test_list: str = None
    labels: str = None  # csv task: the labels file, its label column and its video-path column
    label_column: str = None
    id_column: str = "id"
    work: str = None  # where the decoded-frames cache lives (default: out); share it between runs
    teacher_every: int = 1  # teacher row: embeddings of every k-th frame are averaged
    device: str = "auto"
    progress: bool = True


@dataclass
class Preprocessing:
    """What the student saw in training; evaluation decodes and cuts clips the same way."""
    fps: float = 8.0
    height: int = 128
    width: int = 171
    clip_len: int = 8
    stride: int = 2
    crop: int = 112
    crop_scale: float = 0.25  # fine-tuning cuts clips with the training crops
    source: str = "defaults"
    fingerprint: dict = field(default_factory=dict)


def preprocessing_of(checkpoint):
    if checkpoint is None:
        return Preprocessing()
    from pipeline.distill import load_checkpoint
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


def view_boxes(h, w, crops):
    """Square boxes: the centre, or left/centre/right (top/centre/bottom for portrait) for 3 crops."""
    side = min(h, w)
    if crops == 1:
        return [((h - side) // 2, (w - side) // 2, side, side)]
    if crops != 3:
        raise EvalError("--crops must be 1 or 3")
    if w >= h:
        return [(0, left, side, side) for left in (0, (w - side) // 2, w - side)]
    return [(top, 0, side, side) for top in (0, (h - side) // 2, h - side)]


def view_starts(n_frames, clips, span):
    return np.linspace(0, max(0, n_frames - span), clips).round().astype(int)


def load_backbone(init, cfg):
    from models.students import build_student, inflate_from_teacher
    if init == "checkpoint":
        if not cfg.checkpoint:
            raise EvalError("--init checkpoint needs --checkpoint RUN/checkpoint.pt")
        from pipeline.distill import load_student
        return load_student(cfg.checkpoint)[0]
    torch.manual_seed(cfg.seed)
    if init == "scratch":
        arch = cfg.student
        if cfg.checkpoint:  # same architecture as the distilled row, random weights
            from pipeline.distill import load_checkpoint
            arch = load_checkpoint(cfg.checkpoint)["config"]["student"]
        return build_student(arch).eval()
    if init == "inflate":
        return inflate_from_teacher(build_student("efficientnet3d_lite0")).eval()
    raise EvalError(f"unknown --init {init!r}; choose from {', '.join(INITS)}")


@torch.no_grad()
def video_features(backbone, reader, ids, pre, clips, crops, device, batch_size, progress, desc):
    """[N, clips*crops, D] float32 features, one row of views per video."""
    backbone = backbone.to(device).eval()
    span = (pre.clip_len - 1) * pre.stride + 1
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


# ---- protocols on frozen features ----------------------------------------------------------------

def l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def topk_accuracy(scores, labels, k):
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([labels[i] in top[i] for i in range(len(labels))]))


def _fit_logreg(x, y, num_classes, wd, steps=200):
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + wd * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return head


def linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes, seed=0):
    """Multinomial logistic regression on L2-normalised, standardised clip features.

    Weight decay is picked on a held-out 20 % of the training videos, then the probe is refit on all.
    Clip-level: each view is a sample; video-level: softmax averaged over a video's views.
    """
    n, v, d = train_feats.shape
    x_all = l2n(train_feats).reshape(n * v, d)
    mean, std = x_all.mean(0), x_all.std(0) + 1e-6

    def prep(f):
        return ((l2n(f) - mean) / std).astype(np.float32)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    hold = order[: max(1, n // 5)]
    fit = order[max(1, n // 5):]
    best_wd, best_acc = 1e-4, -1.0
    if len(fit) >= num_classes:
        for wd in (1e-5, 1e-4, 1e-3, 1e-2):
            head = _fit_logreg(prep(train_feats[fit]).reshape(-1, d), np.repeat(train_labels[fit], v), num_classes, wd)
            with torch.no_grad():
                acc = (head(torch.from_numpy(prep(train_feats[hold]).reshape(-1, d))).argmax(1).numpy()
                       == np.repeat(train_labels[hold], v)).mean()
            if acc > best_acc:
                best_wd, best_acc = wd, acc
    torch.manual_seed(seed)
    head = _fit_logreg(prep(train_feats).reshape(-1, d), np.repeat(train_labels, v), num_classes, best_wd)
    with torch.no_grad():
        logits = head(torch.from_numpy(prep(test_feats).reshape(-1, d))).reshape(len(test_feats), v, -1)
    clip_scores = logits.reshape(-1, num_classes).numpy()
    video_scores = logits.softmax(-1).mean(1).numpy()
    clip_labels = np.repeat(test_labels, v)
    out = {"clip_top1": topk_accuracy(clip_scores, clip_labels, 1), "video_top1": topk_accuracy(video_scores, test_labels, 1)}
    if num_classes > 5:  # with 5 classes or fewer, top-5 is 100 % by construction
        out |= {"clip_top5": topk_accuracy(clip_scores, clip_labels, 5), "video_top5": topk_accuracy(video_scores, test_labels, 5)}
    return out | {"weight_decay": best_wd}


def knn_classify(train_feats, train_labels, test_feats, test_labels, num_classes, ks=KNN_KS, temperature=0.07):
    """Weighted kNN on cosine similarity of video features (views averaged): vote exp(sim / T).

    Only k up to the number of training videos is reported (a larger k would be mislabelled); with
    fewer training videos than the smallest k, k is the number of training videos."""
    tr, te = l2n(l2n(train_feats).mean(1)), l2n(l2n(test_feats).mean(1))
    sims = te @ tr.T  # [Ntest, Ntrain]
    out = {}
    for k in [k for k in ks if k <= len(tr)] or [len(tr)]:
        idx = np.argsort(-sims, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, idx, 1) / temperature)
        votes = np.zeros((len(te), num_classes))
        np.add.at(votes, (np.arange(len(te))[:, None], train_labels[idx]), weights)
        out[f"k{k}_top1"] = float((votes.argmax(1) == test_labels).mean())
    return out


def retrieval(train_feats, train_labels, test_feats, test_labels, ks=RECALL_KS):
    """Test videos query the train set; R@k = share of queries with a same-class video in the top k.

    Only k below the number of training videos is reported (R@N_train is 100 % by construction)."""
    tr, te = l2n(l2n(train_feats).mean(1)), l2n(l2n(test_feats).mean(1))
    order = np.argsort(-(te @ tr.T), axis=1)
    hits = train_labels[order] == test_labels[:, None]
    return {f"R@{k}": float(hits[:, :k].any(1).mean()) for k in ks if k < len(tr)}


# ---- fine-tuning --------------------------------------------------------------------------------

class LabelledClips(torch.utils.data.Dataset):
    """Random clips of labelled videos, cut exactly like training clips (random box, flip)."""

    def __init__(self, reader, items, pre, seed):
        self.reader, self.items, self.pre, self.seed = reader, items, pre, seed
        self.span = (pre.clip_len - 1) * pre.stride + 1

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, i = key
        vid, label = self.items[i]
        rng = np.random.default_rng([self.seed, epoch, i])
        n = self.reader.num_frames(vid)
        start = int(rng.integers(0, max(0, n - self.span) + 1))
        box = random_box(self.pre.height, self.pre.width, rng, scale=(self.pre.crop_scale, 1.0))
        video, _ = load_clip(self.reader, vid, start, self.pre.clip_len, self.pre.stride, box,
                             bool(rng.random() < 0.5), self.pre.crop, False)
        return video, label


def finetune(backbone, reader, train, test, num_classes, pre, cfg, device):
    """The whole network plus a linear head, AdamW + cosine for a few epochs; tested over the views."""
    torch.manual_seed(cfg.seed)
    head = nn.Linear(backbone.feature_dim, num_classes)
    model = nn.Sequential(backbone, head).to(device).train()
    data = LabelledClips(reader, train, pre, cfg.seed)
    steps_per_epoch = max(1, len(data) // cfg.batch_size)
    total = cfg.finetune_epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.finetune_lr, total_steps=total, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    for epoch in range(cfg.finetune_epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        for s in range(steps_per_epoch):
            batch = [data[(epoch, i)] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            video = torch.stack([b[0] for b in batch]).to(device)
            labels = torch.tensor([b[1] for b in batch], device=device)
            loss = F.cross_entropy(model(normalize_video(video)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    logits = video_features(model, reader, [v for v, _ in test], pre, cfg.clips, cfg.crops, device,
                            cfg.batch_size, cfg.progress, "finetune test")  # [N,V,C] logits
    labels = np.array([l for _, l in test])
    v = logits.shape[1]
    clip_scores = logits.reshape(-1, num_classes)
    video_scores = torch.from_numpy(logits).softmax(-1).mean(1).numpy()
    out = {"clip_top1": topk_accuracy(clip_scores, np.repeat(labels, v), 1), "video_top1": topk_accuracy(video_scores, labels, 1)}
    if num_classes > 5:
        out["video_top5"] = topk_accuracy(video_scores, labels, 5)
    return out | {"epochs": cfg.finetune_epochs}


# ---- the command --------------------------------------------------------------------------------

def _usable(reader, items):
    ok = set(reader.ids)
    return [(vid, label) for vid, _, label in items if vid in ok]


def run_eval(cfg):
    """The whole of `cli.py eval`. Returns (rows, task, report lines)."""
    for init in cfg.inits:
        if init not in INITS:
            raise EvalError(f"unknown --init {init!r}; choose from {', '.join(INITS)}")
    for p in cfg.protocols:
        if p not in PROTOCOLS:
            raise EvalError(f"unknown --protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    if cfg.checkpoint and not os.path.isfile(cfg.checkpoint):
        raise EvalError(f"{cfg.checkpoint}: checkpoint not found")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    task = load_task(cfg.task, cfg.root, cfg.split, cfg.splits, cfg.test_fraction, cfg.seed, cfg.train_list, cfg.test_list,
                     cfg.labels, cfg.label_column, cfg.id_column, cfg.group_pattern)
    os.makedirs(cfg.out, exist_ok=True)
    pre = preprocessing_of(cfg.checkpoint)
    work = cfg.work or cfg.out
    reader = build_eval_cache(cfg.root, work, pre, "teacher" in cfg.inits, cfg.progress, cfg.teacher_every)
    train, test = _usable(reader, task.train), _usable(reader, task.test)
    unreadable = len(task.train) + len(task.test) - len(train) - len(test)
    if not train or not test:
        raise EvalError(f"{task.describe()}: no decodable train or test videos")
    notes = [task.describe()] + ([f"{unreadable} videos failed to decode (see `cli.py cache info {reader.cache_dir}`)"]
                                 if unreadable else [])
    num_classes = len(task.classes)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for init in cfg.inits:
        views = f"teacher embeddings of every {cfg.teacher_every}. frame averaged (2D)" if init == "teacher" else \
            f"{cfg.clips} clips x {cfg.crops} crops, {pre.clip_len}x{pre.crop}^2 stride {pre.stride}"
        # what the features depend on; the task, split and labels are not among them
        attrs = {"init": init, "views": views, "root": os.path.abspath(cfg.root),
                 "checkpoint": os.path.abspath(cfg.checkpoint) if cfg.checkpoint and init in ("checkpoint", "scratch") else None,
                 # the weights' content, not the file's path or time: a copied or retrained checkpoint
                 # never reuses stale features
                 "checkpoint_sha256": sha256_file(cfg.checkpoint) if cfg.checkpoint and init == "checkpoint" else None,
                 "seed": cfg.seed if init in ("scratch", "inflate") else None,
                 "preprocessing": dataclasses.asdict(pre) | {"fingerprint": None},
                 "student": cfg.student if init == "scratch" and not cfg.checkpoint else None}
        backbone = None if init == "teacher" else load_backbone(init, cfg)

        def compute(ids):
            return teacher_features(reader, ids) if init == "teacher" else video_features(
                backbone, reader, ids, pre, cfg.clips, cfg.crops, device, cfg.batch_size, cfg.progress, f"features {init}")
        digest = hashlib.sha1(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:12]
        store = os.path.join(work, f"features-{init}-{digest}.h5")
        feats = stored_features(store, [v for v, _ in train + test], compute, attrs)
        trf, tef = feats[:len(train)], feats[len(train):]
        trl, tel = np.array([l for _, l in train]), np.array([l for _, l in test])
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
                results["finetune"] = finetune(load_backbone(init, cfg), reader, train, test, num_classes, pre, cfg, device)
        for protocol, metrics in results.items():
            for metric, value in metrics.items():
                rows.append({"task": task.name, "split": task.split, "init": init, "protocol": protocol,
                             "metric": metric, "value": value,
                             "views": views if protocol != "finetune" else f"{cfg.clips} clips x {cfg.crops} crops",
                             "checkpoint": attrs["checkpoint"], "features": os.path.abspath(store),
                             # the distillation cache the checkpoint learnt from; baselines learnt nothing from it
                             "cache_fingerprint": pre.fingerprint if init == "checkpoint" else None,
                             "seed": cfg.seed, "date": date, "train_videos": len(train), "test_videos": len(test)})
    write_reports(cfg.out, rows, notes)
    return rows, task, notes


MAIN_METRICS = [("linear", "video_top1"), ("linear", "clip_top1"), ("knn", "k20_top1"), ("knn", "k200_top1"),
                ("retrieval", "R@1"), ("retrieval", "R@5"), ("finetune", "video_top1")]


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


def run_embed(videos, checkpoint, out, clips=4, crops=1, per_clip=False, device="auto", batch_size=16, progress=True):
    """Per-video student features for downstream users: HDF5 with ids, features and the config."""
    if not os.path.isfile(checkpoint):
        raise EvalError(f"{checkpoint}: checkpoint not found")
    pre = preprocessing_of(checkpoint)
    work = out + ".cache"
    reader = build_eval_cache(videos, work, pre, False, progress)
    if not reader.ids:
        raise EvalError(f"{videos}: no video could be decoded (see `cli.py cache info {reader.cache_dir}`)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    from pipeline.distill import load_student
    backbone = load_student(checkpoint)[0]
    feats = video_features(backbone, reader, reader.ids, pre, clips, crops, dev, batch_size, progress, "embed")
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
