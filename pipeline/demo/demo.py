"""`cli.py demo`: the whole pipeline on the generated benchmark, on CPU, in minutes.

generate (pipeline/demo/synthetic.py) -> extract the unlabelled pool -> distill with each objective ->
evaluate every student and the baselines (scratch, inflate, teacher) with a linear probe and kNN on
both label sets (object, motion) -> one table, report.md and a bar chart.
"""
import contextlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from pipeline.common.config import (
    ConceptsConfig,
    DistillConfig,
    EvalConfig,
    ExtractConfig,
    group_rule,
    objective_parts,
)
from pipeline.common.precision import describe_precision, resolve_precision
from pipeline.common.progress import progress_bar
from pipeline.demo.synthetic import MOTIONS, PHOTOS, generate_benchmark
from pipeline.distill.concepts import run_concepts
from pipeline.distill.train import run_distill
from pipeline.evaluate.evaluate import run_eval
from pipeline.evaluate.tasks import load_csv, stratified_split
from pipeline.extract.extract import run_extract

BASELINES = ("scratch", "inflate", "teacher")
COLUMNS = [("object", "linear", "video_top1"), ("object", "knn", "k20_top1"), ("object", "zeroshot", "video_top1"),
           ("motion", "linear", "video_top1"), ("motion", "knn", "k20_top1")]
# lss's concept bank: Kinetics-400's action names and the content words of each (the built-in
# descriptions); the demo's own label names are never in it, so its zero-shot column is not transductive
CONCEPTS = dict(classes="k400")

# Sized so the default demo finishes in under 10 minutes on 2 CPU cores; --quick is a smoke test.
# 256 labelled clips: a 77-video test split, so one video moves a number by 1.3 points, not 2.6.
# Steps: the contrastive students (modist, both) `steps`, the distinit ones `distinit_steps`. Both keep
# learning past 400 (bench/learning.py), so each gets what fits in the 10 minutes: a distinit step costs
# 0.4 of a modist step, and 600 modist steps fit once generating the benchmark and decoding its labelled
# clips used both cores. On both benchmarks' validation splits 600 matched or beat 400 on motion
# (BENCHMARKS.md, "How the demo's recipe was chosen": steps). The students that start from the inflated
# network take 9-17x an r3d_cpu step's time; on validation 200 steps kept the objects better than 100, and
# 150 is what fits beside the others.
SIZES = {
    "default": dict(n_pool=128, n_labelled=256, n_frames=24, steps=600, distinit_steps=800, inflated_steps=150,
                    eval_clips=2),
    "quick": dict(n_pool=16, n_labelled=32, n_frames=16, steps=3, distinit_steps=6, inflated_steps=2, eval_clips=1),
}
# Knobs chosen on the validation split (the training side of the test split, split again) with
# bench/demo_diagnosis.py; BENCHMARKS.md has the runs. The object fills ~1/4 of the frame width, so
# crops keep >= 60 % of the frame; the queue holds one key per pool video. Warm-up and key momentum
# follow the run's length (distill's defaults).
STUDENT = dict(student="r3d_cpu", clip_len=8, stride=2, crop=64, crop_scale=0.6, batch_size=8, lr=2e-3,
               queue_size=128)
# What MoDist needs on 128 videos and a few hundred steps (the validation ablation in BENCHMARKS.md):
# the RGB student's cross-modal term weighted 4 (at 1, RGB<->RGB, solved by appearance, outweighs it);
# the flow<->flow term on, so the motion pathway learns motion from both sides; no colour augmentation
# (colouring every view cost most of the motion) and keys normalised as one batch (4 sub-batches cost
# motion, 2 were within noise: one is the previous version's). distill's defaults stay the papers', for
# real data at scale.
MOTION = dict(cross_weight=4.0, flow_weight=1.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, shuffle_bn_groups=1)
RECIPE = {"distinit": {}, "modist": MOTION, "both": MOTION, "distinit+lss": {}}  # what each objective adds
# Students that start from the teacher's network made temporal (efficientnet3d_lite0 inflated from Lite0,
# models/inflate.py). Chosen on the validation split (BENCHMARKS.md, "Students and their start"): lr 5e-4,
# where 1e-3 and 2e-3 (with frozen BatchNorm statistics) collapsed the features within 100 steps.
INFLATED = dict(student="efficientnet3d_lite0", init="inflate", lr=5e-4)
# The students the demo trains, one row each: {row: (objective, knobs on top of STUDENT and RECIPE)}.
# distinit and modist start from scratch (r3d_cpu), to show what each objective teaches; both and lss
# start from the inflated network, to keep its objects (from scratch, both lost 39 object points to
# distinit and distinit+lss 22: BENCHMARKS.md, "Objectives that add up").
RUNS = {"distinit": ("distinit", {}), "modist": ("modist", {}),
        "both ← inflate": ("both", dict(INFLATED, balance="grad")),
        # LSS as its paper trains it: the image model made temporal, adapted by self-distillation from its
        # momentum copy, with concept distillation and alignment
        "lss ← inflate": ("lss", dict(INFLATED, concept_self_weight=1.0))}
