"""Evaluation end to end on a folder task (rows, reports, feature reuse, embed), small-data reporting,
and one-line CLI errors."""
import json
import os
import re

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import extract_config, make_video

from cache.fingerprint import sha256_file
from cli import cli
from pipeline.common.config import DistillConfig, EvalConfig
from pipeline.evaluate.evaluate import run_eval, small_data_warnings
from pipeline.evaluate.protocols import chance_level, wilson_interval
from pipeline.evaluate.report import format_table, write_reports


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
    from pipeline.distill.train import run_distill
    from pipeline.extract.extract import run_extract
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
    # the student was distilled on these very videos: said in the notes, its row marked, the baselines not
    n_test = rows[0]["test_videos"]
    assert any(f"transductive: the checkpoint was pre-trained (without labels) on {n_test} of the {n_test} test "
               "videos" in n for n in notes)
    assert {r["transductive"] for r in rows if r["init"] == "checkpoint"} == {n_test}
    assert {r["transductive"] for r in rows if r["init"] != "checkpoint"} == {0}
    assert "| checkpoint ← scratch † |" in md and "† transductive" in md  # where the student started and "| scratch |" in md and "linear video_top1" in md
    stores = {p.name.split("-")[0]: p for p in (out / "features").glob("*.h5")}
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
    assert {p.name for p in (out / "features").glob("checkpoint-*.h5")} == {stores["checkpoint"].name}
    run_distill(DistillConfig(cache=str(cache), out=str(run), student="r3d_cpu", clip_len=4, crop=48, batch_size=4,
                              steps=3, workers=0, progress=False))  # trained on: other weights, new features
    run_eval(EvalConfig(**{**cfg.__dict__, "protocols": ("knn",), "inits": ("checkpoint",)}))
    assert len(list((out / "features").glob("checkpoint-*.h5"))) == 2
    # the labelled videos are the ones distilled on: their frames come from that cache, none decoded again
    assert not list(out.glob("cache-*")) and any(str(cache) in n for n in notes)

    feats = tmp_path / "feats.h5"
    result = CliRunner().invoke(cli, ["embed", "--videos", str(tiny_folder_task), "--checkpoint", str(run / "checkpoint.pt"),
                                      "--out", str(feats), "--per-clip", "--clips", "2"])
    assert result.exit_code == 0, result.output
    with h5py.File(feats) as f:
        assert f["features"].shape == (12, 128) and f["clip_features"].shape == (12, 2, 128)
        assert sorted(i.decode() for i in f["ids"][()])[0] == "left/l0.mp4"
        config = json.loads(f.attrs["config"])
        assert config["clips"] == 2 and config["frames_from"] == str(cache)  # read from the distill cache
        assert [vid for vid, _ in config["failed"]] == ["right/broken.mp4"]
        # 12 frames at 8 fps, clips of 4 frames 2 apart (7 frames): the first and the last window
        assert f["num_frames"][0] == 12 and f["clip_times"].shape == (12, 2, 2)
        assert f["clip_times"][0].tolist() == [[0.0, 0.875], [0.625, 1.5]]
    assert not list(tmp_path.glob("*.cache")) and not list(tmp_path.glob("cache-*"))  # no hidden second decode
    assert "checkpoint-" in " ".join(json.load(open(tmp_path / "features" / "index.json"))["stores"])


