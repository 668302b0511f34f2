"""Task loaders: the real UCF101 split files, HMDB51 split files, folder and CSV tasks with seeded,
stratified, group-respecting splits."""
import os
import shutil

import pytest
from click.testing import CliRunner
from helpers import make_video

from cli import cli
from pipeline.common.config import UCF_GROUPS, group_rule
from pipeline.common.errors import TaskError
from pipeline.evaluate.tasks import compile_group_pattern, group_of, load_csv, load_folder, load_hmdb51, load_ucf101

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
    with pytest.raises(TaskError, match="no UCF101 split files found"):
        load_ucf101(str(tmp_path), split=1)


@pytest.mark.parametrize("videos, splits", [
    ("UCF-101", "ucfTrainTestlist"),  # as the archives unpack, side by side
    ("UCF101/UCF-101", "UCF101TrainTestSplits-RecognitionTask/ucfTrainTestlist"),  # one level deeper
    (".", "ucfTrainTestlist"),  # the class folders directly under the root, split files inside it
])
def test_ucf101_is_found_in_the_layouts_people_have(tmp_path, videos, splits):
    shutil.copytree(UCF_SPLITS, tmp_path / splits)
    rel = "Archery/v_Archery_g01_c01.avi"
    (tmp_path / videos / rel).parent.mkdir(parents=True)
    (tmp_path / videos / rel).write_bytes(b"x")
    task = load_ucf101(str(tmp_path))
    assert os.path.samefile(task.root, tmp_path / videos)  # ids stay Class/v_... relative to the video folder
    assert [(vid, label) for vid, _, label in task.test] == [(rel, 2)]


def test_default_root_honours_vidistill_data(monkeypatch):
    from pipeline.evaluate.tasks import default_root
    monkeypatch.delenv("VIDISTILL_DATA", raising=False)
    assert default_root("ucf101") == os.path.join("data", "ucf101")
    monkeypatch.setenv("VIDISTILL_DATA", "/datasets")
    assert default_root("hmdb51") == "/datasets/hmdb51"


def test_split_files_without_any_listed_video_say_what_is_expected(tmp_path):
    shutil.copytree(UCF_SPLITS, tmp_path / "ucfTrainTestlist")
    with pytest.raises(TaskError, match="none of the 13320 videos of split 1 is there.*UCF-101"):
        load_ucf101(str(tmp_path))


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
    assert next(p for p in eval_cmd.params if p.name == "group_pattern").default is None
    assert group_rule("folder") == group_rule("ucf101") == UCF_GROUPS and group_rule("folder", "") == ""


def test_hmdb51_groups_the_clips_of_one_source():
    pattern = compile_group_pattern(group_rule("hmdb51"))
    clips = [f"brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_{i}.avi" for i in range(3)]
    assert {group_of(c, pattern) for c in clips} == {"April_09_brush_hair_u_nm_np1_ba_goo"}
    assert group_of("wave/RATRACE_wave_f_nm_np1_fr_goo_37.avi", pattern) != group_of(clips[0], pattern)


def test_explicit_lists_keep_source_groups_on_one_side(tmp_path):
    for cls in ("a", "b"):
        for g in range(3):
            for c in range(2):
                make_video(str(tmp_path / "data" / cls / f"v_{cls}_g{g:02d}_c{c:02d}.mp4"), n=2, h=16, w=16)
    train = tmp_path / "train.txt"
    train.write_text("a/v_a_g00_c00.mp4\nb/v_b_g00_c00.mp4\nb/v_b_g01_c00.mp4\nb/v_b_g01_c01.mp4\n")
    task = load_folder(str(tmp_path / "data"), train_list=str(train))
    test = {v for v, _, _ in task.test}
    # the other clip of a's and b's group 0 is not tested: its source is on the train side
    assert "a/v_a_g00_c01.mp4" not in test and "b/v_b_g00_c01.mp4" not in test and len(test) == 6
    assert sorted(task.left_out) == ["a/v_a_g00_c01.mp4", "b/v_b_g00_c01.mp4"] and "2 left out" in task.describe()
    leaky = tmp_path / "test.txt"
    leaky.write_text("a/v_a_g00_c01.mp4\na/v_a_g01_c00.mp4\n")
    with pytest.raises(TaskError, match=r"test.txt: 1 source group\(s\) also on the train side .*'v_a_g00'"):
        load_folder(str(tmp_path / "data"), train_list=str(train), test_list=str(leaky))
    assert len(load_folder(str(tmp_path / "data"), train_list=str(train), test_list=str(leaky), group_pattern="").test) == 2


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
