"""DistInit's comparison as the paper makes it: one architecture, three initialisations, fine-tuned.

The 3D EfficientNet-Lite0 (`efficientnet3d_lite0`, the teacher's topology in 3D) starts four ways:
distilled from the teacher on the unlabelled pool from random weights (DistInit), I3D-inflated from the
teacher's ImageNet weights (`inflate`), inflated and then distilled (`distill --init inflate`), and
random (`scratch`). Each is then fine-tuned on the labelled clips (the paper's protocol) and also
linear-probed and kNN-scored, on both label sets of the demo's benchmark, over seeds. The paired gaps
to the inflated network are reported with 95 % t-intervals. A distilled student is compared only once
it agrees with its teacher: its training-health top-1 agreement (pipeline/distill/health.py, on fixed
held-back clips) is printed beside it; the comparison means something at >= 80 %.

    python bench/distinit_init.py --demo demo_out --seeds 0 1 2 --steps 300 --lr 5e-4 --protocols linear knn  # ~50 min
    python bench/distinit_init.py --demo demo_out --seeds 0 1 2 --steps 300 --lr 5e-4   # + 8 EfficientNet fine-tunes a seed
    python bench/distinit_init.py --demo other_out --pictures other --generator-seed 1 --starts inflate

Writes WORK/distinit_init.json (WORK: DEMO/distinit_init); a rerun reuses finished runs and evaluations.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.demo_diagnosis import interval, pictures
from pipeline.demo.demo import INFLATED, SIZES, distill_config, evaluate_runs, prepare_benchmark
from pipeline.distill.train import run_distill

STUDENT = "efficientnet3d_lite0"
ROWS = {"checkpoint": "distilled", "inflate": "inflated", "scratch": "random"}
STARTS = {"scratch": "distilled", "inflate": "inflated-then-distilled"}  # the distilled rows, by --init
METRICS = [("linear", "video_top1"), ("knn", "k20_top1"), ("finetune", "video_top1")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a `cli.py demo` folder (prepared here if it has no cache)")
    ap.add_argument("--pictures", choices=("demo", "other"), default="demo")
    ap.add_argument("--generator-seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--steps", type=int, default=600, help="distillation steps of the EfficientNet student")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--validation", action="store_true", help="score the validation split instead of the test split")
    ap.add_argument("--lr", type=float, default=None,
                    help="the distilled-from-random student's learning rate (default: the demo's r3d_cpu students')")
    ap.add_argument("--lr-inflated", type=float, default=INFLATED["lr"],
                    help="the inflated-then-distilled student's (default: the demo's inflated students')")
    ap.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS),
                    help="which distilled students: from random weights, from the inflated network, or both")
    ap.add_argument("--protocols", nargs="+", default=[p for p, _ in METRICS], choices=[p for p, _ in METRICS],
                    help="fine-tuning costs most: 8 of an EfficientNet per seed")
    ap.add_argument("--crop", type=int, default=None, help="distillation clip size (default: the demo's)")
    args = ap.parse_args()
    work = args.work or os.path.join(args.demo, "distinit_init")
    os.makedirs(work, exist_ok=True)
    photos, textures = pictures(args.pictures)
    cache, bank, _ = prepare_benchmark(args.demo, SIZES["default"], lambda text: print(text, flush=True),
                                       progress=False, photos=photos, textures=textures,
                                       generator_seed=args.generator_seed)
    saved_path = os.path.join(work, "distinit_init.json")
    saved = json.load(open(saved_path)) if os.path.exists(saved_path) else {}
    split = "validation" if args.validation else "test"
    knobs = {k: v for k, v in (("lr", args.lr), ("crop", args.crop)) if v is not None}
    start_knobs = {"scratch": knobs, "inflate": dict(knobs, lr=args.lr_inflated)}
    runs_tag = "".join(f"-{k}{v:g}" for k, v in knobs.items()) + (
        f"-lrinflated{args.lr_inflated:g}" if args.lr_inflated != INFLATED["lr"] else "")
    # results are kept per protocol set; the distilled students are shared (a later run adds fine-tuning)
    tag = runs_tag + ("-" + "+".join(args.protocols) if len(args.protocols) < len(METRICS) else "") + (
        "-" + "+".join(args.starts) if len(args.starts) < len(STARTS) else "")
    starts = {init: STARTS[init] for init in args.starts}
    for seed in args.seeds:
        key = f"{split}|seed{seed}|{args.steps}{tag}"
        if key in saved:
            continue
        got, minutes, agree = {}, {}, {}
        for init, name in starts.items():
            run = os.path.join(work, "runs", f"distinit-{STUDENT}-{init}-seed{seed}-{args.steps}{runs_tag}")
            t = time.time()
            run_distill(distill_config(cache, run, "distinit", args.steps, seed, student=STUDENT, init=init,
                                       **start_knobs[init]))
            minutes[name] = (time.time() - t) / 60
            last = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))][-1]
            agree[name] = last["health/distinit/top1_agree"]
            for label_set in ("object", "motion"):
                for r in evaluate_runs(args.demo, {name: os.path.join(run, "checkpoint.pt")}, label_set, seed,
                                       SIZES["default"]["eval_clips"], progress=False, validation=args.validation,
                                       baselines=("scratch", "inflate") if init == args.starts[0] else (),
                                       protocols=tuple(args.protocols)):
                    row = name if r["init"] == "checkpoint" else ROWS[r["init"]]
                    got[f"{row}|{label_set} {r['protocol']} {r['metric']}"] = r["value"]
        saved[key] = {"accuracy": got, "distill_minutes": minutes, "teacher_top1_agreement": agree}
        with open(saved_path + ".tmp", "w") as f:
            json.dump(saved, f, indent=1)
        os.replace(saved_path + ".tmp", saved_path)
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(got.items()))
              + "; top-1 agreement with the teacher " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in agree.items()),
              flush=True)
    runs = [saved[f"{split}|seed{s}|{args.steps}{tag}"]["accuracy"] for s in args.seeds]
    agreement = [saved[f"{split}|seed{s}|{args.steps}{tag}"]["teacher_top1_agreement"] for s in args.seeds]
    cols = [f"{ls} {p} {m}" for ls in ("object", "motion") for p, m in METRICS if p in args.protocols]
    print(f"\n{STUDENT}, {split} split, {args.steps} distillation steps {start_knobs}, seeds {args.seeds}: accuracy %, "
          "mean ± std; the distilled students' top-1 agreement with the teacher on held-back clips: "
          + ", ".join(f"{name} {100 * np.mean([a[name] for a in agreement]):.0f} %" for name in starts.values()))
    print("| initialisation | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in list(starts.values()) + ["inflated", "random"]:
        cells = []
        for c in cols:
            v = [100 * r[f"{row}|{c}"] for r in runs]
            cells.append(f"{np.mean(v):.1f} ± {np.std(v):.1f}")
        print(f"| {row} | " + " | ".join(cells) + " |")
    for name in starts.values():
        gaps = []
        for c in cols:
            mean, half = interval([100 * (r[f"{name}|{c}"] - r[f"inflated|{c}"]) for r in runs])
            gaps.append(f"{mean:+.1f} ± {half:.1f}")
        print(f"| {name} − inflated (95 % t-interval over seeds) | " + " | ".join(gaps) + " |")


if __name__ == "__main__":
    main()
