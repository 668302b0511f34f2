"""The cache's format 3: frames and flow in their codec inside shards, the consolidated index, upgrades."""
import os
import pickle
import shutil

import google_crc32c
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import LOSSLESS, D, H, K, W, commit, extract_config, hand_made_cache, small_videos

import cache.shards
from cache.fingerprint import CacheError
from cache.index import INDEX_FILE, committed_parts, open_index
from cache.manifest import verify_cache
from cache.reader import CacheReader
from cache.shards import EMPTY
from cache.writer import PartWriter
from cli import cli
from pipeline.extract.extract import run_extract

FORMAT2 = os.path.join(os.path.dirname(__file__), "data", "format2-cache")  # written by the format-2 writer


def test_extract_stores_jpeg_frames_and_flow_close_to_lossless_and_fingerprints_the_codecs(tmp_path):
    videos = small_videos(tmp_path / "videos", 2)
    run_extract(extract_config(videos, tmp_path / "lossless", frame_codec="zstd", flow_codec="zstd"))
    run_extract(extract_config(videos, tmp_path / "jpeg"))
    exact, lossy = CacheReader(str(tmp_path / "lossless")), CacheReader(str(tmp_path / "jpeg"))
    assert lossy.fingerprint["storage"] == {"frames": "jpeg q90", "flow": "jpeg q95"}
    assert exact.fingerprint["storage"] == {"frames": "zstd", "flow": "zstd"}
    for vid in exact.ids:
        a, b = exact.read(vid), lossy.read(vid)
        mse = np.mean((a["frames"].astype(float) - b["frames"].astype(float)) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) > 30  # dB
        assert np.abs(a["flow"] - b["flow"]).mean() < 0.3  # px
        np.testing.assert_array_equal(a["logits"], b["logits"])  # teacher outputs stay exact
    # a clip of any frames reads the same through the chunk cache and without it
    plain = CacheReader(str(tmp_path / "jpeg"), chunk_cache_mb=0)
    picks = np.array([5, 1, 1, 7])
    for key in ("frames", "flow_codes"):
        np.testing.assert_array_equal(plain.frames_at("v00.mp4", picks, True)[key],
                                      lossy.frames_at("v00.mp4", picks, True)[key])


def test_a_video_rolled_back_across_shard_files_leaves_the_earlier_rows_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(cache.shards, "SHARD_BYTES", 4 * H * W * 3)  # 4 frames per shard file
    hand_made_cache(tmp_path / "c", lengths=(5,))
    w = PartWriter(str(tmp_path / "c"), "x", H, W, True, K, D, LOSSLESS)
    start = w.begin_video()
    w.append("frames", np.full((6, H, W, 3), 1, np.uint8))
    w.add_record({"id": "kept", "status": "ok", "error": None, "frame_offset": start["frames"], "frame_count": 6,
                  "teacher_offset": 0, "teacher_count": 0})
    w.begin_video()
    w.append("frames", np.full((7, H, W, 3), 2, np.uint8))  # through shard files 1 and 2 (rows 6..12)
    w.rollback_video()
    start = w.begin_video()
    w.append("frames", np.full((3, H, W, 3), 3, np.uint8))
    w.add_record({"id": "after", "status": "ok", "error": None, "frame_offset": start["frames"], "frame_count": 3,
                  "teacher_offset": 0, "teacher_count": 0})
    for name in ("flow", "teacher_frame", "logits", "embed"):
        w.arrays[name].truncate(0)
    commit(w)
    part = os.path.join(str(tmp_path / "c"), "parts", w.name)
    assert sorted(os.listdir(os.path.join(part, "frames", "c"))) == ["0", "1", "2"]  # 9 rows, 4 per file
    import zarr
    frames = zarr.open_group(part, mode="r")["frames"][:]
    assert list(frames[:, 0, 0, 0]) == [1] * 6 + [3] * 3


def test_verify_finds_a_chunk_missing_inside_a_shard_and_a_missing_shard_file(tmp_path):
    path = hand_made_cache(tmp_path / "c")
    part = committed_parts(path)[0]
    shard = os.path.join(path, "parts", part, "flow", "c", "0", "0", "0", "0")
    data = bytearray(open(shard, "rb").read())
    count = CacheReader(path)._arrays(part)["flow"].count  # chunks per shard; their (offset, length) index ends it
    entry = len(data) - 4 - 16 * count + 16 * 2  # chunk 2's entry
    data[entry:entry + 16] = np.array([EMPTY, EMPTY], "<u8").tobytes()
    data[-4:] = google_crc32c.value(bytes(data[-4 - 16 * count:-4])).to_bytes(4, "little")  # a valid index
    open(shard, "wb").write(bytes(data))
    problems, _, _ = verify_cache(path, quick=True)
    # named with the video and frame it belongs to
    assert f"{part}/flow: shard c/0/0/0/0: 1 chunk(s) missing, e.g. video 'v0' frame 2" in problems, problems
    os.remove(shard)
    problems, _, _ = verify_cache(path, quick=True)
    assert f"{part}/flow: shard c/0/0/0/0 is missing (from video 'v0' frame 0)" in problems, problems


