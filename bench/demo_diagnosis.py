"""Why the demo's students learn what they learn: variants of the objectives on a VALIDATION split.

(1) Flow oracle: is the motion label in the cached DIS flow at all? A linear probe on four statistics
    of the moving region's flow (mean u, v; mean rotation and expansion about its centroid).
(2) Variants: each objective with knobs changed from the demo's settings, trained for --steps with
    every seed of --seeds, scored with the baselines on the validation split (the training side of the
    demo's test split, split again 70/30; the test split is touched only by the demo). Printed per
    variant: accuracy mean ± std over seeds, the loss terms at the end of training, and, for MoDist
    runs, which cue solves its instance discrimination (3).
(3) Shortcut probe: top-1 of each pool video's RGB query among the keys of every pool video's second
    clip, with that clip as trained, time-shuffled (appearance kept, motion destroyed) and frozen (its
    middle frame repeated), and against the flow keys. A term solved as well by frozen keys is solved
    by appearance, not motion.

    python bench/demo_diagnosis.py --demo demo_out            # after `cli.py demo --out demo_out`
    python bench/demo_diagnosis.py --demo diag_other --pictures other --generator-seed 1 \\
        --seeds 0 1 2 --steps 400 --no-oracle --variant "modist cross_weight=4" --variant "distinit"
    python bench/demo_diagnosis.py --demo demo_out --seeds 0 1 2 3 4 --steps 300 --no-oracle --no-probe --paired \
        --variant "fp32: distinit precision=fp32" --variant "bf16: distinit precision=bf16"   # bf16 − fp32

A folder without a benchmark is prepared first (generate, extract, concept bank: ~1.5 min). Results
accumulate in WORK/results.json: a rerun skips what it has and resumes unfinished runs.
"""
import argparse
import csv
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch

from cache.reader import CacheReader
from models.checkpoint import load_checkpoint
from models.students import normalize_video
from pipeline.common.config import DistillConfig, ExtractConfig
from pipeline.demo.demo import (
    BASELINES,
    COLUMNS,
    FRAMES,
    RECIPE,
    SIZES,
    STUDENT,
    distill_config,
    evaluate_runs,
    prepare_benchmark,
)
from pipeline.demo.synthetic import skimage_images
from pipeline.distill.clips import ClipDataset
from pipeline.distill.distiller import Distiller
from pipeline.distill.train import run_distill
from pipeline.evaluate.protocols import linear_probe
from pipeline.extract.extract import run_extract

# Another benchmark of the same kind: other scikit-image pictures behind the object labels and other
# textures behind them, so a claim can be checked away from the demo's four photographs
OTHER_PICTURES = {"motorcycle": "stereo_motorcycle", "galaxy": "hubble_deep_field", "retina": "retina",
                  "clock": "clock"}
OTHER_TEXTURES = {"moon": "moon", "cell": "cell", "page": "page"}
LOSS_TERMS = ("distinit", "rgb_nce", "cross_nce", "flow_nce", "concept", "align")

# (row name, objective, knobs changed from the demo's STUDENT settings); --variant adds others
VARIANTS = [
    ("distinit", "distinit", {}),
    ("modist", "modist", {}),
    ("both", "both", {}),
    ("distinit+lss", "distinit+lss", {}),
]


def pictures(kind):
    """(photos, textures) for generate_benchmark: None for the demo's own, or the other set."""
    if kind == "demo":
        return None, None
    photos = skimage_images(OTHER_PICTURES)
    photos["motorcycle"] = photos["motorcycle"][0]  # the stereo pair's left image
    return photos, skimage_images(OTHER_TEXTURES)


