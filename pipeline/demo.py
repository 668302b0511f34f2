"""`cli.py demo`: the whole pipeline on the generated benchmark, on CPU, in minutes.

generate (pipeline/synthetic.py) -> extract the unlabelled pool -> distill with each objective ->
evaluate every student and the baselines (scratch, inflate, teacher) with a linear probe and kNN on
both label sets (object, motion) -> one table, report.md and a bar chart.
"""
import json
import os
import time

import numpy as np
from tqdm import tqdm

from pipeline.config import OBJECTIVES, DistillConfig, EvalConfig, ExtractConfig
from pipeline.distill import run_distill
from pipeline.evaluate import run_eval
from pipeline.extract import run_extract
from pipeline.synthetic import MOTIONS, OBJECTS, generate_benchmark
BASELINES = ("scratch", "inflate", "teacher")
COLUMNS = [("object", "linear", "video_top1"), ("object", "knn", "k20_top1"),
           ("motion", "linear", "video_top1"), ("motion", "knn", "k20_top1")]

# Sized so the default demo finishes in under 10 minutes on 2 CPU cores; --quick is a smoke test.
# 256 labelled clips: a 77-video test split, so one video moves a number by 1.3 points, not 2.6.
SIZES = {
    "default": dict(n_pool=128, n_labelled=256, n_frames=24, steps=400, eval_clips=2),
    "quick": dict(n_pool=16, n_labelled=32, n_frames=16, steps=3, eval_clips=1),
}
# Knobs set from measurements on this benchmark (bench/demo_diagnosis.py, BENCHMARKS.md): the object
# fills ~1/4 of the frame width, so crops keep >= 60 % of the frame (0.25 often cut it out: object
# linear 47 -> 55 %); the momentum encoder must move within a few hundred steps (0.999 is for 100k-step
# runs); the queue holds one key per pool video. cross_weight 4: at weight 1 the RGB<->RGB term is
# solved by appearance and the student learns little motion (motion linear 29 % at 600 steps); weighting
# the RGB<->flow term 4x gave 58 % (modist) and 66 % (both).
STUDENT = dict(student="r3d_cpu", clip_len=8, stride=2, crop=64, crop_scale=0.6, batch_size=8, lr=2e-3,
               warmup_steps=10, momentum=0.99, queue_size=128, cross_weight=4.0)
FRAMES = dict(height=96, width=128, teacher_every=2)


def run_demo(out="demo_out", quick=False, seeds=1, steps=None, workers=0, progress=True, log=print):
    t0 = time.time()
    size = dict(SIZES["quick" if quick else "default"], **({"steps": steps} if steps else {}))
    data, cache = os.path.join(out, "data"), os.path.join(out, "cache")
    stage = _stages(log, t0)

    stage("generating the benchmark (real photos on real textures, 8 motions)")
    bar = tqdm(total=size["n_pool"] + size["n_labelled"], desc="generate", unit="clip", disable=not progress)
    generate_benchmark(data, size["n_pool"], size["n_labelled"], size["n_frames"], seed=0,
                       progress=lambda k, n: bar.update(k - bar.n))
    bar.close()

    stage("extract: decode the unlabelled pool, run the teacher and DIS flow")
    ex = run_extract(ExtractConfig(videos=os.path.join(data, "pool"), cache=cache, shard=(0, 1),
                                   progress=progress, **FRAMES))
    log(f"  {ex['done'] + ex['skipped']} videos in {cache} ({ex['failed']} failed)")

    rows = []
    for seed in range(seeds):
        runs = {}
        for objective in OBJECTIVES:
            stage(f"distill --objective {objective} (seed {seed})")
            run = os.path.join(out, "runs", f"{objective}-seed{seed}-{size['steps']}steps")  # a rerun resumes it
            run_distill(DistillConfig(cache=cache, out=run, objective=objective, steps=size["steps"], seed=seed,
                                      workers=workers, progress=progress, device="cpu", **STUDENT))
            runs[objective] = os.path.join(run, "checkpoint.pt")
        for label_set in ("object", "motion"):
            stage(f"eval on {label_set} labels (seed {seed}): {', '.join(OBJECTIVES + BASELINES)}")
            evals = [(o, dict(checkpoint=runs[o], inits=("checkpoint",))) for o in OBJECTIVES]
            # baselines use the distilled runs' preprocessing and architecture (via the checkpoint)
            evals.append((None, dict(checkpoint=runs["distinit"], inits=BASELINES)))
            for name, kw in evals:
                # both label sets are columns of one labels.csv over the same videos, so they share one
                # decoded-frames cache and one feature store (work)
                result, _, _ = run_eval(EvalConfig(task="csv", root=os.path.join(data, "labelled", "videos"),
                                                   labels=os.path.join(data, "labelled", "labels.csv"),
                                                   label_column=label_set, work=os.path.join(out, "eval"),
                                                   out=os.path.join(out, "eval", label_set, name or "baselines", f"seed{seed}"),
                                                   protocols=("linear", "knn"), clips=size["eval_clips"],
                                                   seed=seed, progress=progress, device="cpu", teacher_every=4, **kw))
                for r in result:
                    rows.append(dict(r, row=name or r["init"], label_set=label_set))
    report = write_demo_report(out, rows, seeds, size, time.time() - t0)
    log(report)
    return rows


