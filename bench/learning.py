"""Learning curves: validation accuracy against training steps, each objective and the baselines.

Each point is its own run of that many steps with the demo's recipe (pipeline/demo/demo.py: STUDENT and
RECIPE), since warm-up, cosine decay and key momentum all follow a run's length; a checkpoint taken
midway through a longer run would be another recipe. Scored like bench/demo_diagnosis.py: the
validation split of the demo's benchmark (the training side of its test split, split again), never the
test split. Shows where each objective saturates and whether the demo's step count sits on the flat part.

    python bench/learning.py --demo demo_out                      # 150 300 600 1200 steps, ~40 min on 2 cores
    python bench/learning.py --demo demo_out --steps 300 600 --objectives modist "both ← inflate" --seed 1

--objectives takes the demo's rows (each with its own knobs, pipeline/demo/demo.py RUNS) or any distill
objective (the demo's recipe from scratch).

Writes WORK/learning.png and WORK/learning.json (WORK: DEMO/learning); a rerun reuses finished points.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.demo_diagnosis import evaluate, pictures  # the validation split and the other pictures
from pipeline.demo.demo import (
    BASELINES,
    COLUMNS,
    RUNS,
    SIZES,
    distill_config,
    prepare_benchmark,
    run_folder,
    student_steps,
)
from pipeline.distill.train import run_distill

CURVES = [c for c in COLUMNS if c[1] == "linear"] + [("object", "knn", "k20_top1")]  # what the plot shows


def column(ls, p, m):
    return f"{ls} {p} {m}"


def plot(path, points, baselines, steps, demo_steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4), sharex=True)
    for ax, c in zip(axes, CURVES):
        key = column(*c)
        for objective, by_steps in points.items():
            xs = [s for s in steps if str(s) in by_steps and key in by_steps[str(s)]]
            if xs:
                ax.plot(xs, [100 * by_steps[str(s)][key] for s in xs], marker="o", label=objective)
        for row, style in zip(BASELINES, (":", "--", "-.")):
            if key in baselines.get(row, {}):
                ax.axhline(100 * baselines[row][key], color="gray", ls=style, lw=1, label=row)
        for s in demo_steps:
            ax.axvline(s, color="black", lw=0.5, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_title(key)
        ax.set_xlabel("training steps (thin lines: the demo's, modist/both and distinit)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(points, baselines, steps):
    cols = [column(*c) for c in COLUMNS]
    lines = ["| objective | steps | " + " | ".join(cols) + " | minutes |", "|---|---|" + "---|" * (len(cols) + 1)]
    for objective, by_steps in points.items():
        for s in steps:
            p = by_steps.get(str(s))
            if p:
                lines.append(f"| {objective} | {s} | " + " | ".join("–" if c not in p else f"{100 * p[c]:.1f}"
                                                                   for c in cols) + f" | {p['minutes']:.1f} |")
    for row in BASELINES:
        b = baselines.get(row, {})
        lines.append(f"| {row} | – | " + " | ".join("–" if c not in b else f"{100 * b[c]:.1f}" for c in cols) + " | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a `cli.py demo` folder (prepared here if it has no cache)")
    ap.add_argument("--pictures", choices=("demo", "other"), default="demo")
    ap.add_argument("--generator-seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--steps", type=int, nargs="+", default=[150, 300, 600, 1200])
    ap.add_argument("--objectives", nargs="+", default=list(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = args.work or os.path.join(args.demo, "learning")
    os.makedirs(work, exist_ok=True)
    photos, textures = pictures(args.pictures)
    cache, bank, _ = prepare_benchmark(args.demo, SIZES["default"], lambda text: print(text, flush=True),
                                       progress=False, photos=photos, textures=textures,
                                       generator_seed=args.generator_seed)
    saved_path = os.path.join(work, "learning.json")
    saved = json.load(open(saved_path)) if os.path.exists(saved_path) else {"points": {}, "baselines": {}}
    points, baselines = saved["points"], saved["baselines"]
    key = f"seed{args.seed}"

    def save():
        with open(saved_path + ".tmp", "w") as f:
            json.dump(saved, f, indent=1)
        os.replace(saved_path + ".tmp", saved_path)
    t0 = time.time()
    for objective in args.objectives:
        for steps in args.steps:
            by_steps = points.setdefault(f"{objective}|{key}", {})
            if str(steps) in by_steps:
                continue
            run = os.path.join(work, "runs", f"{run_folder(objective)}-{key}-{steps}")
            t = time.time()
            name, knobs = RUNS.get(objective, (objective, {}))
            run_distill(distill_config(cache, run, name, steps, args.seed, bank, **knobs))
            minutes = (time.time() - t) / 60
            got = evaluate(args.demo, os.path.join(run, "checkpoint.pt"), args.seed, objective)[objective]
            by_steps[str(steps)] = dict(got, minutes=minutes)
            save()
            print(f"{objective} {steps} steps: " + ", ".join(f"{column(*c)} {100 * got.get(column(*c), np.nan):.1f}"
                                                             for c in CURVES) + f" ({minutes:.1f} min)", flush=True)
    if key not in baselines:
        first = os.path.join(work, "runs", "baselines-reference")
        run_distill(distill_config(cache, first, "distinit", 1, 0))
        got = evaluate(args.demo, os.path.join(first, "checkpoint.pt"), args.seed, "first", baselines=BASELINES)
        baselines[key] = {row: got[row] for row in BASELINES}
        save()
    mine = {p.split("|")[0]: v for p, v in points.items() if p.endswith(f"|{key}") and p.split("|")[0] in args.objectives}
    plot(os.path.join(work, "learning.png"), mine, baselines[key], args.steps,
         sorted(set(student_steps(SIZES["default"]).values())))
    print(f"\nvalidation accuracy (%) against steps, seed {args.seed}, {(time.time() - t0) / 60:.1f} min this run; "
          f"plot: {os.path.join(work, 'learning.png')}")
    print(table(mine, baselines[key], args.steps))


if __name__ == "__main__":
    main()