FRAMES = dict(height=96, width=128, teacher_every=2)
# students trained side by side (each on its share of the cores): 2 on 2 cores, up to all 4 on more
PARALLEL = max(1, min(len(RUNS), os.cpu_count() or 1))


def run_folder(row):
    """A row's name as a folder name: "both ← inflate" -> "both-from-inflate"."""
    return row.replace(" ← ", "-from-")


def distill_config(cache, out, objective, steps, seed, bank="", workers=0, progress=False, **knobs):
    """The DistillConfig the demo trains `objective` with: STUDENT, then the objective's RECIPE, then
    `knobs` (a variant's changes, as bench/demo_diagnosis.py tries them)."""
    return DistillConfig(cache=cache, out=out, objective=objective, steps=steps, seed=seed, workers=workers,
                         progress=progress, device="cpu", concepts=bank if "lss" in objective else "",
                         **{**STUDENT, **RECIPE.get(objective, {}), **knobs})


def run_demo(out="demo_out", quick=False, seeds=1, steps=None, workers=0, progress=True, log=print, photos=None,
             textures=None, generator_seed=0, precision="auto"):
    """steps: every student's (None: SIZES'); photos / textures / generator_seed: another benchmark of the
    same kind (synthetic.generate_benchmark); precision: the students' (distill's and eval's --precision)."""
    t0 = time.time()
    precision = resolve_precision(precision, "cpu")
    log(describe_precision(precision, "cpu"))
    size = dict(SIZES["quick" if quick else "default"],
                **({"steps": steps, "distinit_steps": steps, "inflated_steps": steps} if steps else {}))
    stage = _stages(log, t0)
    cache, bank, benchmark = prepare_benchmark(out, size, stage, progress, log, photos, textures, generator_seed)

    rows, steps = [], student_steps(size)
    for seed in range(seeds):
        stage(f"distill {', '.join(RUNS)} (seed {seed}), {PARALLEL} at a time")
        runs = {row: os.path.join(out, "runs", f"{run_folder(row)}-seed{seed}-{steps[row]}steps")
                for row in RUNS}  # a rerun resumes each
        train_students({row: distill_config(cache, run, RUNS[row][0], steps[row], seed, bank, workers,
                                            **dict(RUNS[row][1], precision=precision))
                        for row, run in runs.items()}, log)
        runs = {row: os.path.join(run, "checkpoint.pt") for row, run in runs.items()}
        for label_set in ("object", "motion"):
            stage(f"eval on {label_set} labels (seed {seed}): {', '.join([*RUNS, *BASELINES])}")
            rows += evaluate_runs(out, runs, label_set, seed, size["eval_clips"], progress, precision=precision)
    report = write_demo_report(out, rows, seeds, size, time.time() - t0, benchmark, precision)
    log(report)
    return rows


def student_steps(size):
    """{row: its steps}: `inflated_steps` for the students that start from the inflated network, else
    `steps` for the contrastive ones and `distinit_steps` for the others."""
    return {row: size["inflated_steps"] if knobs.get("init") == "inflate" else
            size["steps"] if "modist" in objective_parts(objective) else size["distinit_steps"]
            for row, (objective, knobs) in RUNS.items()}


