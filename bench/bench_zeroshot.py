"""Zero-shot of lss students against their teacher and scratch, on the demo's object labels and on
real action clips (the 16 labelled clips in ../shared/data/clips, when that folder is present).

    python bench/bench_zeroshot.py --demo demo_out     # after `cli.py demo --out demo_out`

Trains (or resumes) lss, distinit+lss and distinit+modist+lss on the demo's cache with the demo's
settings, then scores every row by `eval --protocol zeroshot` alone, so every video is scored (nothing
is trained on them): the demo's 256 labelled clips by their object labels, and the real clips. The ratio printed
is each row's top-1 over the teacher's, the baseline LSS is compared against.
"""
import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.common.config import ConceptsConfig, DistillConfig, EvalConfig
from pipeline.demo.demo import CONCEPTS, SIZES, STUDENT
from pipeline.distill.concepts import run_concepts
from pipeline.distill.train import run_distill
from pipeline.evaluate.evaluate import run_eval

OBJECTIVES = ("lss", "distinit+lss", "distinit+modist+lss")
SHARED_CLIPS = os.path.join(os.path.dirname(REPO), "shared", "data", "clips")


def real_clips_folder():
    """A folder task over ../shared/data/clips (DATASET/CLASS/FILE): one sub-folder per class."""
    if not os.path.isdir(SHARED_CLIPS):
        return None
    root = tempfile.mkdtemp(prefix="zeroshot-clips-")
    for dataset in sorted(os.listdir(SHARED_CLIPS)):
        for name in sorted(os.listdir(os.path.join(SHARED_CLIPS, dataset))):
            os.symlink(os.path.join(SHARED_CLIPS, dataset, name), os.path.join(root, name))
    return root


def zeroshot_rows(task_kw, checkpoint, out, seed, inits):
    """{(init, metric): value}; the checkpoint also sets the baselines' preprocessing and text encoder."""
    rows, _, _ = run_eval(EvalConfig(protocols=("zeroshot",), checkpoint=checkpoint, out=out, seed=seed, clips=2,
                                     inits=inits, teacher_every=4, device="cpu", progress=False, **task_kw))
    return {(r["init"], r["metric"]): r["value"] for r in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="output folder of `cli.py demo` (default sizes)")
    ap.add_argument("--steps", type=int, default=SIZES["default"]["distinit_steps"],
                    help="every student's steps (default: the demo's distinit+lss)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = os.path.join(args.demo, "zeroshot")
    bank = os.path.join(args.demo, "concepts-k400.h5")
    if not os.path.exists(bank):
        run_concepts(ConceptsConfig(out=bank, **CONCEPTS))
    labelled = os.path.join(args.demo, "data", "labelled")
    tasks = {"demo objects (all labelled)": dict(task="csv", root=os.path.join(labelled, "videos"), label_column="object",
                                              labels=os.path.join(labelled, "labels.csv"),
                                              work=os.path.join(args.demo, "eval"))}
    clips = real_clips_folder()
    if clips:
        tasks["16 real clips (all)"] = dict(task="folder", root=clips, work=os.path.join(work, "clips-eval"))
    else:
        print(f"{SHARED_CLIPS} not found: real clips skipped")
    checkpoints = {}
    for objective in OBJECTIVES:
        run = os.path.join(work, f"{objective}-seed{args.seed}-{args.steps}steps")
        run_distill(DistillConfig(cache=os.path.join(args.demo, "cache"), out=run, objective=objective, steps=args.steps,
                                  seed=args.seed, workers=0, device="cpu", progress=False, concepts=bank, **STUDENT))
        checkpoints[objective] = os.path.join(run, "checkpoint.pt")
    for name, task_kw in tasks.items():
        folder = os.path.join(work, "eval", name.split()[0])
        got = zeroshot_rows(task_kw, checkpoints[OBJECTIVES[0]], os.path.join(folder, "baselines"), args.seed,
                            ("scratch", "teacher"))
        for objective, ckpt in checkpoints.items():
            mine = zeroshot_rows(task_kw, ckpt, os.path.join(folder, objective), args.seed, ("checkpoint",))
            got.update({(objective, m): v for (_, m), v in mine.items()})
        metrics = sorted({m for _, m in got}, key=lambda m: (m.startswith("clip"), m))
        teacher = got[("teacher", "video_top1")]
        print(f"\n{name}: zero-shot, {args.steps} steps, seed {args.seed}; ratio = video top-1 / the teacher's")
        print("| row | " + " | ".join(metrics) + " | ratio |")
        print("|---|" + "---|" * (len(metrics) + 1))
        for row in ("teacher", "scratch") + OBJECTIVES:
            values = [got.get((row, m)) for m in metrics]
            cells = " | ".join("–" if v is None else f"{100 * v:.1f}" for v in values)
            print(f"| {row} | {cells} | {got[(row, 'video_top1')] / max(teacher, 1e-9):.2f} |", flush=True)


if __name__ == "__main__":
    main()
