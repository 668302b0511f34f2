"""Evaluation: task loaders on the real UCF101 split files, protocols on known answers, end to end."""
import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from conftest import make_video
from pipeline.evaluate import EvalConfig, knn_classify, linear_probe, retrieval, run_eval, stored_features
from pipeline.tasks import TaskError, load_csv, load_folder, load_hmdb51, load_ucf101

UCF_SPLITS = os.path.join(os.path.dirname(__file__), "data", "ucfTrainTestlist")


def test_ucf101_official_split_1_has_9537_train_and_3783_test_videos(tmp_path):
    for name in ("trainlist01.txt", "testlist01.txt"):
        for line in open(os.path.join(UCF_SPLITS, name)):
            rel = line.split()[0]
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).touch()
    task = load_ucf101(str(tmp_path), split=1, splits_dir=UCF_SPLITS)
    assert (len(task.train), len(task.test), task.missing) == (9537, 3783, [])
    assert len({l for _, _, l in task.train}) == len({l for _, _, l in task.test}) == 101


def test_ucf101_official_split_files(tmp_path):
    for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "YoYo/v_YoYo_g01_c01.avi",
                "HandstandPushups/v_HandStandPushups_g01_c01.avi"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    task = load_ucf101(str(tmp_path), split=1, splits_dir=UCF_SPLITS)
    assert len(task.classes) == 101 and task.classes[0] == "ApplyEyeMakeup" and task.classes[100] == "YoYo"
    assert len(task.train) + len(task.test) + len(task.missing) == 9537 + 3783  # split 1
    assert ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", str(tmp_path / "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"), 0) in task.train
    test = {vid: label for vid, _, label in task.test}
    assert test == {"YoYo/v_YoYo_g01_c01.avi": 100, "HandstandPushups/v_HandStandPushups_g01_c01.avi": 36}
    assert len(task.missing) == 9537 + 3783 - 3 and "missing on disk" in task.describe()
    split2 = load_ucf101(str(tmp_path), split=2, splits_dir=UCF_SPLITS)
    assert len(split2.train) + len(split2.test) + len(split2.missing) == 9586 + 3734
    with pytest.raises(TaskError, match="split files not found"):
        load_ucf101(str(tmp_path), split=1)


