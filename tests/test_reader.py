"""Reading a cache: clip ranges, teacher rows, retried videos, and failed or unknown ids."""
import numpy as np
import pytest
from helpers import LOSSLESS, D, H, K, W, commit, hand_made_cache

from cache.flow_codec import quantize_flow
from cache.index import load_index
from cache.reader import CacheReader
from cache.writer import PartWriter


def test_reader_ranges_and_teacher_rows(tmp_path):
    r = CacheReader(hand_made_cache(tmp_path / "c"))
    clip = r.read("v0", 5, 11)
    assert list(clip["frames"][:, 0, 0, 0]) == [5, 6, 7, 8, 9, 10]
    assert list(clip["teacher_frame"]) == [6, 8, 10]
    assert np.allclose(clip["flow"][..., 0], np.arange(W) / 4, atol=0.1) and np.allclose(clip["flow"][..., 1], -2.0, atol=0.1)
    assert r.read("v1")["frames"].shape == (3, H, W, 3)


def test_a_retried_video_supersedes_its_failure_whichever_part_sorts_first(tmp_path):
    # `extract --retry-failed` leaves the old failure in its part and records the video again in a new
    # part, whose name may sort before the old one (e.g. after a run with --workers 2)
    cache = hand_made_cache(tmp_path / "c")  # part "part-test-…" with v0, v1 ok
    for tag, status in (("b-old", "failed"), ("a-new", "ok")):
        w = PartWriter(cache, tag, H, W, True, K, D, LOSSLESS)
        start = w.begin_video()
        if status == "ok":
            w.append("frames", np.zeros((2, H, W, 3), np.uint8))
            w.append("flow", quantize_flow(np.zeros((2, H, W, 2), np.float32)))
            w.append("teacher_frame", np.array([0], np.int32))
            w.append("logits", np.zeros((1, K), np.float16))
            w.append("embed", np.zeros((1, D), np.float16))
        w.add_record({"id": "retried", "status": status, "error": None if status == "ok" else "empty file (0 bytes)",
                      "frame_offset": start["frames"], "frame_count": 2 if status == "ok" else 0,
                      "teacher_offset": start["logits"], "teacher_count": 1 if status == "ok" else 0})
        commit(w)
    index, duplicates = load_index(cache)
    assert index["retried"][1]["status"] == "ok" and duplicates == []
    assert CacheReader(cache).read("retried")["frames"].shape == (2, H, W, 3)


def test_reading_a_failed_or_unknown_video_says_why(tmp_path):
    cache = hand_made_cache(tmp_path / "c")
    w = PartWriter(cache, "x", H, W, True, K, D, LOSSLESS)
    w.begin_video()
    w.add_record({"id": "broken.mp4", "status": "failed", "error": "empty file (0 bytes)", "frame_offset": 0,
                  "frame_count": 0, "teacher_offset": 0, "teacher_count": 0})
    commit(w)
    r = CacheReader(cache)
    with pytest.raises(KeyError, match=r"'broken.mp4' failed to extract \(empty file \(0 bytes\)\)"):
        r.read("broken.mp4")
    with pytest.raises(KeyError, match="'nope.mp4' is not in cache"):
        r.read("nope.mp4")


def _record_part(cache, tag, vid, n_frames, size, mtime, status="ok"):
    """A part holding one video record of n_frames frames from a source of this size and mtime."""
    w = PartWriter(cache, tag, H, W, True, K, D, LOSSLESS)
    start = w.begin_video()
    if status == "ok":
        w.append("frames", np.full((n_frames, H, W, 3), n_frames, np.uint8))
        w.append("flow", quantize_flow(np.zeros((n_frames, H, W, 2), np.float32)))
        w.append("teacher_frame", np.array([0], np.int32))
        w.append("logits", np.zeros((1, K), np.float16))
        w.append("embed", np.zeros((1, D), np.float16))
    w.add_record({"id": vid, "status": status, "error": None if status == "ok" else "empty file (0 bytes)",
                  "size": size, "mtime": mtime, "frame_offset": start["frames"],
                  "frame_count": n_frames if status == "ok" else 0, "teacher_offset": start["logits"],
                  "teacher_count": 1 if status == "ok" else 0})
    commit(w)


