"""`demo --quick` runs end to end and its report shows the evaluation's own numbers."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from pipeline.demo.demo import run_folder


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_reports_its_own_numbers(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = open(out / "report.md").read()
    assert "steps distinit 2, modist 2, both ← inflate 2, lss ← inflate 2" in report
    assert (out / "runs" / "modist-seed0-2steps" / "checkpoint.pt").exists()
    assert (out / "runs" / "distinit-seed0-2steps" / "checkpoint.pt").exists()  # --steps: every student's
    inflated = torch.load(out / "runs" / "both-from-inflate-seed0-2steps" / "checkpoint.pt", weights_only=False)
    assert inflated["config"]["student"] == "efficientnet3d_lite0" and inflated["start"]["init"] == "inflate"
    assert "| distinit |" in report and "| teacher |" in report and "| both ← inflate |" in report
    assert "motion linear video_top1" in report
    assert os.path.getsize(out / "report.png") > 5000
    saved = json.load(open(out / "report.json"))
    assert saved["steps"] == {"distinit": 2, "modist": 2, "both ← inflate": 2, "lss ← inflate": 2}
    rows = {r["row"] for r in saved["rows"]}
    assert rows == {"distinit", "modist", "both ← inflate", "lss ← inflate", "scratch", "inflate", "teacher"}
    zeroshot = {r["row"] for r in saved["rows"] if r["protocol"] == "zeroshot"}
    assert zeroshot == {"distinit", "both ← inflate", "lss ← inflate", "scratch", "teacher"}  # rows with a text space
    assert "object zeroshot video_top1" in report
    # the table's numbers are the evaluation's own results
    for r in saved["rows"]:
        eval_dir = out / "eval" / "test" / r["label_set"] / (run_folder(r["row"]) if r["row"] not in ("scratch", "inflate", "teacher") else "baselines") / "seed0"
        results = json.load(open(eval_dir / "results.json"))["results"]
        assert any(x["init"] == r["init"] and x["metric"] == r["metric"] and x["value"] == r["value"] for x in results)
    teacher_object = next(r for r in saved["rows"] if r["row"] == "teacher" and r["label_set"] == "object"
                          and r["metric"] == "video_top1")
    assert f"{100 * teacher_object['value']:.1f}" in report
    assert "chosen on a validation split" in report and not (out / "eval" / "validation").exists()  # test only


def test_demo_goals_are_checked_on_the_means_and_name_each_miss():
    from bench.demo_tables import goals
    means = {  # row: (object linear, object kNN, object zero-shot, motion linear, motion kNN), %
        "scratch": (40, 30, 26, 12, 12), "inflate": (75, 65, None, 30, 28), "teacher": (100, 99, 31, 30, 22),
        "distinit": (80, 70, 30, 15, 10), "modist": (55, 40, None, 60, 40), "both ← inflate": (78, 60, 29, 58, 38),
        "lss ← inflate": (81, 71, 31, 16, 11)}
    columns = [("object", "linear", "video_top1"), ("object", "knn", "k20_top1"), ("object", "zeroshot", "video_top1"),
               ("motion", "linear", "video_top1"), ("motion", "knn", "k20_top1")]
    summary = {f"{row}|{ls}|{p}|{m}": (v / 100, 0.01, 3) for row, values in means.items()
               for (ls, p, m), v in zip(columns, values) if v is not None}
    assert all(met for *_, met in goals(summary))
    summary["both ← inflate|object|linear|video_top1"] = (0.70, 0.01, 3)  # 5 below inflate
    summary["both ← inflate|motion|linear|video_top1"] = (0.45, 0.01, 3)  # inflate + 15: enough only on the second
    summary["lss ← inflate|object|zeroshot|video_top1"] = (0.30, 0.01, 3)
    missed = {goal: measured for goal, measured, met in goals(summary) if not met}
    assert missed == {"both ← inflate ≥ inflate − 3 object linear": "-5.0",
                      "both ← inflate ≥ inflate + 20 motion linear": "+15.0",
                      "lss ← inflate zero-shot ≥ its teacher's": "30.0 (teacher 31.0)"}
    missed = {goal for goal, _, met in goals(summary, other=True) if not met}
    assert missed == {"both ← inflate ≥ inflate − 3 object linear", "lss ← inflate zero-shot ≥ its teacher's"}


def test_a_folder_holding_another_benchmark_is_refused_before_anything_is_rewritten(tmp_path):
    from pipeline.demo.demo import SIZES, prepare_benchmark
    data = tmp_path / "data"
    data.mkdir()
    marker = {"objects": ["motorcycle", "galaxy", "retina", "clock"], "seed": 1}
    (data / "benchmark.json").write_text(json.dumps(marker))
    (data / "pool").mkdir()  # what regenerating would delete
    with pytest.raises(ValueError, match=r"benchmark.json: this folder holds another benchmark \(objects "
                                         r"\['motorcycle', 'galaxy', 'retina', 'clock'\], generator seed 1\)"):
        prepare_benchmark(str(tmp_path), SIZES["quick"], print)  # the demo's own pictures, seed 0
    assert (data / "pool").exists() and json.loads((data / "benchmark.json").read_text()) == marker