def test_hmdb51_split_files_1_train_2_test_0_unused(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    for cls in ("wave", "cartwheel"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        lines = []
        for i, which in enumerate("12102"):
            (tmp_path / "data" / cls / f"{cls}_{i}.avi").write_bytes(b"x")
            lines.append(f"{cls}_{i}.avi {which}")
        (splits / f"{cls}_test_split1.txt").write_text("\n".join(lines) + "\n")
    task = load_hmdb51(str(tmp_path / "data"), 1, str(splits))
    assert task.classes == ["cartwheel", "wave"]
    assert sorted(v for v, _, _ in task.train) == ["cartwheel/cartwheel_0.avi", "cartwheel/cartwheel_2.avi",
                                                   "wave/wave_0.avi", "wave/wave_2.avi"]
    assert {v: l for v, _, l in task.test} == {"cartwheel/cartwheel_1.avi": 0, "cartwheel/cartwheel_4.avi": 0,
                                               "wave/wave_1.avi": 1, "wave/wave_4.avi": 1}


def test_folder_split_is_stratified_and_seeded(tmp_path):
    for cls, n in (("a", 10), ("b", 6), ("c", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.mp4").write_bytes(b"x")
    task = load_folder(str(tmp_path), test_fraction=0.3, seed=1)
    per_class = {c: sum(1 for _, _, l in task.test if l == i) for i, c in enumerate(task.classes)}
    assert per_class == {"a": 3, "b": 2, "c": 1}
    assert len(task.train) == 19 - 6
    assert load_folder(str(tmp_path), test_fraction=0.3, seed=1).test == task.test
    assert load_folder(str(tmp_path), test_fraction=0.3, seed=2).test != task.test


def test_folder_split_keeps_clips_of_one_source_video_together(tmp_path):
    # UCF101-style names: v_<Class>_g<group>_c<clip>; 5 groups per class with 1-4 clips each
    for cls in ("Archery", "Basketball"):
        (tmp_path / cls).mkdir()
        for g in range(1, 6):
            for c in range(1, 2 + g % 4):
                (tmp_path / cls / f"v_{cls}_g{g:02d}_c{c:02d}.avi").write_bytes(b"x")
    groups = {}
    for seed in range(5):
        task = load_folder(str(tmp_path), test_fraction=0.3, seed=seed)
        train_groups = {v.rsplit("_c", 1)[0] for v, _, _ in task.train}
        test_groups = {v.rsplit("_c", 1)[0] for v, _, _ in task.test}
        assert not train_groups & test_groups  # no source video on both sides
        assert len(test_groups) == 4  # 30 % of each class's 5 groups, rounded: 2 + 2
        groups[seed] = test_groups
    assert len({frozenset(g) for g in groups.values()}) > 1  # seeded, not fixed
    by_file = load_folder(str(tmp_path), test_fraction=0.3, seed=0, group_pattern="")
    straddling = {v.rsplit("_c", 1)[0] for v, _, _ in by_file.train} & {v.rsplit("_c", 1)[0] for v, _, _ in by_file.test}
    assert straddling  # what the grouping prevents: file by file, groups end up on both sides
    with pytest.raises(TaskError, match="not a valid regular expression"):
        load_folder(str(tmp_path), group_pattern="(")
    from cli import eval_cmd
    from pipeline.tasks import UCF_GROUPS
    assert next(p for p in eval_cmd.params if p.name == "group_pattern").default == UCF_GROUPS


def test_csv_task_one_label_column_per_task_over_the_same_videos(tmp_path):
    rows = ["id,object,motion"] + [f"v{i}.mp4,{'cat' if i % 2 else 'cup'},{'left' if i < 6 else 'up'}" for i in range(10)]
    rows += ["gone.mp4,cat,left", "v10.mp4,,up"]  # a listed video not on disk; v10 has no object label
    for i in range(11):
        (tmp_path / f"v{i}.mp4").write_bytes(b"x")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    obj = load_csv(str(tmp_path), str(labels), "object", seed=0)
    motion = load_csv(str(tmp_path), str(labels), "motion", seed=0)
    assert obj.classes == ["cat", "cup"] and motion.classes == ["left", "up"] and obj.name == "csv-object"
    assert obj.missing == ["gone.mp4"] and "1 listed but missing" in obj.describe()
    assert {v for v, _, _ in obj.train + obj.test} == {f"v{i}.mp4" for i in range(10)}
    assert {v: l for v, _, l in motion.train + motion.test} == {f"v{i}.mp4": int(i >= 6) for i in range(11)}
    assert sum(l for _, _, l in obj.test) == 2 and len(obj.test) == 4  # stratified: 30 % of each class
    with pytest.raises(TaskError, match=r"labels.csv: no column 'action' \(columns: id, object, motion\)"):
        load_csv(str(tmp_path), str(labels), "action")
    (tmp_path / "twice.csv").write_text("id,object\nv0.mp4,cat\nv1.mp4,cup\nv0.mp4,cup\n")
    with pytest.raises(TaskError, match=r"twice.csv: 1 video\(s\) have more than one row \(e.g. 'v0.mp4'\)"):
        load_csv(str(tmp_path), str(tmp_path / "twice.csv"), "object")
    (tmp_path / "train.txt").write_text("v0.mp4\nv1.mp4\n")
    (tmp_path / "test.txt").write_text("v1.mp4\nv2.mp4\n")
    with pytest.raises(TaskError, match="'v1.mp4' is listed in both train and test"):
        load_csv(str(tmp_path), str(labels), "object", train_list=str(tmp_path / "train.txt"),
                 test_list=str(tmp_path / "test.txt"))
    with pytest.raises(TaskError, match="nope.csv: labels file not found"):
        load_csv(str(tmp_path), str(tmp_path / "nope.csv"), "object")
    result = CliRunner().invoke(cli, ["eval", "--task", "csv", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "needs --labels FILE.csv and --label-column NAME" in result.output


def test_feature_store_computes_each_video_once_across_tasks(tmp_path):
    calls = []

    def compute(ids):
        calls.append(list(ids))
        return np.stack([np.full((2, 3), int(i[1:]), np.float32) for i in ids])
    store, attrs = str(tmp_path / "features.h5"), {"init": "checkpoint", "views": "2 clips"}
    assert stored_features(store, ["v3", "v1"], compute, attrs)[:, 0, 0].tolist() == [3, 1]
    # another split over the same videos plus one new: only the new one is computed
    assert stored_features(store, ["v1", "v2", "v3"], compute, attrs)[:, 0, 0].tolist() == [1, 2, 3]
    assert calls == [["v3", "v1"], ["v2"]]
    with h5py.File(store) as f:
        assert [i.decode() for i in f["ids"][()]] == ["v1", "v2", "v3"] and f["features"].shape == (3, 2, 3)
    stored_features(store, ["v1"], compute, {**attrs, "views": "4 clips"})  # other views: not reused
    assert calls[-1] == ["v1"]


def clusters(centres, n_per_class, views, spread, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per_class)
    feats = centres[labels][:, None, :] + rng.normal(size=(len(labels), views, centres.shape[1])) * spread
    return feats.astype(np.float32), labels


def test_protocols_on_separable_clusters_score_perfectly():
    centres = np.random.default_rng(0).normal(size=(5, 16)) * 5
    trf, trl = clusters(centres, 20, 3, 0.3, 1)
    tef, tel = clusters(centres, 10, 3, 0.3, 2)
    lin = linear_probe(trf, trl, tef, tel, 5)
    assert lin["video_top1"] == 1.0 and lin["clip_top1"] > 0.97
    assert "video_top5" not in lin  # 5 classes: top-5 would be 100 % whatever the features
    knn = knn_classify(trf, trl, tef, tel, 5)
    assert knn["k10_top1"] == 1.0 and knn["k20_top1"] == 1.0
    assert retrieval(trf, trl, tef, tel)["R@1"] == 1.0


def test_knn_votes_are_weighted_by_similarity_and_k_is_honest():
    # the query sits close to one class-0 video and far from two class-1 videos: a plain majority of
    # k=3 says 1, the exp(sim / 0.07) weighted vote says 0
    train = np.array([[1.0, 0.0], [-0.2, 1.0], [-0.3, 1.0]], np.float32)[:, None]
    test = np.array([[1.0, 0.05]], np.float32)[:, None]
    out = knn_classify(train, np.array([0, 1, 1]), test, np.array([0]), 2, ks=(1, 3, 10))
    assert out == {"k1_top1": 1.0, "k3_top1": 1.0}  # k 10 > 3 train videos: not reported under a false name


def test_retrieval_recall_counts_a_hit_anywhere_in_the_top_k():
    # the query's nearest neighbours in order: class 1, class 1, class 0 (its own), class 1, class 1
    angles = np.radians([0, 10, 20, 30, 40, 50])
    train = np.stack([np.cos(angles[1:]), np.sin(angles[1:])], 1).astype(np.float32)[:, None]
    test = np.array([[1.0, 0.0]], np.float32)[:, None]
    r = retrieval(train, np.array([1, 1, 0, 1, 1]), test, np.array([0]), ks=(1, 2, 3, 5))
    assert r == {"R@1": 0.0, "R@2": 0.0, "R@3": 1.0}  # R@5 = all 5 train videos: trivially 1, left out


def test_protocols_on_random_features_are_near_chance():
    rng = np.random.default_rng(0)
    trf, tef = rng.normal(size=(200, 2, 32)).astype(np.float32), rng.normal(size=(200, 2, 32)).astype(np.float32)
    trl, tel = rng.integers(0, 10, 200), rng.integers(0, 10, 200)
    assert linear_probe(trf, trl, tef, tel, 10)["video_top1"] < 0.2
    assert knn_classify(trf, trl, tef, tel, 10)["k20_top1"] < 0.2
    assert retrieval(trf, trl, tef, tel)["R@1"] < 0.2


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
    from pipeline.distill import DistillConfig, run_distill
    from pipeline.extract import ExtractConfig, run_extract
    cache = tmp_path / "cache"
    run_extract(ExtractConfig(videos=str(tiny_folder_task), cache=str(cache), height=64, width=80, teacher_every=4,
                              progress=False))
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