def test_the_index_follows_the_parts_it_is_built_from(tmp_path):
    path = hand_made_cache(tmp_path / "c", lengths=(20, 3))
    assert CacheReader(path).ids == ["v0", "v1"]
    assert os.path.exists(os.path.join(path, INDEX_FILE))
    # a part committed after the index was written (a crash before the index update): found, not lost
    w = PartWriter(path, "late", H, W, True, K, D, LOSSLESS)
    start = w.begin_video()
    w.append("frames", np.zeros((4, H, W, 3), np.uint8))
    w.append("flow", np.full((4, H, W, 2), 128, np.uint8))
    w.add_record({"id": "v2", "status": "ok", "error": None, "frame_offset": start["frames"], "frame_count": 4,
                  "teacher_offset": 0, "teacher_count": 0})
    commit(w)
    with pytest.warns(UserWarning, match=r"does not list the committed parts \(1 more, 0 fewer"):
        reader = CacheReader(path)
    assert reader.ids == ["v0", "v1", "v2"] and reader.num_frames("v2") == 4 and reader.record("v2")["status"] == "ok"
    # a damaged index file is rebuilt, never trusted
    with open(os.path.join(path, INDEX_FILE), "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="is damaged .*; rebuilt from the parts"):
        assert CacheReader(path).ids == ["v0", "v1", "v2"]
    # a part whose commit record is gone (quarantine): its videos leave the index
    os.remove(os.path.join(path, "commits", w.name + ".json"))
    with pytest.warns(UserWarning, match=r"\(0 more, 1 fewer"):
        assert CacheReader(path).ids == ["v0", "v1"]
    # a worker gets the reader by pickling: it maps the file itself and reads the same
    clone = pickle.loads(pickle.dumps(CacheReader(path)))
    np.testing.assert_array_equal(clone.read("v0", 2, 5)["frames"], CacheReader(path).read("v0", 2, 5)["frames"])
    assert open_index(path).parts == committed_parts(path)


def test_a_read_only_cache_is_indexed_in_memory(tmp_path, monkeypatch):
    import cache.index
    path = hand_made_cache(tmp_path / "c")  # no reader yet: no index.bin

    def refuse(*args):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(cache.index.os, "replace", refuse)  # as on a read-only mount (root ignores chmod)
    reader = CacheReader(path)
    assert reader.ids == ["v0", "v1"] and reader.index.source == "memory"
    assert sorted(os.listdir(path)) == ["cache.json", "commits", "parts"]  # no index, no temporary file left behind


def test_a_format2_cache_is_refused_in_one_line_and_upgraded_without_loss(tmp_path):
    old = shutil.copytree(FORMAT2, tmp_path / "old")
    with pytest.raises(CacheError, match=r"format-2 cache; convert it once with `cli.py cache upgrade .*old`"):
        CacheReader(str(old))
    # to a new folder, lossless codecs: the values are the format-2 cache's exactly
    result = CliRunner().invoke(cli, ["cache", "upgrade", str(old), "--out", str(tmp_path / "new"),
                                      "--frame-codec", "zstd", "--flow-codec", "zstd"])
    assert result.exit_code == 0, result.output
    assert "upgraded 1 parts" in result.output
    new = CacheReader(str(tmp_path / "new"))
    assert new.ids == ["v0", "v1"] and verify_cache(str(tmp_path / "new"))[0] == []
    fresh = CacheReader(hand_made_cache(tmp_path / "fresh", lengths=(20, 3)))  # the same content, written today
    for vid in new.ids:
        a, b = new.read(vid), fresh.read(vid)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # in place, killed after the old part was parked and before the new one was committed: the rerun
    # converts the parked part and leaves nothing behind
    parts = os.path.join(old, "parts")
    name = [n for n in os.listdir(parts) if n.startswith("part-")][0]
    os.rename(os.path.join(parts, name), os.path.join(parts, ".old-" + name))
    result = CliRunner().invoke(cli, ["cache", "upgrade", str(old)])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(parts)) == [name]
    upgraded = CacheReader(str(old))
    assert upgraded.fingerprint["storage"] == {"frames": "jpeg q90", "flow": "jpeg q95"}
    assert upgraded.num_frames("v0") == 20 and verify_cache(str(old))[0] == []
    again = CliRunner().invoke(cli, ["cache", "upgrade", str(old)])
    assert again.exit_code == 2 and "already format 4; nothing to upgrade" in again.output


def test_a_worker_sees_the_videos_its_parent_chose_even_after_a_new_part(tmp_path):
    path = hand_made_cache(tmp_path / "c", lengths=(20, 3))
    parent = CacheReader(path)
    w = PartWriter(path, "late", H, W, True, K, D, LOSSLESS)
    start = w.begin_video()
    w.append("frames", np.full((4, H, W, 3), 7, np.uint8))
    w.append("flow", np.full((4, H, W, 2), 128, np.uint8))
    w.add_record({"id": "a-first", "status": "ok", "error": None, "frame_offset": start["frames"], "frame_count": 4,
                  "teacher_offset": 0, "teacher_count": 0})  # sorts first: every later row would move by one
    commit(w)
    assert CacheReader(path).ids == ["a-first", "v0", "v1"]  # index.bin now holds three videos
    worker = pickle.loads(pickle.dumps(parent))  # as a DataLoader worker gets the dataset's reader
    assert [worker.index.id(r) for r in parent.rows] == ["v0", "v1"]
    np.testing.assert_array_equal(worker.read("v1")["frames"], parent.read("v1")["frames"])