def _stages(log, t0):
    count = [0]

    def stage(text):
        count[0] += 1
        log(f"[{count[0]}] {text}  ({time.time() - t0:.0f}s)")
    return stage


def summarise(rows):
    """{(row, label_set, protocol, metric): (mean, std, n)} over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["row"], r["label_set"], r["protocol"], r["metric"]), []).append(r["value"])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def write_demo_report(out, rows, seeds, size, wall):
    stats = summarise(rows)
    order = list(BASELINES) + list(OBJECTIVES)
    header = "| row | " + " | ".join(f"{ls} {p} {m}" for ls, p, m in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in order:
        cells = []
        for ls, p, m in COLUMNS:
            mean, std, n = stats.get((row, ls, p, m), (float("nan"), 0.0, 0))
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    r0 = rows[0]
    text = (f"# vidistill demo\n\nGenerated benchmark: {size['n_pool']} unlabelled + {size['n_labelled']} labelled "
            f"clips ({size['n_frames']} frames at 8 fps), {len(OBJECTS)} objects (chance {100 / len(OBJECTS):.1f} %), "
            f"{len(MOTIONS)} motions (chance {100 / len(MOTIONS):.1f} %).\n"
            f"Students: {STUDENT['student']}, {size['steps']} steps, batch {STUDENT['batch_size']}, clips "
            f"{STUDENT['clip_len']}x{STUDENT['crop']}^2 stride {STUDENT['stride']}; modist/both weight the RGB<->flow "
            f"term {STUDENT['cross_weight']:g}x.\n"
            f"Protocol: labels.csv task per label set, stratified 70/30 split (seeded), {r0['views']}; linear = logistic "
            f"regression on frozen features, video-level top-1; knn = cosine k=20, T 0.07. Accuracy in %, "
            + (f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed") + f". Wall time {wall / 60:.1f} min.\n\n"
            f"{table}\n")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"rows": rows, "summary": {"|".join(k): v for k, v in stats.items()}, "steps": size["steps"],
                   "wall_seconds": wall}, f, indent=1)
    plot_report(os.path.join(out, "report.png"), stats, order)
    return text


def plot_report(path, stats, order):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(COLUMNS)
    for j, (ls, p, m) in enumerate(COLUMNS):
        means = [100 * stats.get((r, ls, p, m), (np.nan, 0, 0))[0] for r in order]
        stds = [100 * stats.get((r, ls, p, m), (0, 0, 0))[1] for r in order]
        ax.bar(np.arange(len(order)) + (j - (len(COLUMNS) - 1) / 2) * width, means, width, yerr=stds,
               label=f"{ls} ({p})", capsize=2)
    ax.axhline(100 / len(OBJECTS), color="gray", ls=":", lw=1)
    ax.axhline(100 / len(MOTIONS), color="gray", ls="--", lw=1)
    ax.set_xticks(np.arange(len(order)), order)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("vidistill demo: what (object) and how (motion); dotted/dashed = chance")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
