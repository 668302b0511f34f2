"""Why the demo's hypotheses hold or fail: measurements on a finished demo folder.

(1) Flow oracle: is the motion label in the cached DIS flow at all? A linear probe on four statistics
    of the moving region's flow (mean u, v; mean rotation and expansion about its centroid).
(2) Training length and knobs: variants of each objective (one knob changed from the demo's
    settings) trained for --steps, evaluated exactly like the demo's rows, next to the demo's own
    run of that objective and seed (the ratio compares with it).
(3) Supervised ceiling: the same architecture from random weights, fine-tuned on the labels.

    python bench/demo_diagnosis.py --demo demo_out            # after `cli.py demo --out demo_out`
    python bench/demo_diagnosis.py --demo demo_out --steps 600 --finetune-epochs 20   (~30 min, 2 cores)
    python bench/demo_diagnosis.py --demo demo_out --steps 400 --only "distinit student=r3d_10_half"
"""
import argparse
import csv
import glob
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cache.reader import CacheReader  # noqa: E402
from pipeline.demo import COLUMNS, FRAMES, STUDENT  # noqa: E402
from pipeline.config import DistillConfig, EvalConfig, ExtractConfig  # noqa: E402
from pipeline.distill import run_distill  # noqa: E402
from pipeline.evaluate import run_eval  # noqa: E402
from pipeline.extract import run_extract  # noqa: E402
from pipeline.protocols import linear_probe  # noqa: E402


# (row name, objective, knobs changed from the demo's STUDENT settings)
VARIANTS = [
    ("distinit", "distinit", {}),
    ("modist cross-weight=1", "modist", {"cross_weight": 1.0}),  # the released code's weighting
    ("both cross-weight=1", "both", {"cross_weight": 1.0}),
    ("distinit target=random", "distinit", {"target_mode": "random"}),  # which teacher target works better
    ("modist cross-weight=4", "modist", {"cross_weight": 4.0}),  # weight the RGB<->flow term over RGB<->RGB
    ("both cross-weight=4", "both", {"cross_weight": 4.0}),
    ("both cross-weight=4 distinit-weight=4", "both", {"cross_weight": 4.0, "distinit_weight": 4.0}),
    ("distinit student=r3d_10_half", "distinit", {"student": "r3d_10_half"}),  # 2x width, 4x compute
]


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


def evaluate(demo, work, checkpoint, seed, inits=("checkpoint",), protocols=("linear", "knn"), **kw):
    """{(label_set, protocol, metric): value} on the demo's labelled set, as the demo evaluates."""
    labelled = os.path.join(demo, "data", "labelled")
    name = os.path.basename(os.path.dirname(checkpoint)) + "-" + "-".join(inits)
    got = {}
    for label_set in ("object", "motion"):
        rows, _, _ = run_eval(EvalConfig(task="csv", root=os.path.join(labelled, "videos"),
                                         labels=os.path.join(labelled, "labels.csv"), label_column=label_set,
                                         work=os.path.join(demo, "eval"), checkpoint=checkpoint, inits=inits,
                                         out=os.path.join(work, "eval", label_set, name),
                                         protocols=protocols, clips=2, seed=seed, device="cpu", teacher_every=4, **kw))
        got.update({(label_set, r["protocol"], r["metric"]): r["value"] for r in rows})
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="output folder of `cli.py demo` (default sizes)")
    ap.add_argument("--work", default=None, help="where to write (default: DEMO/diagnosis)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-epochs", type=int, default=20)
    ap.add_argument("--only", action="append", default=None, help="run only this variant of (2) (repeatable)")
    args = ap.parse_args()
    work = args.work or os.path.join(args.demo, "diagnosis")

    mean, std = flow_oracle(args.demo, work, seeds=3)
    print(f"(1) flow oracle: motion top-1 {100 * mean:.1f} ± {100 * std:.1f} % from 4 flow statistics "
          f"(linear probe, 3 random 70/30 splits; chance 12.5 %)")

    demo_rows = json.load(open(os.path.join(args.demo, "report.json")))["rows"]
    demo_steps = json.load(open(os.path.join(args.demo, "report.json"))).get("steps", "demo")
    print(f"\n(2) training length and knobs, seed {args.seed}: the demo's rows vs variants at {args.steps} steps")
    print("| row | steps | " + " | ".join(f"{ls} {p} {m}" for ls, p, m in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    shown = set()
    for name, objective, knobs in [v for v in VARIANTS if not args.only or v[0] in args.only]:
        short = {(r["label_set"], r["protocol"], r["metric"]): r["value"] for r in demo_rows
                 if r["row"] == objective and r["seed"] == args.seed}
        run = os.path.join(work, f"{name.replace(' ', '_').replace('=', '-')}-{args.steps}")
        run_distill(DistillConfig(cache=os.path.join(args.demo, "cache"), out=run, objective=objective,
                                  steps=args.steps, seed=args.seed, workers=0, device="cpu", **{**STUDENT, **knobs}))
        long = evaluate(args.demo, work, os.path.join(run, "checkpoint.pt"), args.seed)
        if objective not in shown:
            shown.add(objective)
            print(f"| {objective} (the demo's run) | {demo_steps} | " + " | ".join(f"{100 * short.get(c, float('nan')):.1f}" for c in COLUMNS) + " |")
        print(f"| {name} | {args.steps} | " + " | ".join(f"{100 * long.get(c, float('nan')):.1f}" for c in COLUMNS) + " |")
        print(f"| {name} | ratio to the demo's {objective} | "
              + " | ".join(f"{long[c] / max(short.get(c, 0), 1e-9):.2f}x" for c in COLUMNS) + " |")

    # the checkpoint only names the architecture and preprocessing of the scratch row
    # any demo checkpoint names the architecture and preprocessing of the scratch row
    demo_run = sorted(glob.glob(os.path.join(args.demo, "runs", f"distinit-seed{args.seed}-*", "checkpoint.pt")))[0]
    ft = evaluate(args.demo, work, demo_run, args.seed,
                  inits=("scratch",), protocols=("finetune",), finetune_epochs=args.finetune_epochs)
    print(f"\n(3) supervised ceiling: {STUDENT['student']} from random weights fine-tuned {args.finetune_epochs} epochs "
          f"on the labels: object {100 * ft[('object', 'finetune', 'video_top1')]:.1f} %, "
          f"motion {100 * ft[('motion', 'finetune', 'video_top1')]:.1f} %")


if __name__ == "__main__":
    main()