def test_a_later_record_of_a_replaced_source_supersedes_the_earlier_one_whatever_the_names(tmp_path):
    # parts are read in the order they were written (the time in their name), not by name: the
    # re-extraction of a replaced file wins although its tag sorts first
    cache = hand_made_cache(tmp_path / "c")
    _record_part(cache, "z-first", "clip.mp4", 4, size=100, mtime=1.0)
    _record_part(cache, "a-second", "clip.mp4", 6, size=250, mtime=2.0)  # another file under the same name
    _record_part(cache, "m-third", "gone.mp4", 3, size=10, mtime=1.0)
    _record_part(cache, "b-fourth", "gone.mp4", 0, size=0, mtime=5.0, status="failed")  # replaced by a broken file
    index, duplicates = load_index(cache)
    assert duplicates == []
    assert index["clip.mp4"][1]["size"] == 250 and CacheReader(cache).num_frames("clip.mp4") == 6
    assert CacheReader(cache).read("clip.mp4")["frames"][0, 0, 0, 0] == 6
    assert index["gone.mp4"][1]["status"] == "failed"  # the old frames were of a file that is no longer there
    assert "gone.mp4" not in CacheReader(cache).ids
    # the same file recorded twice readable is damage, whatever the order
    _record_part(cache, "dup", "clip.mp4", 6, size=250, mtime=2.0)
    assert [vid for vid, _ in load_index(cache)[1]] == ["clip.mp4"]


def test_the_chunk_cache_returns_the_stored_rows_across_chunk_borders_within_its_budget(tmp_path):
    chunk = H * W * 3  # a frame chunk holds one frame
    path = hand_made_cache(tmp_path / "c", lengths=(20, 3))
    plain, cached = CacheReader(path, chunk_cache_mb=0), CacheReader(path)
    for vid, start, stop in (("v0", 0, 20), ("v0", 3, 9), ("v0", 5, 6), ("v1", 0, 3), ("v0", 3, 9)):
        a, b = (r.read(vid, start, stop, fields=("frames", "flow")) for r in (plain, cached))
        np.testing.assert_array_equal(a["frames"], b["frames"])
        np.testing.assert_array_equal(a["flow"], b["flow"])
    clip = cached.read("v0", 4, 8, fields=("frames",))["frames"]
    clip[:] = 0  # the caller's own copy: the kept chunk is untouched
    assert list(cached.read("v0", 4, 8, fields=("frames",))["frames"][:, 0, 0, 0]) == [4, 5, 6, 7]
    small = CacheReader(path, chunk_cache_mb=2 * chunk / 2 ** 20)  # room for two frames
    for t in range(0, 20, 4):
        assert list(small.read("v0", t, t + 4, fields=("frames",))["frames"][:, 0, 0, 0]) == list(range(t, t + 4))
    assert len(small._chunks.chunks) == 2 and small._chunks.used <= small.chunk_cache_bytes


def test_a_files_hash_is_read_once_and_follows_a_replaced_file(tmp_path, monkeypatch):
    import builtins
    import hashlib
    import os

    import cache.fingerprint as fingerprint
    path = tmp_path / "weights.pt"
    path.write_bytes(b"first weights")
    opened = []
    monkeypatch.setattr(fingerprint, "open", lambda *a, **k: opened.append(a[0]) or builtins.open(*a, **k), raising=False)
    assert fingerprint.sha256_file(str(path)) == hashlib.sha256(b"first weights").hexdigest()
    assert fingerprint.sha256_file(str(path)) == hashlib.sha256(b"first weights").hexdigest() and len(opened) == 1
    (tmp_path / "new.pt").write_bytes(b"other weights")  # same size, replaced atomically (a new inode)
    os.replace(tmp_path / "new.pt", path)
    assert fingerprint.sha256_file(str(path)) == hashlib.sha256(b"other weights").hexdigest() and len(opened) == 2