def parse_variant(text):
    """'modist lr=0.003 momentum=0.98' -> (text, "modist", {"lr": 0.003, "momentum": 0.98});
    'NAME: modist lr=0.003' names the row NAME."""
    name, _, spec = text.rpartition(":")
    objective, *pairs = spec.split()
    knobs = {}
    for pair in pairs:
        key, value = pair.split("=")
        key = key.replace("-", "_")
        default = getattr(DistillConfig, key)
        knobs[key] = (value.lower() in ("1", "true", "yes") if isinstance(default, bool)
                      else value if isinstance(default, str) else type(default)(value))
    return name.strip() or text, objective, knobs


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values):
    """(mean, half-width of the 95 % t-interval) of paired per-seed values (nan half-width for one)."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), T_975.get(len(values) - 1, 1.96) * float(values.std(ddof=1)) / math.sqrt(len(values))


def flow_statistics(flow):
    """[4] mean over frames of the moving region's mean u, v, rotation and expansion (flow [T,H,W,2])."""
    h, w = flow.shape[1:3]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    stats = []
    for f in flow[:-1]:  # the last frame's flow is zero by convention
        mag = np.linalg.norm(f, axis=-1)
        moving = mag > max(0.3, 0.5 * np.percentile(mag, 90))
        if moving.sum() < 10:
            continue
        rx, ry = xx[moving] - xx[moving].mean(), yy[moving] - yy[moving].mean()
        r = np.sqrt(rx ** 2 + ry ** 2) + 1e-3
        u, v = f[..., 0][moving], f[..., 1][moving]
        stats.append([u.mean(), v.mean(), ((rx * v - ry * u) / r).mean(), ((rx * u + ry * v) / r).mean()])
    return np.mean(stats, 0) if stats else np.zeros(4)


def flow_oracle(demo, work, seeds):
    labelled = os.path.join(demo, "data", "labelled")
    cache = os.path.join(work, "labelled-flow")
    run_extract(ExtractConfig(videos=os.path.join(labelled, "videos"), cache=cache, teacher="none", flow="dis",
                              height=FRAMES["height"], width=FRAMES["width"], shard=(0, 1)))
    reader = CacheReader(cache)
    motion = {r["id"]: r["motion"] for r in csv.DictReader(open(os.path.join(labelled, "labels.csv")))}
    classes = sorted(set(motion.values()))
    x = np.stack([flow_statistics(reader.read(v, fields=("flow",))["flow"]) for v in reader.ids])[:, None].astype(np.float32)
    y = np.array([classes.index(motion[v]) for v in reader.ids])
    accs = []
    for seed in range(seeds):  # random 70/30 splits
        order = np.random.default_rng(seed).permutation(len(y))
        train, test = order[:int(0.7 * len(y))], order[int(0.7 * len(y)):]
        accs.append(linear_probe(x[train], y[train], x[test], y[test], len(classes), seed)["video_top1"])
    return float(np.mean(accs)), float(np.std(accs))


def evaluate(demo, checkpoint, seed, name, baselines=()):
    """{"label_set protocol metric": value} on the demo's validation split."""
    got = {}
    for label_set in ("object", "motion"):
        for r in evaluate_runs(demo, {name: checkpoint} if checkpoint else {}, label_set, seed, clips=2,
                               progress=False, validation=True, baselines=baselines):
            got.setdefault(r["row"], {})[f"{label_set} {r['protocol']} {r['metric']}"] = r["value"]
    return got


def final_losses(run, share=0.1):
    """Mean of each loss term over the last `share` of the run's log records."""
    recs = [json.loads(line) for line in open(os.path.join(run, "log.jsonl")) if line.strip()]
    tail = recs[-max(1, int(len(recs) * share)):]
    return {k: float(np.mean([r[k] for r in tail])) for k in LOSS_TERMS if k in tail[-1]}


