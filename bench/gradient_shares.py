"""Which objective drives the backbone: each objective's share of the gradient reaching it, for every '+'
combination, from random weights and from the inflated network, with `--balance none` and `--balance grad`.

A share is what distill logs as objective_share/<objective> (pipeline/distill/balance.py objective_shares:
an objective's part of the summed norms of every objective's scaled gradient at the backbone's pooled
features, what --balance grad evens out), averaged over the second half of the run, when the smoothed
norms have settled; beside it, its terms' share/<term> summed.
From scratch the student is the demo's (pipeline/demo/demo.py STUDENT, with MoDist's MOTION knobs when
modist is in the combination); from the inflated network it is the demo's inflated students' recipe
(INFLATED; lss with its self-distillation, as the demo's `lss ← inflate`). Shares need no labels: nothing
is evaluated, so the runs can be short.

    python bench/gradient_shares.py --demo demo_out                 # 16 runs of 40 steps: 40 min on 2 shared cores
    python bench/gradient_shares.py --demo demo_out --starts scratch --objectives both distinit+lss

Writes WORK/gradient_shares.json (WORK: DEMO/gradient_shares); a rerun reuses finished runs.
"""
import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.common.config import objective_parts
from pipeline.demo.demo import INFLATED, MOTION, SIZES, distill_config, prepare_benchmark
from pipeline.distill.balance import part_of
from pipeline.distill.train import run_distill

COMBINATIONS = ("both", "distinit+lss", "modist+lss", "distinit+modist+lss")
STARTS = ("scratch", "inflate")


def knobs_for(objective, start, balance):
    """The run's knobs on top of the demo's STUDENT: MoDist's when it is in the combination, the inflated
    rows' from the inflated start."""
    parts = objective_parts(objective)
    knobs = dict(MOTION if "modist" in parts else {}, balance=balance, log_every=5)
    if start == "inflate":
        knobs.update(INFLATED, **({"concept_self_weight": 1.0} if "lss" in parts else {}))
    return knobs


def settled_shares(log_path):
    """Means over the second half of the run's records: {objective: its share}, {objective: its terms'
    shares summed} (larger where its terms pull against each other), {objective: its scale}, and the
    gradient norm before clipping."""
    late = [json.loads(line) for line in open(log_path)]
    late = late[len(late) // 2:]
    means = {"objective_share": {}, "share": {}, "scale": {}}  # a term's share is summed into its objective's
    for rec in late:
        for key, value in rec.items():
            group, _, name = key.partition("/")
            if group in means:
                name = part_of(name) if group == "share" else name
                means[group][name] = means[group].get(name, 0.0) + value / len(late)
    return means["objective_share"], means["share"], means["scale"], float(np.mean([r["grad_norm"] for r in late]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a `cli.py demo` folder (prepared here if it has no cache)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objectives", nargs="+", default=list(COMBINATIONS))
    ap.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    args = ap.parse_args()
    work = args.work or os.path.join(args.demo, "gradient_shares")
    os.makedirs(work, exist_ok=True)
    cache, bank, _ = prepare_benchmark(args.demo, SIZES["default"], lambda text: print(text, flush=True),
                                       progress=False)
    saved_path = os.path.join(work, "gradient_shares.json")
    saved = json.load(open(saved_path)) if os.path.exists(saved_path) else {}
    keys = []
    for start in args.starts:
        for objective in args.objectives:
            for balance in ("none", "grad"):
                key = f"{objective}|{start}|{balance}|seed{args.seed}|{args.steps}"
                keys.append(key)
                if key in saved:
                    continue
                run = os.path.join(work, "runs", key.replace("|", "-").replace("+", "_"))
                run_distill(distill_config(cache, run, objective, args.steps, args.seed, bank,
                                           **knobs_for(objective, start, balance)))
                shares, terms, scales, grad_norm = settled_shares(os.path.join(run, "log.jsonl"))
                saved[key] = {"shares": shares, "terms": terms, "scales": scales, "grad_norm": grad_norm}
                with open(saved_path + ".tmp", "w") as f:
                    json.dump(saved, f, indent=1)
                os.replace(saved_path + ".tmp", saved_path)
    print(f"\neach objective's share of the gradient at the backbone's features (in brackets its terms' shares summed), "
          f"and its scale; mean over the second half of {args.steps} steps, seed {args.seed}; equal weights")
    print("| start | objective | balance | distinit | modist | lss | scales | grad norm |")
    print("|---|---|---|---|---|---|---|---|")
    for key in keys:
        objective, start, balance = key.split("|")[:3]
        got = saved[key]
        cells = [f"{got['shares'][p]:.2f} ({got['terms'][p]:.2f})" if p in got["shares"] else "–"
                 for p in ("distinit", "modist", "lss")]
        scales = ", ".join(f"{p} {s:.2g}" for p, s in got["scales"].items())
        print(f"| {start} | {objective} | {balance} | " + " | ".join(cells) + f" | {scales} | {got['grad_norm']:.2f} |")


if __name__ == "__main__":
    main()
