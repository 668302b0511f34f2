"""Put a demo run's table, chart and goals into README.md and BENCHMARKS.md (one command, no hand copying).

    python cli.py demo --seeds 3 --out demo_out && python bench/demo_tables.py demo_out
    python bench/demo_tables.py other_out --other --seeds 3     # runs the demo on the other benchmark

README.md: the block between <!-- demo-table --> and <!-- /demo-table -->, and docs/demo.png (the
chart). BENCHMARKS.md: the block between <!-- demo-table --> and <!-- /demo-table --> there, with the
run's wall time, steps, date and the learning goals as measured.

--other runs (or resumes) the demo's whole recipe on a benchmark of the same kind made with other
pictures and textures and another generator seed (bench/demo_diagnosis.py's OTHER_PICTURES), so the
ordering is checked away from the four photographs it was tuned on, and writes BENCHMARKS.md's
<!-- demo-table-other --> block only.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.demo_diagnosis import pictures
from pipeline.demo.demo import BASELINES, COLUMNS, RUNS, run_demo

NAMES = {"linear": "linear", "knn": "kNN", "zeroshot": "zero-shot"}


def table(summary):
    head = "| row | " + " | ".join(f"{ls} {NAMES[p]}" for ls, p, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in list(BASELINES) + list(RUNS):
        cells = []
        for ls, p, m in COLUMNS:
            mean, std, n = summary.get(f"{row}|{ls}|{p}|{m}", (0, 0, 0))
            cells.append("–" if n == 0 else f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}")
        label = "teacher (2D, frame average)" if row == "teacher" else row
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(summary, other=False):
    """The learning goals on the table's means, each as (goal, measured, met). other: the second benchmark,
    where the goal for motion from the inflated start is +10, not +20."""
    def mean(row, label_set, protocol):
        metric = next(m for ls, p, m in COLUMNS if (ls, p) == (label_set, protocol))
        return 100 * summary.get(f"{row}|{label_set}|{protocol}|{metric}", (float("nan"), 0, 0))[0]

    out = []
    gap = mean("modist", "motion", "linear") - mean("distinit", "motion", "linear")
    out.append(("modist − distinit ≥ +20 motion linear", f"{gap:+.1f}", gap >= 20))
    gap = mean("modist", "motion", "linear") - mean("inflate", "motion", "linear")
    out.append(("modist ≥ inflate + 10 motion linear", f"{gap:+.1f}", gap >= 10))
    gap = mean("distinit", "object", "linear") - mean("scratch", "object", "linear")
    out.append(("distinit ≥ scratch + 25 object linear", f"{gap:+.1f}", gap >= 25))
    for row in ("both ← inflate", "lss ← inflate"):
        gap = mean(row, "object", "linear") - mean("inflate", "object", "linear")
        out.append((f"{row} ≥ inflate − 3 object linear", f"{gap:+.1f}", gap >= -3))
    want = 10 if other else 20
    gap = mean("both ← inflate", "motion", "linear") - mean("inflate", "motion", "linear")
    out.append((f"both ← inflate ≥ inflate + {want} motion linear", f"{gap:+.1f}", gap >= want))
    zs, teacher = mean("lss ← inflate", "object", "zeroshot"), mean("teacher", "object", "zeroshot")
    out.append(("lss ← inflate zero-shot ≥ its teacher's", f"{zs:.1f} (teacher {teacher:.1f})", zs >= teacher))
    return out


def goals_text(summary, other=False):
    rows = goals(summary, other)
    lines = ["| goal (means over seeds) | measured | |", "|---|---|---|"]
    lines += [f"| {goal} | {measured} | {'met' if met else '**missed**'} |" for goal, measured, met in rows]
    return "\n".join(lines) + f"\n\n{sum(met for *_, met in rows)} of {len(rows)} goals met."


def replace_block(path, text, tag="demo-table"):
    doc = open(path).read()
    new, n = re.subn(rf"(<!-- {tag} -->\n).*?(\n<!-- /{tag} -->)", lambda m: m[1] + text + m[2], doc, flags=re.S)
    if n != 1:
        sys.exit(f"{path}: no <!-- {tag} --> ... <!-- /{tag} --> block")
    with open(path, "w") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", help="a `cli.py demo` output folder (with --other: where that demo runs)")
    ap.add_argument("--other", action="store_true", help="run the demo on the other benchmark first (resumes)")
    ap.add_argument("--seeds", type=int, default=3, help="with --other: seeds to run")
    args = ap.parse_args()
    if args.other:
        photos, textures = pictures("other")
        try:
            run_demo(args.demo, seeds=args.seeds, photos=photos, textures=textures, generator_seed=1)
        except ValueError as e:  # the folder holds another benchmark
            sys.exit(str(e))
    report = json.load(open(os.path.join(args.demo, "report.json")))
    seeds = report["seeds"]
    text = table(report["summary"])
    command = ("python bench/demo_tables.py other_out --other" if args.other else "python cli.py demo") + f" --seeds {seeds}"
    steps = report["steps"]  # per student; one number in the reports before that
    steps = ", ".join(f"{student} {n}" for student, n in steps.items()) if isinstance(steps, dict) else steps
    note = (f"`{command}`, steps {steps}, {seeds} seed(s), test split, "
            f"{report['wall_seconds'] / 60:.1f} min in all ({datetime.date.today()}):\n\n")
    block = note + text + "\n\n" + goals_text(report["summary"], args.other)
    if not args.other:
        replace_block(os.path.join(REPO, "README.md"), text)
        shutil.copy(os.path.join(args.demo, "report.png"), os.path.join(REPO, "docs", "demo.png"))
    replace_block(os.path.join(REPO, "BENCHMARKS.md"), block, "demo-table-other" if args.other else "demo-table")
    print(block)


if __name__ == "__main__":
    main()