@torch.no_grad()
def shortcut_probe(checkpoint, cache, seed=0):
    """Top-1 instance discrimination over the pool: the query clip of each video against the keys of
    every video's second clip, as trained / time-shuffled / frozen, and against the flow keys (see (3))."""
    ckpt = load_checkpoint(checkpoint)
    cfg = DistillConfig(**ckpt["config"])
    fp = ckpt["cache_fingerprint"]
    model = Distiller(cfg, ckpt["teachers"], fp["flow"]["bound"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    data = ClipDataset(CacheReader(cache), cfg.clip_len, cfg.stride, cfg.crop, with_flow=True, teacher_fields=(),
                       two_views=True, seed=seed + 1000, crop_scale=cfg.crop_scale)
    items = [data[(0, i)] for i in range(len(data))]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("video", "video2", "flow", "flow2")}
    t = batch["video2"].shape[2]
    shuffled = batch["video2"][:, :, torch.roll(torch.arange(t), t // 2).flip(0)]  # every frame moved
    frozen = batch["video2"][:, :, [t // 2] * t]

    def unit(x):
        return torch.nn.functional.normalize(x, dim=1)
    q = unit(model.proj_rgb(model.backbone(normalize_video(batch["video"]))))
    bound = model.flow_bound

    def top1(query, keys):
        return float(((query @ keys.t()).argmax(1) == torch.arange(len(query))).float().mean())
    out = {f"rgb->rgb {name}": top1(q, unit(model.key_rgb(normalize_video(v))))
           for name, v in (("as trained", batch["video2"]), ("shuffled", shuffled), ("frozen", frozen))}
    out["rgb->flow"] = top1(q, unit(model.key_flow(batch["flow2"].float() / bound)))
    q_flow = unit(model.proj_flow(model.motion(batch["flow"].float() / bound)))
    out["flow->rgb"] = top1(q_flow, unit(model.key_rgb(normalize_video(batch["video2"]))))
    out["videos"] = len(items)
    return out


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def print_tables(results, names, seeds, steps, paired=()):
    """The accuracy table of `names`, then `paired` (names, the first the reference) as per-seed differences,
    then the loss terms and the shortcut probe where the runs have them."""
    columns = [f"{ls} {p} {m}" for ls, p, m in COLUMNS]
    print(f"\naccuracy on the validation split, %, mean ± std over seeds {seeds}, {steps} steps")
    print("| row | " + " | ".join(columns) + " | mean of means |")
    print("|---|" + "---|" * (len(columns) + 1))
    for name in names:
        runs = [results.get(f"{name}|{seed}|{steps}") for seed in seeds]
        runs = [r for r in runs if r]
        if not runs:
            continue
        cells = [mean_std([r["accuracy"].get(c) for r in runs]) for c in columns]
        means = [np.mean([r["accuracy"][c] for r in runs]) for c in columns if all(c in r["accuracy"] for r in runs)]
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * np.mean(means):.1f} |")
    if len(paired) > 1:
        reference = paired[0]
        print(f"\npaired against {reference} (the same seed: the same initial weights and clips), % points, the mean "
              f"difference over seeds and its 95 % t-interval")
        print("| row − " + reference + " | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name in paired[1:]:
            pairs = [(results.get(f"{reference}|{s}|{steps}"), results.get(f"{name}|{s}|{steps}")) for s in seeds]
            pairs = [(a["accuracy"], b["accuracy"]) for a, b in pairs if a and b]
            cells = []
            for c in columns:
                diffs = [100 * (b[c] - a[c]) for a, b in pairs if c in a and c in b]
                mean, half = interval(diffs) if diffs else (None, None)
                cells.append("–" if mean is None else f"{mean:+.1f} ± {half:.1f}")
            print(f"| {name} (n={len(pairs)}) | " + " | ".join(cells) + " |")
    probes = [n for n in names if any(results.get(f"{n}|{s}|{steps}", {}).get("probe") for s in seeds)]
    losses = [n for n in names if any(results.get(f"{n}|{s}|{steps}", {}).get("losses") for s in seeds)]
    if losses:
        print("\nloss terms at the end of training (mean of the last 10 % of log records, mean over seeds)")
        print("| row | " + " | ".join(LOSS_TERMS) + " |")
        print("|---|" + "---|" * len(LOSS_TERMS))
        for name in losses:
            runs = [results[f"{name}|{s}|{steps}"] for s in seeds if f"{name}|{s}|{steps}" in results]
            cells = [np.mean([r["losses"][k] for r in runs]) if all(k in r["losses"] for r in runs) else None
                     for k in LOSS_TERMS]
            print(f"| {name} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    if probes:
        keys = ("rgb->rgb as trained", "rgb->rgb shuffled", "rgb->rgb frozen", "rgb->flow", "flow->rgb")
        print("\nshortcut probe: top-1 instance discrimination over the pool videos, %, mean over seeds")
        print("| row | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for name in probes:
            runs = [results[f"{name}|{s}|{steps}"]["probe"] for s in seeds if results.get(f"{name}|{s}|{steps}", {}).get("probe")]
            print(f"| {name} | " + " | ".join(mean_std([r[k] for r in runs]) for k in keys) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a `cli.py demo` output folder (prepared here if it has no cache)")
    ap.add_argument("--pictures", choices=("demo", "other"), default="demo",
                    help="when preparing: the demo's photos, or other pictures and textures (OTHER_PICTURES)")
    ap.add_argument("--generator-seed", type=int, default=0, help="when preparing: the benchmark's seed")
    ap.add_argument("--teacher-crop", type=float, default=None,
                    help="when preparing: the teacher's share of the central square (default: the demo's)")
    ap.add_argument("--teacher", action="append", default=None,
                    help="when preparing: the teacher spec (default: the extract default); repeat it for several "
                         "(a cache given one with `extract --add-teacher` must name them all)")
    ap.add_argument("--codec", choices=("jpeg", "zstd"), default=None,
                    help="when preparing: how frames and flow are stored (default: the extract default, JPEG)")
    ap.add_argument("--work", default=None, help="where runs and results go (default: DEMO/diagnosis)")
    ap.add_argument("--steps", type=int, default=SIZES["default"]["steps"],
                    help="every variant's steps (default: the demo's modist and both; its distinit students train "
                         f"{SIZES['default']['distinit_steps']})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variant", action="append", default=None,
                    help="'OBJECTIVE knob=value ...' instead of the built-in variants (repeatable)")
    ap.add_argument("--paired", action="store_true",
                    help="also each variant minus the first, seed by seed, with a 95 %% t-interval (fp32 against "
                         "bf16, a knob against the recipe)")
    ap.add_argument("--no-oracle", action="store_true", help="skip (1)")
    ap.add_argument("--no-probe", action="store_true", help="skip (3)")
    args = ap.parse_args()
    work = args.work or os.path.join(args.demo, "diagnosis")
    os.makedirs(work, exist_ok=True)
    photos, textures = pictures(args.pictures)
    frames = dict(FRAMES, **({} if args.teacher_crop is None else {"teacher_crop": args.teacher_crop}),
                  **({} if args.codec is None else {"frame_codec": args.codec, "flow_codec": args.codec}),
                  **({} if args.teacher is None else {"teacher": args.teacher[0],
                                                      "more_teachers": tuple(args.teacher[1:])}))
    try:
        cache, bank, benchmark = prepare_benchmark(args.demo, SIZES["default"], lambda text: print(text, flush=True),
                                                   progress=False, photos=photos, textures=textures,
                                                   generator_seed=args.generator_seed, frames=frames)
    except ValueError as e:  # the folder holds another benchmark
        sys.exit(str(e))
    print(f"benchmark: objects {benchmark['objects']}, generator seed {benchmark['seed']}")
    if not args.no_oracle:
        mean, std = flow_oracle(args.demo, work, seeds=3)
        print(f"(1) flow oracle: motion top-1 {100 * mean:.1f} ± {100 * std:.1f} % from 4 flow statistics "
              f"(linear probe, 3 random 70/30 splits; chance 12.5 %)")

    variants = [parse_variant(v) for v in args.variant] if args.variant else VARIANTS
    print(f"\n(2) variants on the validation split, seeds {args.seeds}, {args.steps} steps (demo settings: {STUDENT}, "
          f"per objective {RECIPE}; a variant's knobs change these)")
    results_path = os.path.join(work, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def save():
        tmp = results_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, results_path)
    for seed in args.seeds:
        if f"baselines|{seed}" not in results:  # with the demo's student architecture and preprocessing
            first = os.path.join(work, "baselines-reference")
            run_distill(distill_config(cache, first, "distinit", 1, 0))
            got = evaluate(args.demo, os.path.join(first, "checkpoint.pt"), seed, "first", baselines=BASELINES)
            results[f"baselines|{seed}"] = {row: got[row] for row in BASELINES}
            save()
        for name, objective, knobs in variants:
            key = f"{name}|{seed}|{args.steps}"
            if key in results:
                continue
            slug = "".join(c if c.isalnum() or c in "+-." else "_" for c in name)
            run = os.path.join(work, "runs", f"{slug}-seed{seed}-{args.steps}")
            run_distill(distill_config(cache, run, objective, args.steps, seed, bank, **knobs))
            checkpoint = os.path.join(run, "checkpoint.pt")
            rec = {"variant": name, "seed": seed, "steps": args.steps,
                   "accuracy": evaluate(args.demo, checkpoint, seed, name)[name], "losses": final_losses(run)}
            if ("modist" in objective or objective == "both") and not args.no_probe:
                rec["probe"] = shortcut_probe(checkpoint, cache, seed)
            results[key] = rec
            save()
            print(f"  {name} seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in rec["accuracy"].items()),
                  flush=True)
    for seed in args.seeds:
        for row in BASELINES:
            results[f"{row}|{seed}|{args.steps}"] = {"accuracy": results[f"baselines|{seed}"][row]}
    names = [v[0] for v in variants]
    print_tables(results, names + list(BASELINES), args.seeds, args.steps, paired=names if args.paired else ())


if __name__ == "__main__":
    main()
