"""eval's reports: the Markdown table (a row per init, a column per accuracy computed, a chance row),
results.json that accumulates every run, and results.md."""
import json
import os
import re

from pipeline.common.config import PROTOCOLS
from pipeline.common.errors import EvalError
from pipeline.common.locks import FileLock

NOT_ACCURACY = ("weight_decay", "epochs")  # what a protocol reports besides accuracies: kept out of the table


def table_columns(rows):
    """(protocol, metric) of every accuracy the rows hold, in a fixed order: protocols as listed, then
    video- before clip-level, then by k. The table shows what was computed, nothing else."""
    def order(col):
        protocol, metric = col
        level = 0 if metric.startswith("video") else 1 if metric.startswith("clip") else 2
        return (PROTOCOLS.index(protocol) if protocol in PROTOCOLS else len(PROTOCOLS), level,
                [int(x) for x in re.findall(r"\d+", metric)], metric)
    return sorted({(r["protocol"], r["metric"]) for r in rows if r["metric"] not in NOT_ACCURACY}, key=order)


def format_table(rows, intervals=False):
    """A Markdown table, a row per init and a column per accuracy computed, plus a chance row; with
    intervals, each accuracy carries its 95 % Wilson interval."""
    cols = table_columns(rows)
    inits = list(dict.fromkeys(r["init"] for r in rows))
    found = {(r["init"], r["protocol"], r["metric"]): r for r in rows}
    chance = {(r["protocol"], r["metric"]): r.get("chance") for r in rows}

    def cell(r):
        if r is None:
            return "–"
        ci = r.get("ci95")
        return f"{100 * r['value']:.1f}" + (f" ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})" if intervals and ci else "")
    lines = ["| init | " + " | ".join(f"{p} {m}" for p, m in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    marked = {r["init"] for r in rows if r.get("transductive")}  # pre-trained on test videos
    starts = {r["init"]: r["start"] for r in rows if r.get("start")}  # the checkpoint row: where it started
    for init in inits:
        label = f"{init} ← {starts[init]}" if init in starts else init
        label = f"{label} †" if init in marked else label
        lines.append(f"| {label} | " + " | ".join(cell(found.get((init, p, m))) for p, m in cols) + " |")
    if any(chance.get(c) is not None for c in cols):
        lines.append("| chance | " + " | ".join("–" if chance.get(c) is None else f"{100 * chance[c]:.1f}"
                                                for c in cols) + " |")
    if marked:
        lines.append("\n† transductive: pre-trained (without labels) on test videos")
    return "\n".join(lines)


def write_reports(out, rows, run):
    """Add this run's rows to OUT/results.json (earlier runs into the same folder are kept, each with
    its run number) and rewrite OUT/results.md from all of them. Sets the run number in rows and run."""
    with FileLock(os.path.join(out, ".results.lock"), blocking=True):  # two evals into one folder take turns
        runs, old_rows = read_results(out)
        run["run"] = max((r.get("run", 0) for r in runs), default=0) + 1
        for r in rows:
            r["run"] = run["run"]
        runs, all_rows = runs + [run], old_rows + rows
        tmp = os.path.join(out, f"results.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"runs": runs, "results": all_rows}, f, indent=2)
        os.replace(tmp, os.path.join(out, "results.json"))
        with open(tmp, "w") as f:
            f.write(format_results_md(runs, all_rows))
        os.replace(tmp, os.path.join(out, "results.md"))


def read_results(out):
    """(runs, rows) already in OUT/results.json; a file of the single-run format counts as run 1."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return [], []
    except ValueError as e:
        raise EvalError(f"{out}/results.json is not valid JSON ({e}); move it away to start the results anew") from None
    rows = [dict(r, run=r.get("run", 1)) for r in saved.get("results", [])]
    runs = saved.get("runs") or ([{"run": 1, "notes": saved.get("notes", [])}] if rows else [])
    return runs, rows


def format_results_md(runs, rows):
    parts = ["# Evaluation\n\nAccuracy in %, with its 95 % Wilson interval over the test videos in brackets (clip-level "
             "numbers too: the views of one video are not independent). linear: logistic regression on frozen "
             "L2-normalised features; knn: cosine, T 0.07 weighted vote; retrieval: test videos query the train set "
             "(R@k: a same-class video among the k nearest). chance: the same metric without looking at the videos. "
             f"{len(runs)} run(s) into this folder, newest last; results.json holds every number.\n"]
    for run in runs:
        mine = [r for r in rows if r["run"] == run["run"]]
        r0 = mine[0] if mine else {}
        parts.append(f"## Run {run['run']}: {run.get('task', r0.get('task'))} split {run.get('split', r0.get('split'))}, "
                     f"seed {run.get('seed', r0.get('seed'))}, {run.get('date', r0.get('date'))}\n")
        parts.append(f"{r0.get('train_videos')} train / {r0.get('test_videos')} test videos; views: "
                     + "; ".join(sorted({f"{r['init']}: {r['views']}" for r in mine})) + "\n")
        parts += [f"**Warning:** {w}\n" for w in run.get("warnings", [])]
        parts.append(format_table(mine, intervals=True) + "\n")
        picked = [f"{r['init']} {r['value']:g}" for r in mine if r["metric"] == "weight_decay"]
        if picked:
            parts.append("Linear probe weight decay (picked on a hold-out of the train videos): " + ", ".join(picked) + "\n")
        if run.get("classes"):
            parts.append("| class | train | test |\n|---|---|---|\n"
                         + "\n".join(f"| {c['name']} | {c['train']} | {c['test']} |" for c in run["classes"]) + "\n")
        parts.append("\n".join(f"- {n}" for n in run.get("notes", []) if not n.startswith("warning: ")) + "\n")
    return "\n".join(parts)