def train_students(configs, log=print, processes=None):
    """Train the demo's students {name: DistillConfig}, `processes` at a time (default PARALLEL), the
    cores shared out between them. Small 3D convolutions do not keep two cores busy from one process
    (a modist step on 1 thread takes 1.5x the time it takes on 2), so two students side by side on
    one thread each learn the same in ~70 % of the time. Each run's own output goes to RUN/distill.log."""
    processes = min(processes or PARALLEL, len(configs))
    threads = max(1, (os.cpu_count() or 1) // processes)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=torch_threads, initargs=(threads,)) as pool:
        # the longest first, each next one on the first free core: two cores finish together
        order = sorted(configs, key=lambda name: -configs[name].steps * step_seconds(configs[name]))
        futures = {pool.submit(distill_quietly, configs[name]): name for name in order}
        for future in as_completed(futures):
            s = future.result()
            log(f"  {futures[future]}: {s['steps']} steps in {s['wall_seconds']:.0f} s "
                f"({s['steps_this_run']} this run) -> {s['checkpoint']}")


# Seconds per step of the demo's students, one thread each, bf16 (the demo's first seed, 2026-12-06, AMD EPYC):
# what orders the runs, longest first
STEP_SECONDS = {("r3d_cpu", False): 0.095, ("r3d_cpu", True): 0.225,
                ("efficientnet3d_lite0", False): 1.64, ("efficientnet3d_lite0", True): 2.0}


def step_seconds(cfg):
    """A student's expected seconds per step (STEP_SECONDS; another student counts as r3d_cpu)."""
    contrastive = "modist" in objective_parts(cfg.objective)
    return STEP_SECONDS.get((cfg.student, contrastive), STEP_SECONDS[("r3d_cpu", contrastive)])


def torch_threads(n):
    import torch
    torch.set_num_threads(n)


def distill_quietly(cfg):
    """run_distill with its plan lines and warnings in RUN/distill.log instead of the demo's output."""
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "distill.log"), "a") as f, contextlib.redirect_stdout(f):
        return run_distill(cfg)


def prepare_benchmark(out, size, stage, progress=True, log=print, photos=None, textures=None, generator_seed=0,
                      frames=None):
    """Generate the benchmark, extract its unlabelled pool and build lss's concept bank (each step a no-op
    when already done). Returns (cache, bank, the benchmark's parameters)."""
    data, cache = os.path.join(out, "data"), os.path.join(out, "cache")
    refuse_another_benchmark(data, list(photos or PHOTOS), generator_seed)
    stage("generating the benchmark (real photos on real textures, 8 motions)")
    bar = progress_bar(total=size["n_pool"] + size["n_labelled"], desc="generate", unit="clip", disable=not progress)
    benchmark = generate_benchmark(data, size["n_pool"], size["n_labelled"], size["n_frames"], seed=generator_seed,
                                   progress=lambda k, n: bar.update(k - bar.n), photos=photos, textures=textures)
    bar.close()

    stage("extract: decode the unlabelled pool, run the teacher and DIS flow")
    # a benchmark generated anew in this folder rewrites its files: extract sees the changed sources and
    # extracts them again
    ex = run_extract(ExtractConfig(videos=os.path.join(data, "pool"), cache=cache, shard=(0, 1),
                                   progress=progress, **(frames or FRAMES)))
    log(f"  {ex['done'] + ex['skipped']} videos in {cache} ({ex['failed']} failed)")

    stage("concepts: Kinetics-400 action names and their words in MiniLM's text space (for lss)")
    bank = os.path.join(out, "concepts-k400.h5")
    if not os.path.exists(bank):
        run_concepts(ConceptsConfig(out=bank, **CONCEPTS))
    return cache, bank, benchmark


def refuse_another_benchmark(data, objects, generator_seed):
    """A folder keeps the benchmark it was made with: other pictures or another seed would regenerate it
    under the runs and results already there, which would then describe a benchmark that is gone.
    (Another size, as --quick then the default, is regenerated: its runs carry their step counts.)"""
    marker = os.path.join(data, "benchmark.json")
    if not os.path.exists(marker):
        return
    held = json.load(open(marker))
    if (held["objects"], held["seed"]) != (objects, generator_seed):
        raise ValueError(f"{marker}: this folder holds another benchmark (objects {held['objects']}, generator "
                         f"seed {held['seed']}), not objects {objects}, seed {generator_seed}; name that "
                         f"benchmark's pictures and seed, or use another folder")


def evaluate_runs(out, runs, label_set, seed, clips, progress=True, validation=False, baselines=BASELINES,
                  protocols=None, precision="auto"):
    """Table rows of the distilled runs {name: checkpoint} and the baselines on one label set.

    The test split is the task's seeded 70/30 split; with validation=True the training side of it is
    split again (70/30, stratified) and scored instead, so knobs are chosen without seeing the test set.
    """
    data = os.path.join(out, "data", "labelled")
    lists = validation_lists(out, label_set, seed) if validation else {}
    # the baselines first: their teacher row runs inside the one decode of the labelled videos, which
    # every student's evaluation then reads
    evals = [(None, dict(checkpoint=next(iter(runs.values())), inits=baselines))] if baselines else []
    evals += [(name, dict(checkpoint=ckpt, inits=("checkpoint",))) for name, ckpt in runs.items()]
    got = []
    for name, kw in evals:
        # both label sets are columns of one labels.csv over the same videos, so they share one
        # decoded-frames cache and one feature store (work)
        result, _, _ = run_eval(EvalConfig(task="csv", root=os.path.join(data, "videos"),
                                           labels=os.path.join(data, "labels.csv"), label_column=label_set,
                                           work=os.path.join(out, "eval"),
                                           out=os.path.join(out, "eval", "validation" if validation else "test",
                                                            label_set, run_folder(name or "baselines"), f"seed{seed}"),
                                           # zero-shot reads object names; the teacher knows no motion words
                                           protocols=protocols or ("linear", "knn") + (
                                               ("zeroshot",) if label_set == "object" else ()),
                                           clips=clips, seed=seed, progress=progress,
                                           device="cpu", precision=precision, teacher_every=8,
                                           decode_workers=PARALLEL,
                                           **lists, **kw))
        got += [dict(r, row=name or r["init"], label_set=label_set) for r in result]
    return got


