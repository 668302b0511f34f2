"""`demo --quick` runs end to end and its report shows the evaluation's own numbers."""
import json
import os

import pytest
from click.testing import CliRunner

from cli import cli


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_reports_its_own_numbers(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = open(out / "report.md").read()
    assert "2 steps" in report and (out / "runs" / "modist-seed0-2steps" / "checkpoint.pt").exists()
    assert (out / "runs" / "distinit-seed0-4steps" / "checkpoint.pt").exists()  # its steps cost half: twice as many
    assert "| distinit |" in report and "| teacher |" in report and "motion linear video_top1" in report
    assert os.path.getsize(out / "report.png") > 5000
    saved = json.load(open(out / "report.json"))
    rows = {r["row"] for r in saved["rows"]}
    assert rows == {"distinit", "modist", "both", "distinit+lss", "scratch", "inflate", "teacher"}
    zeroshot = {r["row"] for r in saved["rows"] if r["protocol"] == "zeroshot"}
    assert zeroshot == {"distinit", "both", "distinit+lss", "scratch", "teacher"}  # the rows with a text space
    assert "object zeroshot video_top1" in report
    # the table's numbers are the evaluation's own results
    for r in saved["rows"]:
        eval_dir = out / "eval" / "test" / r["label_set"] / (r["row"] if r["row"] not in ("scratch", "inflate", "teacher") else "baselines") / "seed0"
        results = json.load(open(eval_dir / "results.json"))["results"]
        assert any(x["init"] == r["init"] and x["metric"] == r["metric"] and x["value"] == r["value"] for x in results)
    teacher_object = next(r for r in saved["rows"] if r["row"] == "teacher" and r["label_set"] == "object"
                          and r["metric"] == "video_top1")
    assert f"{100 * teacher_object['value']:.1f}" in report
    assert "chosen on a validation split" in report and not (out / "eval" / "validation").exists()  # test only
