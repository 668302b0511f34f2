"""Evaluation end to end on a folder task (rows, reports, feature reuse, embed), and one-line CLI errors."""
import json
import os

import h5py
import pytest
from click.testing import CliRunner

from cli import cli
from helpers import extract_config, make_video
from pipeline.config import DistillConfig, EvalConfig
from pipeline.evaluate import run_eval


@pytest.fixture(scope="module")
def tiny_folder_task(tmp_path_factory):
    """Two classes of generated videos: texture moving left vs right; one broken file in a class."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(6):
        make_video(str(root / "left" / f"l{i}.mp4"), n=12, h=64, w=96, seed=10 + i, dx=-3)
        make_video(str(root / "right" / f"r{i}.mp4"), n=12, h=64, w=96, seed=20 + i, dx=3)
    (root / "right" / "broken.mp4").write_bytes(b"")
    return root


@pytest.mark.slow
def test_eval_end_to_end_on_a_folder_task(tiny_folder_task, tmp_path):
    from pipeline.distill import run_distill
    from pipeline.extract import run_extract
    cache = tmp_path / "cache"
    run_extract(extract_config(tiny_folder_task, cache, height=64, width=80, teacher_every=4))
    run = tmp_path / "run"
    run_distill(DistillConfig(cache=str(cache), out=str(run), student="r3d_cpu", clip_len=4, crop=48, batch_size=4,
                              steps=2, workers=0, progress=False))
    out = tmp_path / "eval"
    cfg = EvalConfig(task="folder", root=str(tiny_folder_task), out=str(out), checkpoint=str(run / "checkpoint.pt"),
                     inits=("checkpoint", "scratch", "teacher"), protocols=("linear", "knn", "retrieval", "finetune"),
                     clips=2, crops=3, finetune_epochs=1, batch_size=4, progress=False)
    rows, task, notes = run_eval(cfg)
    assert len(task.train) + len(task.test) == 13
    assert any("1 videos failed to decode" in n for n in notes)
    got = {(r["init"], r["protocol"], r["metric"]) for r in rows}
    n_train = rows[0]["train_videos"]  # fewer than the smallest k (10): kNN reports k = n_train, honestly named
    assert ("checkpoint", "linear", "video_top1") in got and ("scratch", "knn", f"k{n_train}_top1") in got
    assert not any(m.startswith("k10") or m.endswith("top5") for _, _, m in got)  # 2 classes: top-5 is trivial
    assert ("teacher", "retrieval", "R@1") in got and ("checkpoint", "finetune", "video_top1") in got
    assert ("teacher", "finetune", "video_top1") not in got
    for r in rows:
        assert 0.0 <= r["value"] <= 1.0 or r["metric"] in ("weight_decay", "epochs")
        assert {"task", "split", "protocol", "views", "checkpoint", "seed", "date"} <= set(r)
    saved = json.load(open(out / "results.json"))
    assert saved["results"] == json.loads(json.dumps(rows))
    md = open(out / "results.md").read()
    assert "| checkpoint |" in md and "linear video_top1" in md
    stores = {p.name.split("-")[1]: p for p in out.glob("features-*.h5")}
    assert set(stores) == {"checkpoint", "scratch", "teacher"}
    with h5py.File(stores["checkpoint"]) as f:  # one row per decodable video, 2 clips x 3 crops, r3d_cpu
        assert f["features"].shape == (rows[0]["train_videos"] + rows[0]["test_videos"], 6, 128)
        assert len(f["ids"]) == len(f["features"])
        assert json.loads(f.attrs["config"])["init"] == "checkpoint"
    with h5py.File(stores["teacher"]) as f:
        assert f["features"].shape[1:] == (1, 1280)
    before = os.path.getmtime(stores["checkpoint"])
    run_eval(EvalConfig(**{**cfg.__dict__, "protocols": ("knn",), "inits": ("checkpoint",), "seed": 1}))
    assert os.path.getmtime(stores["checkpoint"]) == before  # another split: features reused, not recomputed
    os.utime(run / "checkpoint.pt", (1, 1))  # same weights, another time stamp (cp, rsync): still reused
    run_eval(EvalConfig(**{**cfg.__dict__, "protocols": ("knn",), "inits": ("checkpoint",)}))
    assert {p.name for p in out.glob("features-checkpoint-*.h5")} == {stores["checkpoint"].name}
    run_distill(DistillConfig(cache=str(cache), out=str(run), student="r3d_cpu", clip_len=4, crop=48, batch_size=4,
                              steps=3, workers=0, progress=False))  # trained on: other weights, new features
    run_eval(EvalConfig(**{**cfg.__dict__, "protocols": ("knn",), "inits": ("checkpoint",)}))
    assert len(list(out.glob("features-checkpoint-*.h5"))) == 2

    feats = tmp_path / "feats.h5"
    result = CliRunner().invoke(cli, ["embed", "--videos", str(tiny_folder_task), "--checkpoint", str(run / "checkpoint.pt"),
                                      "--out", str(feats), "--per-clip", "--clips", "2"])
    assert result.exit_code == 0, result.output
    with h5py.File(feats) as f:
        assert f["features"].shape == (12, 128) and f["clip_features"].shape == (12, 2, 128)
        assert sorted(i.decode() for i in f["ids"][()])[0] == "left/l0.mp4"
        assert json.loads(f.attrs["config"])["clips"] == 2


def test_eval_cli_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--task", "folder", "--root", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "data folder does not exist" in result.output
    result = CliRunner().invoke(cli, ["eval", "--task", "folder", "--root", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output
