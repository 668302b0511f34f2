"""Put a demo run's table and chart into README.md and BENCHMARKS.md (one command, no hand copying).

    python cli.py demo --seeds 3 --out demo_out && python bench/demo_tables.py demo_out

README.md: the block between <!-- demo-table --> and <!-- /demo-table -->, and docs/demo.png (the
chart). BENCHMARKS.md: the block between <!-- demo-table --> and <!-- /demo-table --> there, with the
run's wall time, steps and date.
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

from pipeline.demo.demo import BASELINES, COLUMNS, RUNS

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


def replace_block(path, text):
    doc = open(path).read()
    new, n = re.subn(r"(<!-- demo-table -->\n).*?(\n<!-- /demo-table -->)", lambda m: m[1] + text + m[2], doc,
                     flags=re.S)
    if n != 1:
        sys.exit(f"{path}: no <!-- demo-table --> ... <!-- /demo-table --> block")
    with open(path, "w") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", help="a `cli.py demo` output folder")
    args = ap.parse_args()
    report = json.load(open(os.path.join(args.demo, "report.json")))
    seeds = report["seeds"]
    text = table(report["summary"])
    replace_block(os.path.join(REPO, "README.md"), text)
    shutil.copy(os.path.join(args.demo, "report.png"), os.path.join(REPO, "docs", "demo.png"))
    note = (f"`python cli.py demo --seeds {seeds}`, {report['steps']} steps, {seeds} seed(s), test split, "
            f"{report['wall_seconds'] / 60:.1f} min in all ({datetime.date.today()}):\n\n")
    replace_block(os.path.join(REPO, "BENCHMARKS.md"), note + text)
    print(text)


if __name__ == "__main__":
    main()
