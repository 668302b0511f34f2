"""Why the demo's hypotheses hold or fail: measurements on a finished demo folder.

(1) Flow oracle: is the motion label in the cached DIS flow at all? A linear probe on four statistics
    of the moving region's flow (mean u, v; mean rotation and expansion about its centroid).
(2) Knobs: variants of each objective (knobs changed from the demo's settings) trained for --steps
    and scored, with the baselines, on a VALIDATION split: the training side of the demo's test split,
    split again 70/30. The demo's knobs are chosen here; the test split is touched once, by the demo.

    python bench/demo_diagnosis.py --demo demo_out            # after `cli.py demo --out demo_out`
    python bench/demo_diagnosis.py --demo demo_out --no-oracle --variant "modist lr=0.003" --variant "both momentum=0.98"
"""
import argparse
import csv
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cache.reader import CacheReader  # noqa: E402
from pipeline.concepts import run_concepts  # noqa: E402
from pipeline.demo import BASELINES, COLUMNS, CONCEPTS, FRAMES, SIZES, STUDENT, evaluate_runs  # noqa: E402
from pipeline.config import ConceptsConfig, DistillConfig, ExtractConfig  # noqa: E402
from pipeline.distill import run_distill  # noqa: E402
from pipeline.extract import run_extract  # noqa: E402
from pipeline.protocols import linear_probe  # noqa: E402


# (row name, objective, knobs changed from the demo's STUDENT settings); --variant adds others
VARIANTS = [
    ("distinit", "distinit", {}),
    ("modist", "modist", {}),
    ("both", "both", {}),
    ("distinit+lss", "distinit+lss", {}),
    ("modist colour-views=all", "modist", {"colour_views": "all"}),
    ("both colour-views=all", "both", {"colour_views": "all"}),
]


def parse_variant(text):
    """'modist lr=0.003 momentum=0.98' -> (text, "modist", {"lr": 0.003, "momentum": 0.98})"""
    objective, *pairs = text.split()
    knobs = {}
    for pair in pairs:
        key, value = pair.split("=")
        key = key.replace("-", "_")
        knobs[key] = type(getattr(DistillConfig, key))(value) if not isinstance(getattr(DistillConfig, key), str) else value
    return text, objective, knobs


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


def evaluate(demo, checkpoint, seed, name, baselines=(), **kw):
    """{(label_set, protocol, metric): value} on the demo's validation split (the training side of its
    test split, split again): knobs are chosen here, never on the test split."""
    got = {}
    for label_set in ("object", "motion"):
        for r in evaluate_runs(demo, {name: checkpoint} if checkpoint else {}, label_set, seed, clips=2,
                               validation=True, baselines=baselines, **kw):
            got[(r["row"], label_set, r["protocol"], r["metric"])] = r["value"]
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="output folder of `cli.py demo` (default sizes)")
    ap.add_argument("--work", default=None, help="where to write (default: DEMO/diagnosis)")
    ap.add_argument("--steps", type=int, default=SIZES["default"]["steps"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", default=None,
                    help="'OBJECTIVE knob=value ...' instead of the built-in variants (repeatable)")
    ap.add_argument("--no-oracle", action="store_true", help="skip (1)")
    args = ap.parse_args()
    work = args.work or os.path.join(args.demo, "diagnosis")
    if not args.no_oracle:
        mean, std = flow_oracle(args.demo, work, seeds=3)
        print(f"(1) flow oracle: motion top-1 {100 * mean:.1f} ± {100 * std:.1f} % from 4 flow statistics "
              f"(linear probe, 3 random 70/30 splits; chance 12.5 %)")

    variants = [parse_variant(v) for v in args.variant] if args.variant else VARIANTS
    print(f"\n(2) knobs on the validation split, seed {args.seed}, {args.steps} steps (demo settings: {STUDENT})")
    print("| row | " + " | ".join(f"{ls} {p} {m}" for ls, p, m in COLUMNS) + " | mean |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))

    def show(name, got, row):
        values = [got.get((row, *c), float("nan")) for c in COLUMNS]
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | {100 * np.nanmean(values):.1f} |", flush=True)
    checkpoints = {}
    bank = os.path.join(args.demo, "concepts-k400.h5")  # the demo's concept bank, for variants with lss
    if any("lss" in objective for _, objective, _ in variants) and not os.path.exists(bank):
        run_concepts(ConceptsConfig(out=bank, **CONCEPTS))
    for name, objective, knobs in variants:
        run = os.path.join(work, f"{name.replace(' ', '_').replace('=', '-')}-{args.steps}")
        run_distill(DistillConfig(cache=os.path.join(args.demo, "cache"), out=run, objective=objective,
                                  steps=args.steps, seed=args.seed, workers=0, device="cpu", progress=False,
                                  concepts=bank if "lss" in objective else "", **{**STUDENT, **knobs}))
        checkpoints[name] = os.path.join(run, "checkpoint.pt")
        show(name, evaluate(args.demo, checkpoints[name], args.seed, name, progress=False), name)
    # baselines with the first run's architecture and preprocessing
    got = evaluate(args.demo, next(iter(checkpoints.values())), args.seed, "first", baselines=BASELINES, progress=False)
    for row in BASELINES:
        show(row, got, row)

if __name__ == "__main__":
    main()