def validation_lists(out, label_set, seed):
    """train_list / test_list files: the training side of the demo's test split, split again."""
    data = os.path.join(out, "data", "labelled")
    task = load_csv(os.path.join(data, "videos"), os.path.join(data, "labels.csv"), label_set, seed=seed)
    fit, val = stratified_split(task.train, len(task.classes), 0.3, seed, group_rule("csv"))
    folder = os.path.join(out, "eval", "validation")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for key, videos in (("train_list", fit), ("test_list", val)):
        paths[key] = os.path.join(folder, f"{label_set}-seed{seed}-{key}.txt")
        with open(paths[key], "w") as f:
            f.writelines(f"{vid}\n" for vid, _, _ in videos)
    return paths


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


def write_demo_report(out, rows, seeds, size, wall, benchmark, precision="fp32"):
    stats = summarise(rows)
    steps = student_steps(size)
    objects = benchmark["objects"]
    order = list(BASELINES) + list(RUNS)
    header = "| row | " + " | ".join(f"{ls} {p} {m}" for ls, p, m in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in order:
        cells = []
        for ls, p, m in COLUMNS:
            mean, std, n = stats.get((row, ls, p, m), (float("nan"), 0.0, 0))
            cells.append("–" if n == 0 else f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    r0 = rows[0]
    text = (f"# vidistill demo\n\nGenerated benchmark: {size['n_pool']} unlabelled + {size['n_labelled']} labelled "
            f"clips ({size['n_frames']} frames at 8 fps), {len(objects)} objects (chance {100 / len(objects):.1f} %), "
            f"{len(MOTIONS)} motions (chance {100 / len(MOTIONS):.1f} %).\n"
            f"Students: {STUDENT['student']} from scratch, and {INFLATED['student']} from the teacher made "
            f"temporal (the ← inflate rows); steps {', '.join(f'{o} {n}' for o, n in steps.items())}, "
            f"batch {STUDENT['batch_size']}, clips "
            f"{STUDENT['clip_len']}x{STUDENT['crop']}^2 stride {STUDENT['stride']}, {precision}; per objective "
            f"{ {k: v for k, v in RECIPE.items() if v} }; per row { {k: v for k, (_, v) in RUNS.items() if v} }; "
            f"every other setting is distill's default. "
            f"The knobs were chosen on a validation split carved from the labelled training "
            f"clips (bench/demo_diagnosis.py); the test split below is touched once, for this table.\n"
            f"Protocol: labels.csv task per label set, stratified 70/30 split (seeded), {r0['views']}; linear = logistic "
            f"regression on frozen features, video-level top-1; knn = cosine k=20, T 0.07; zeroshot = cosine to the "
            f"object names' MiniLM embeddings, test side, no training (the 2D teacher through its ImageNet "
            f"bridge; a distinit student through its ImageNet head and the bridge; an lss student through its "
            f"concept head; modist and inflate have no text space). lss's bank: Kinetics-400 names, never the demo's labels. Accuracy in %, "
            + (f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed") + f". Wall time {wall / 60:.1f} min.\n\n"
            f"{table}\n")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"rows": rows, "summary": {"|".join(k): v for k, v in stats.items()}, "steps": steps,
                   "seeds": seeds, "wall_seconds": wall}, f, indent=1)
    plot_report(os.path.join(out, "report.png"), stats, order, len(objects))
    return text


def plot_report(path, stats, order, n_objects):
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
    ax.axhline(100 / n_objects, color="gray", ls=":", lw=1)
    ax.axhline(100 / len(MOTIONS), color="gray", ls="--", lw=1)
    ax.set_xticks(np.arange(len(order)), order)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("vidistill demo: what (object) and how (motion); dotted/dashed = chance")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
