"""`extract --videos LIST`: .txt and .csv lists give the ids a folder gives; relative paths are read
from the list's folder; duplicates, missing files and folders are reported, never fatal."""
import os

import pytest
from click.testing import CliRunner
from helpers import extract_config, make_video

from cache.manifest import cache_info
from cache.reader import CacheReader
from cli import cli
from pipeline.common.errors import ExtractError
from pipeline.extract.extract import run_extract
from pipeline.extract.job import shard_of
from pipeline.extract.videolist import find_videos, read_video_list


@pytest.fixture
def tree(tmp_path):
    """data/a.mp4, data/sub/b.mp4, outside/c.mp4 (a folder beside the list's)."""
    for rel, seed in (("data/a.mp4", 0), ("data/sub/b.mp4", 1), ("outside/c.mp4", 2)):
        make_video(str(tmp_path / rel), n=8, h=48, w=64, seed=seed)
    return tmp_path


def test_txt_list_relative_absolute_missing_duplicate_and_folder(tree):
    data, outside = tree / "data", tree / "outside"
    (data / "list.txt").write_text("\n".join([
        "# videos for the run", "a.mp4", "./sub/b.mp4", "", f"{outside}/c.mp4",
        "sub/b.mp4",  # 6: the same file again
        f"{data}/a.mp4",  # 7: a.mp4 written absolute
        "missing.mp4",  # 8
        "sub",  # 9: a folder
        "  ../outside/c.mp4  ",  # 10: c.mp4 again, relative and padded
    ]) + "\n")
    found, problems = read_video_list(str(data / "list.txt"))
    c_id = os.path.abspath(outside / "c.mp4").replace(os.sep, "/")
    assert found == sorted([(c_id, os.path.normpath(str(outside / "c.mp4"))), ("a.mp4", str(data / "a.mp4")),
                            ("missing.mp4", str(data / "missing.mp4")), ("sub/b.mp4", str(data / "sub" / "b.mp4"))])
    assert problems == [
        "line 6: 'sub/b.mp4' is listed again (first on line 3); extracted once",
        f"line 7: '{data}/a.mp4' is listed again (first on line 2); extracted once",
        "line 8: 'missing.mp4' does not exist; recorded as failed",
        "line 9: 'sub' is a folder, not a video; skipped (pass the folder itself as --videos to search it)",
        "line 10: '../outside/c.mp4' is listed again (first on line 5); extracted once",
    ]


@pytest.mark.parametrize("text,column", [
    ("label,path\nx,a.mp4\ny,sub/b.mp4\n", "path"),
    ("id,label\na.mp4,x\nsub/b.mp4,y\n", "id"),
    ("video,label\na.mp4,x\nsub/b.mp4,y\n,z\n", "first"),  # an empty cell is skipped
    ("a.mp4,x\nsub/b.mp4,y\n", "no header"),
    ("\ufeffPath\na.mp4\nsub/b.mp4\n", "BOM, any case"),
])
def test_csv_path_column(tree, text, column):
    (tree / "data" / "list.csv").write_text(text, encoding="utf-8")
    found, problems = read_video_list(str(tree / "data" / "list.csv"))
    assert [vid for vid, _ in found] == ["a.mp4", "sub/b.mp4"], column
    assert problems == []


def test_a_list_extracts_like_its_folder_resumes_and_shards(tree, tmp_path):
    data = tree / "data"
    (data / "list.txt").write_text("./a.mp4\n./sub/b.mp4\ngone.mp4\n./a.mp4\n")  # as `find . -name '*.mp4'` writes
    assert [v for v, _ in find_videos(str(data / "list.txt"))] == ["a.mp4", "gone.mp4", "sub/b.mp4"]
    fast = dict(teacher="none", flow="none")
    folder = run_extract(extract_config(data, tmp_path / "folder", **fast))
    listed = run_extract(extract_config(data / "list.txt", tmp_path / "list", **fast))
    assert folder["done"] == listed["done"] == 2 and listed["failed"] == 1  # gone.mp4: recorded, not fatal
    assert CacheReader(str(tmp_path / "folder")).ids == CacheReader(str(tmp_path / "list")).ids == ["a.mp4", "sub/b.mp4"]
    info = cache_info(str(tmp_path / "list"))
    assert [v for v, _ in info["failed_videos"]] == ["gone.mp4"]
    assert "No such file" in info["failed_videos"][0][1] or "not found" in info["failed_videos"][0][1]
    again = run_extract(extract_config(data / "list.txt", tmp_path / "list", **fast))
    assert again["done"] == 0 and again["skipped"] == 3  # resume: done and failed videos are skipped
    from_folder = run_extract(extract_config(data, tmp_path / "list", **fast))  # the same ids: nothing to redo
    assert from_folder["done"] == 0 and from_folder["skipped"] == 2
    # a video's shard is a hash of its id, as from a folder (shard_of): a.mp4 -> 0; gone.mp4, sub/b.mp4 -> 1
    assert [shard_of(v, 2) for v in ("a.mp4", "gone.mp4", "sub/b.mp4")] == [0, 1, 1]
    first = run_extract(extract_config(data / "list.txt", tmp_path / "shards", shard=(0, 2), **fast))
    second = run_extract(extract_config(data / "list.txt", tmp_path / "shards", shard=(1, 2), **fast))
    assert (first["done"], second["done"], second["failed"]) == (1, 1, 1)
    assert CacheReader(str(tmp_path / "shards")).ids == ["a.mp4", "sub/b.mp4"]


def test_cli_reports_list_problems_and_refuses_an_empty_list(tree, tmp_path):
    data = tree / "data"
    (data / "list.txt").write_text("a.mp4\na.mp4\nnope.mp4\n")
    r = CliRunner().invoke(cli, ["extract", "--videos", str(data / "list.txt"), "--cache", str(tmp_path / "c"),
                                 "--teacher", "none", "--flow", "none"])
    assert r.exit_code == 0, r.output
    assert "line 2: 'a.mp4' is listed again" in r.output and "line 3: 'nope.mp4' does not exist" in r.output
    assert "extracted 1 videos" in r.output and "failed: nope.mp4: " in r.output
    (data / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(ExtractError, match="no video paths in the list"):
        find_videos(str(data / "empty.txt"))
    (data / "notes.md").write_text("a.mp4\n")
    with pytest.raises(ExtractError, match=r"not a folder .* or a \.txt or \.csv list"):
        find_videos(str(data / "notes.md"))