def test_eval_cli_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--task", "folder", "--root", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "data folder does not exist" in result.output
    result = CliRunner().invoke(cli, ["eval", "--task", "folder", "--root", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output


def _labelled_folder(root, sizes):
    """Class folders of generated videos: sizes = {class: number of videos}."""
    for k, (cls, n) in enumerate(sizes.items()):
        for i in range(n):
            make_video(str(root / cls / f"{cls}{i}.mp4"), n=10, h=48, w=64, seed=10 * k + i, dx=k - 1)
    return root


@pytest.mark.slow
def test_small_labelled_sets_get_counts_chance_warnings_intervals_and_one_decode(tmp_path):
    root = _labelled_folder(tmp_path / "labelled", {"a": 3, "b": 3, "c": 1})
    out = tmp_path / "eval"
    base = ["eval", "--task", "folder", "--root", str(root), "--out", str(out), "--clips", "2"]
    first = CliRunner().invoke(cli, base + ["--init", "scratch", "--protocol", "knn", "--protocol", "linear"])
    assert first.exit_code == 0, first.output
    text = first.output
    assert "per class, train/test videos: a 2/1, b 2/1, c 1/0" in text
    assert "chance: 33.3 % top-1 (3 classes guessed at random)" in text
    assert "warning: 1 of 3 classes have no test video" in text and ": c" in text
    assert "warning: only 2 test videos: one video moves an accuracy by 50.0 points" in text
    # the table shows what was computed: kNN at k = 5 (the number of train videos), linear video and clip
    header = next(line for line in text.splitlines() if line.startswith("| init |"))
    assert header == "| init | linear video_top1 | linear clip_top1 | knn k5_top1 |"
    assert "| chance | 33.3 | 33.3 | 33.3 |" in text

    second = CliRunner().invoke(cli, base + ["--init", "teacher", "--protocol", "knn"])  # other rows, same out
    assert second.exit_code == 0, second.output
    assert len(list(out.glob("cache-*"))) == 1  # the labelled videos were decoded once, whatever the rows
    saved = json.load(open(out / "results.json"))
    assert [r["run"] for r in saved["runs"]] == [1, 2]  # the second eval added to the first, overwrote nothing
    assert {(r["run"], r["init"]) for r in saved["results"]} == {(1, "scratch"), (2, "teacher")}
    assert saved["runs"][0]["classes"] == [{"name": "a", "train": 2, "test": 1}, {"name": "b", "train": 2, "test": 1},
                                           {"name": "c", "train": 1, "test": 0}]
    row = next(r for r in saved["results"] if r["metric"] == "k5_top1" and r["init"] == "scratch")
    assert row["ci95"] == list(wilson_interval(row["value"], 2)) and row["chance"] == 1 / 3
    md = open(out / "results.md").read()
    assert "## Run 1: folder" in md and "## Run 2: folder" in md and "**Warning:** only 2 test videos" in md
    assert re.search(r"\| scratch \| \d+\.\d \(\d+\.\d–\d+\.\d\) \|", md)  # each accuracy with its interval
    index = json.load(open(out / "features" / "index.json"))["stores"]
    assert sorted(e["init"] for e in index.values()) == ["scratch", "teacher"]
    assert all(e["videos"] == 7 and (out / "features" / name).exists() for name, e in index.items())


def test_classes_of_one_video_are_refused_saying_each_class_needs_two(tmp_path):
    for cls in ("a", "b", "c", "d", "e"):  # listed, never decoded: the split is refused first
        (tmp_path / "data" / cls).mkdir(parents=True)
        (tmp_path / "data" / cls / "only.mp4").write_bytes(b"")
    result = CliRunner().invoke(cli, ["eval", "--task", "folder", "--root", str(tmp_path / "data"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    message = result.output.strip()
    assert "\n" not in message and "no decodable" not in message
    assert "5 train / 0 test videos: no test videos; each class needs at least two videos" in message
    assert "5 of 5 classes have fewer: a (1), b (1), c (1), d (1), e (1)" in message
    assert not (tmp_path / "out").exists()  # nothing decoded, nothing written


def _row(init, protocol, metric, value, n_test=4, run=None):
    return {"init": init, "protocol": protocol, "metric": metric, "value": value, "task": "folder", "split": "s",
            "seed": 0, "date": "d", "views": "v", "train_videos": 10, "test_videos": n_test,
            "ci95": None if metric == "weight_decay" else wilson_interval(value, n_test),
            "chance": chance_level(metric, np.array([0, 1] * 5), 7, np.array([0, 1, 0, 1]))}


def test_the_table_shows_exactly_the_columns_computed_with_a_chance_row():
    rows = [_row("checkpoint", "knn", "k10_top1", 0.5), _row("checkpoint", "linear", "video_top5", 1.0),
            _row("checkpoint", "linear", "video_top1", 0.75), _row("checkpoint", "linear", "weight_decay", 1e-4),
            _row("teacher", "knn", "k10_top1", 0.25), _row("teacher", "retrieval", "R@1", 0.5)]
    lines = format_table(rows).splitlines()
    assert lines[0] == "| init | linear video_top1 | linear video_top5 | knn k10_top1 | retrieval R@1 |"
    assert lines[2] == "| checkpoint | 75.0 | 100.0 | 50.0 | – |"
    assert lines[3] == "| teacher | – | – | 25.0 | 50.0 |"
    assert lines[4].startswith("| chance | 14.3 | 71.4 | 14.3 | ")
    assert "(" not in format_table(rows) and "75.0 (30.1–95.4)" in format_table(rows, intervals=True)


def test_reports_accumulate_runs_and_keep_a_results_file_of_the_old_format(tmp_path):
    json.dump({"notes": ["old"], "results": [_row("scratch", "knn", "k10_top1", 0.5)]}, open(tmp_path / "results.json", "w"))
    rows = [_row("checkpoint", "knn", "k10_top1", 0.75)]
    write_reports(str(tmp_path), rows, {"task": "folder", "split": "s", "seed": 0, "date": "d", "notes": ["new"],
                                        "warnings": ["only 4 test videos"]})
    saved = json.load(open(tmp_path / "results.json"))
    assert [r["run"] for r in saved["runs"]] == [1, 2] and rows[0]["run"] == 2
    assert [(r["run"], r["init"]) for r in saved["results"]] == [(1, "scratch"), (2, "checkpoint")]
    md = open(tmp_path / "results.md").read()
    assert md.index("## Run 1") < md.index("## Run 2") and "**Warning:** only 4 test videos" in md


def test_small_data_warnings_name_the_classes_and_the_interval():
    warnings = small_data_warnings([("a", 3, 1), ("b", 1, 0), ("c", 0, 2)], 3)
    assert warnings[0].startswith("1 of 3 classes have no test video") and warnings[0].endswith(": b")
    assert warnings[1].startswith("1 classes have test videos but no train video") and warnings[1].endswith(": c")
    assert warnings[2].startswith("only 3 test videos: one video moves an accuracy by 33.3 points")
    assert small_data_warnings([("a", 50, 20), ("b", 50, 20)], 40) == []


@pytest.mark.slow
def test_zeroshot_alone_scores_every_video_of_a_folder_task(tiny_folder_task, concept_bank, tmp_path):
    import torch

    from pipeline.common.errors import EvalError
    from pipeline.distill.train import run_distill
    from pipeline.extract.extract import run_extract
    cache = tmp_path / "cache"
    run_extract(extract_config(tiny_folder_task, cache, height=64, width=80, teacher_every=4))
    run = tmp_path / "run"
    run_distill(DistillConfig(cache=str(cache), out=str(run), objective="lss", concepts=concept_bank, student="r3d_cpu",
                              clip_len=4, crop=48, batch_size=4, steps=2, workers=0, progress=False))
    cfg = EvalConfig(task="folder", root=str(tiny_folder_task), out=str(tmp_path / "eval"), protocols=("zeroshot",),
                     checkpoint=str(run / "checkpoint.pt"), clips=2, teacher_every=4, progress=False)
    rows, task, notes = run_eval(cfg)
    # nothing is trained on: all 12 decodable videos are scored, even with a 70/30 split configured
    assert {r["test_videos"] for r in rows} == {12} and {r["train_videos"] for r in rows} == {0}
    assert {r["init"] for r in rows} == {"checkpoint", "scratch", "teacher"}  # inflate has no text space
    assert {(r["protocol"], r["metric"]) for r in rows} == {("zeroshot", "video_top1"), ("zeroshot", "clip_top1")}
    assert all(0 <= r["value"] <= 1 and r["chance"] == 0.5 for r in rows)
    assert any("'left' -> 'left'" in n for n in notes) and any("all 12 videos are scored" in n for n in notes)
    # a checkpoint whose bank came from another text encoder is refused, not silently compared
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["concepts"]["text_encoder"]["weights_sha256"] = "0" * 64
    torch.save(ckpt, run / "other.pt")
    with pytest.raises(EvalError, match="other.pt's concept bank: made with text encoder minilm"):
        run_eval(EvalConfig(**{**cfg.__dict__, "checkpoint": str(run / "other.pt")}))


@pytest.mark.slow
def test_teacher_row_decodes_each_video_once_for_probes_and_zeroshot(tiny_folder_task, tmp_path, monkeypatch):
    import pipeline.evaluate.teacher_row as teacher_row
    opened = []

    class CountingDecode(teacher_row.VideoDecode):
        def __init__(self, path, **kw):
            opened.append(path)
            super().__init__(path, **kw)
    monkeypatch.setattr(teacher_row, "VideoDecode", CountingDecode)
    base = dict(task="folder", root=str(tiny_folder_task), teacher_every=4, progress=False)
    # first eval over this root: the teacher runs inside the one decode of the labelled videos
    rows, _, _ = run_eval(EvalConfig(**base, out=str(tmp_path / "a"), protocols=("knn", "zeroshot"), inits=("teacher",)))
    assert {r["protocol"] for r in rows} == {"knn", "zeroshot"} and opened == []
    [cache] = (tmp_path / "a").glob("cache-*")
    assert cache.name.endswith("-every4") and json.load(open(cache / "cache.json"))["fingerprint"]["teacher"]["name"] \
        == "efficientnet_lite0"
    # frames decoded earlier without a teacher: its row decodes each video once for both protocols
    run_eval(EvalConfig(**base, out=str(tmp_path / "b"), protocols=("knn",), inits=("scratch",)))
    rows, _, _ = run_eval(EvalConfig(**base, out=str(tmp_path / "b"), protocols=("knn", "zeroshot"), inits=("teacher",)))
    assert len(list((tmp_path / "b").glob("cache-*"))) == 1
    assert sorted(opened) == sorted(set(opened)) and len(opened) == rows[0]["train_videos"] + rows[0]["test_videos"]


def test_the_teacher_row_defaults_to_the_checkpoints_teacher(tiny_folder_task, tmp_path):
    import torch

    from pipeline.common.errors import EvalError
    from pipeline.evaluate.evaluate import with_defaults
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"teacher weights")
    base = dict(task="folder", root=str(tiny_folder_task), out=str(tmp_path / "e"))
    for teacher, want in (({"name": "none", "weights": None, "weights_sha256": None}, ("efficientnet_lite0", None)),
                          (None, ("efficientnet_lite0", None)),
                          ({"name": "clip:X", "weights": str(weights), "weights_sha256": sha256_file(str(weights))},
                           ("clip:X", str(weights)))):
        torch.save({"config": {}, "teacher": teacher}, tmp_path / "ckpt.pt")
        cfg, notes = with_defaults(EvalConfig(**base, checkpoint=str(tmp_path / "ckpt.pt")))
        assert (cfg.teacher, cfg.teacher_weights) == want
    weights.write_bytes(b"other weights")  # replaced since the checkpoint was distilled
    with pytest.raises(EvalError, match="w.pt: the weights of the checkpoint's teacher clip:X are gone or changed"):
        with_defaults(EvalConfig(**base, checkpoint=str(tmp_path / "ckpt.pt")))


def test_pretrained_on_finds_the_test_videos_a_distillation_cache_holds(tiny_folder_task, tmp_path):
    from pipeline.evaluate.frames import Preprocessing, pretrained_on
    from pipeline.extract.extract import run_extract
    cache = tmp_path / "cache"
    run_extract(extract_config(tiny_folder_task / "left", cache, height=64, width=80, teacher="none", flow="none"))
    copy = tmp_path / "elsewhere" / "l1.mp4"  # the same file copied to another folder still counts
    copy.parent.mkdir()
    copy.write_bytes((tiny_folder_task / "left" / "l1.mp4").read_bytes())
    videos = [("left/l0.mp4", str(tiny_folder_task / "left" / "l0.mp4")), ("l1.mp4", str(copy)),
              ("right/r0.mp4", str(tiny_folder_task / "right" / "r0.mp4"))]
    assert pretrained_on(Preprocessing(distill_cache=str(cache)), videos) == ["left/l0.mp4", "l1.mp4"]
    assert pretrained_on(Preprocessing(distill_cache=str(tmp_path / "gone")), videos) is None


@pytest.mark.slow
def test_decode_workers_share_out_the_one_decode_and_keep_its_frames(tiny_folder_task, tmp_path):
    results, outs = {}, {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"workers{workers}"
        results[workers], _, _ = run_eval(EvalConfig(task="folder", root=str(tiny_folder_task), out=str(outs[workers]),
                                                     inits=("scratch", "teacher"), protocols=("knn",), clips=1,
                                                     crops=1, teacher_every=2, decode_workers=workers,
                                                     progress=False))
    # two processes each committed a part of the one cache (the teacher running inside the decode) ...
    commits = next(outs[2].glob("cache-*-teacher-*")) / "commits"
    assert len(list(commits.glob("part-*w0-*"))) == len(list(commits.glob("part-*w1-*"))) == 1
    # ... with the same frames: the scratch row's numbers are one process's
    scratch = {w: [(r["metric"], r["value"], r["train_videos"]) for r in results[w] if r["init"] == "scratch"]
               for w in (1, 2)}
    assert scratch[2] == scratch[1] and scratch[1]
    # the teacher's features agree to float rounding (its frames reach it in other batches)
    feats = {}
    for w in (1, 2):
        with h5py.File(next((outs[w] / "features").glob("teacher-*.h5"))) as f:
            feats[w] = dict(zip([i.decode() for i in f["ids"][()]], f["features"][()]))
    assert feats[2].keys() == feats[1].keys()
    assert all(np.allclose(feats[2][v], feats[1][v], rtol=1e-3, atol=1e-4) for v in feats[1])


@pytest.mark.slow
def test_hmdb51s_source_groups_reach_the_linear_probe(tmp_path, monkeypatch):
    # HMDB51 cuts several clips from one source (<source>_<n>.avi): the probe's weight-decay hold-out
    # must keep them together, so eval hands it each training video's source, not the video itself
    import pipeline.evaluate.evaluate as evaluate
    root = tmp_path / "hmdb51"
    (root / "testTrainMulti_7030_splits").mkdir(parents=True)
    for c, (cls, dx) in enumerate((("walk", -3), ("run", 3))):
        lines = []
        for s in range(4):
            for n in range(2):
                name = f"Source{s}_{cls}_f_cm_np1_fr_med_{n}.avi"
                make_video(str(root / "hmdb51_org" / cls / name), n=12, h=64, w=96, seed=10 * c + 2 * s + n, dx=dx)
                lines.append(f"{name} {2 if s == 3 else 1}")  # source 3 tested, 0-2 trained on
        (root / "testTrainMulti_7030_splits" / f"{cls}_test_split1.txt").write_text("\n".join(lines) + "\n")
    seen, probe = [], evaluate.linear_probe

    def recording_probe(*args, **kwargs):  # the real probe, its groups noted
        seen.append(args[6] if len(args) > 6 else kwargs.get("train_groups"))
        return probe(*args, **kwargs)
    monkeypatch.setattr(evaluate, "linear_probe", recording_probe)
    rows, task, _ = run_eval(EvalConfig(task="hmdb51", root=str(root), out=str(tmp_path / "e"), inits=("scratch",),
                                        protocols=("linear",), progress=False))
    assert {r["protocol"] for r in rows} == {"linear"} and rows[0]["train_videos"] == 12
    [groups] = seen
    assert groups == [os.path.basename(v).rsplit("_", 1)[0] for v, _, _ in task.train]
    assert len(set(groups)) == 6  # 12 training clips from 6 sources
