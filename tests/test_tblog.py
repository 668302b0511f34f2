"""TensorBoard event files: distill's scalars beside log.jsonl (one value per step, also after a
resume), eval's table and per-class accuracy beside the checkpoint; all read back with TensorBoard's
own event reader."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from helpers import extract_config, make_video, tiny_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.common.config import DistillConfig, EvalConfig
from pipeline.common.tensorboard import TrainEvents
from pipeline.evaluate.eval_events import write_eval_events
from pipeline.evaluate.tasks import Task


def events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_train_events_tag_every_number_of_a_record(tmp_path):
    log = TrainEvents(str(tmp_path))
    for step in (1, 2):
        log.add({"step": step, "epoch": 0, "loss": 1.5 / step, "lr": 1e-3 * step, "grad_norm": 0.5,
                 "clips_per_s": 10.0, "loader_share": 0.25, "distinit": 0.7, "rgb_nce": 3.0, "note": "text"},
                loss_names={"distinit", "rgb_nce"})
    log.close()
    acc = events(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"loss/total", "loss/distinit", "loss/rgb_nce", "train/lr", "train/grad_norm",
                                          "train/epoch", "perf/clips_per_s", "perf/loader_share"}
    assert scalars(acc, "loss/total") == [(1, 1.5), (2, 0.75)]
    assert scalars(acc, "perf/loader_share") == [(1, 0.25), (2, 0.25)]


@pytest.mark.slow
def test_distill_writes_events_beside_log_jsonl_and_a_resume_leaves_one_value_per_step(tmp_path):
    from pipeline.distill.train import run_distill
    from pipeline.extract.extract import run_extract
    for i in range(4):
        make_video(str(tmp_path / "videos" / f"v{i}.mp4"), n=12, h=48, w=64, seed=i, dx=i - 1)
    run_extract(extract_config(tmp_path / "videos", tmp_path / "cache", height=48, width=64, teacher_every=4))
    run = tmp_path / "run"

    def distill(steps):
        return run_distill(DistillConfig(cache=str(tmp_path / "cache"), out=str(run), student="r3d_cpu", clip_len=4,
                                         crop=32, batch_size=2, steps=steps, workers=0, warmup_steps=2, log_every=1,
                                         save_every=3, progress=False))
    distill(3)
    shutil.copy(run / "checkpoint.pt", tmp_path / "step3.pt")
    distill(6)
    # as if the second process had been killed after logging steps 4-6 but before its checkpoint
    shutil.copy(tmp_path / "step3.pt", run / "checkpoint.pt")
    distill(6)
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    acc = events(run)
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/distinit", "train/lr", "train/grad_norm", "perf/clips_per_s",
            "perf/loader_share"} <= tags
    for tag, key in (("loss/total", "loss"), ("loss/distinit", "distinit"), ("train/lr", "lr"),
                     ("train/grad_norm", "grad_norm"), ("perf/loader_share", "loader_share")):
        got = scalars(acc, tag)
        assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6], (tag, got)  # the orphaned 4-6 were purged
        np.testing.assert_allclose([v for _, v in got], [r[key] for r in log], rtol=1e-6)
    assert all(0 <= r["loader_share"] <= 1 for r in log)
    assert os.path.getsize(run / "losses.png") > 1000  # the PNG plot stays


def test_eval_writes_its_table_and_per_class_accuracy_beside_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = tiny_checkpoint(run / "checkpoint.pt")  # step 7
    classes = ["left", "right", "up"]
    train = [(f"tr{i}", i % 2) for i in range(8)]  # "up" has no train video
    test = [("te0", 0), ("te1", 1), ("te2", 2)]
    rng = np.random.default_rng(0)
    ids = [v for v, _ in train + test]
    labels = np.array([label for _, label in train + test])
    feats = rng.normal(size=(len(ids), 2, 16)) + 3 * np.eye(16)[labels][:, None]
    store = tmp_path / "features.h5"
    with h5py.File(store, "w") as f:
        f.create_dataset("ids", data=np.array([i.encode() for i in sorted(ids)], dtype=h5py.string_dtype()))
        f.create_dataset("features", data=feats[np.argsort(ids)])
    task = Task("folder", "1", str(tmp_path), classes, [(v, v, label) for v, label in train],
                [(v, v, label) for v, label in test])
    rows = [{"init": init, "protocol": p, "metric": m, "value": v, "features": str(store), "task": "folder",
             "split": "1"} for init in ("checkpoint", "scratch")
            for p, m, v in (("linear", "video_top1", 0.5), ("knn", "k20_top1", 2 / 3))]
    cfg = EvalConfig(task="folder", root=str(tmp_path), out=str(tmp_path / "out"), checkpoint=ckpt)
    notes = write_eval_events(cfg, rows, task, train, test)
    base = run / "eval-folder-split1"
    assert notes == [f"TensorBoard: {base} (`tensorboard --logdir {run}`)"]
    acc = events(base / "checkpoint")
    assert scalars(acc, "folder/linear video_top1") == [(7, 0.5)]  # at the checkpoint's step
    per_class = {t: scalars(acc, t) for t in acc.Tags()["scalars"] if "per-class" in t}
    assert set(per_class) == {"folder per-class kNN k20/left", "folder per-class kNN k20/right",
                              "folder per-class kNN k20/up"}
    assert per_class["folder per-class kNN k20/left"] == [(7, 1.0)]  # well separated features
    assert per_class["folder per-class kNN k20/up"] == [(7, 0.0)]  # no train video: never predicted
    text = events(base)
    tags = text.Tags()["tensors"]
    assert {"folder/table/text_summary", "folder/per-class/text_summary"} <= set(tags)
    table = text.Tensors("folder/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| checkpoint |" in table and "| scratch |" in table
    # without a checkpoint in the table: under OUT/tensorboard
    cfg = EvalConfig(task="folder", root=str(tmp_path), out=str(tmp_path / "out"), inits=("scratch",))
    write_eval_events(cfg, [r for r in rows if r["init"] == "scratch"], task, train, test)
    assert os.path.isdir(tmp_path / "out" / "tensorboard" / "eval-folder-split1" / "scratch")
