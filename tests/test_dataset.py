"""Clip sampling geometry: frames and flow cut by the same box, flow vectors follow resize and flip."""
import numpy as np
import pytest
import torch

from cache.dataset import ClipDataset, load_clip
from cache.fingerprint import VIDISTILL_VERSION, create_or_check
from cache.reader import CacheReader
from cache.writer import PartWriter
from pipeline.flow import quantize_flow

H, W, K, D = 32, 48, 5, 4


def hand_made_cache(path, lengths=(20, 3), teacher_every=2):
    """A cache written through the real writer with known content: frame t has value t in red,
    column index in green; flow is (column / 4, -2) px/frame; teacher logits say 'frame t'."""
    fp = {"teacher": {"name": "hand", "num_classes": K, "embed_dim": D},
          "preprocessing": {"fps": 8.0, "height": H, "width": W, "teacher_every": teacher_every},
          "flow": {"method": "dis", "params": {}, "bound": 20.0}, "vidistill_version": VIDISTILL_VERSION}
    create_or_check(str(path), fp, {})
    w = PartWriter(str(path), "test", H, W, True, K, D)
    for v, n in enumerate(lengths):
        start = w.begin_video()
        frames = np.zeros((n, H, W, 3), np.uint8)
        frames[..., 0] = np.arange(n)[:, None, None]
        frames[..., 1] = np.arange(W)[None, None, :]
        flow = np.zeros((n, H, W, 2), np.float32)
        flow[..., 0], flow[..., 1] = np.arange(W)[None, None, :] / 4, -2.0
        pick = np.arange(0, n, teacher_every)
        w.append("frames", frames)
        w.append("flow", quantize_flow(flow))
        w.append("teacher_frame", pick.astype(np.int32))
        w.append("logits", np.eye(K, dtype=np.float16)[pick % K] * 10)
        w.append("embed", np.ones((len(pick), D), np.float16) * pick[:, None])
        w.add_record({"id": f"v{v}", "status": "ok", "error": None, "frame_offset": start["frames"], "frame_count": n,
                      "teacher_offset": start["logits"], "teacher_count": len(pick)})
    w.commit({})
    return str(path)


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
    from cache.reader import load_index
    cache = hand_made_cache(tmp_path / "c")  # part "part-test-…" with v0, v1 ok
    for tag, status in (("b-old", "failed"), ("a-new", "ok")):
        w = PartWriter(cache, tag, H, W, True, K, D)
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
        w.commit({})
    index, duplicates = load_index(cache)
    assert index["retried"][1]["status"] == "ok" and duplicates == []
    assert CacheReader(cache).read("retried")["frames"].shape == (2, H, W, 3)


def test_reading_a_failed_or_unknown_video_says_why(tmp_path):
    cache = hand_made_cache(tmp_path / "c")
    w = PartWriter(cache, "x", H, W, True, K, D)
    w.begin_video()
    w.add_record({"id": "broken.mp4", "status": "failed", "error": "empty file (0 bytes)", "frame_offset": 0,
                  "frame_count": 0, "teacher_offset": 0, "teacher_count": 0})
    w.commit({})
    r = CacheReader(cache)
    with pytest.raises(KeyError, match=r"'broken.mp4' failed to extract \(empty file \(0 bytes\)\)"):
        r.read("broken.mp4")
    with pytest.raises(KeyError, match="'nope.mp4' is not in cache"):
        r.read("nope.mp4")


def test_same_box_for_frames_and_flow_and_flip_negates_x(tmp_path):
    r = CacheReader(hand_made_cache(tmp_path / "c"))
    box = (4, 8, 16, 24)  # top, left, height, width
    video, flow = load_clip(r, "v0", 2, clip_len=4, stride=3, box=box, flip=False, crop=12, with_flow=True)
    assert video.shape == (3, 4, 12, 12) and video.dtype == torch.uint8
    assert list(video[0, :, 0, 0]) == [2, 5, 8, 11]  # frames start, start+stride, ...
    # green = column index: the crop covers columns 8..31, resized from 24 to 12 px wide
    assert 8 <= int(video[1, 0, 6, 0]) <= 10 and 29 <= int(video[1, 0, 6, -1]) <= 31
    # flow comes from the same box (x flow = column / 4 px/frame, so it also says which columns) and its
    # vectors scale with the resize: x by 12/24, y by 12/16
    expected_x = (video[1].float() / 4 * 12 / 24)  # from the green channel = column index, same pixels
    assert torch.allclose(flow[0].float(), expected_x, atol=0.15)
    assert float(flow[0, 0, 6, 0]) < 1.4 and float(flow[0, 0, 6, -1]) > 3.5  # columns 8.. -> 31
    assert torch.allclose(flow[1].float(), torch.tensor(-1.5), atol=0.1)
    fvideo, fflow = load_clip(r, "v0", 2, clip_len=4, stride=3, box=box, flip=True, crop=12, with_flow=True)
    assert torch.equal(fvideo, video.flip(-1))
    # flipped: the field is mirrored and its x component negated (motion goes the other way)
    assert torch.allclose(fflow[0].float(), -flow[0].float().flip(-1), atol=0.02)
    assert torch.allclose(fflow[1].float(), torch.tensor(-1.5), atol=0.1)


def test_a_window_without_teacher_frames_takes_the_nearest_one(tmp_path):
    # teacher on every 8th frame (0, 8, 16), clips span 3 frames: most windows hold no teacher frame
    ds = ClipDataset(hand_made_cache(tmp_path / "c", teacher_every=8), clip_len=3, stride=1, crop=8)
    for epoch in range(6):
        item = ds[(epoch, 0)]
        start = int(item["video"][0, 0, 0, 0])
        seen = item["teacher_embed"][item["teacher_mask"], 0].int().tolist()
        assert len(seen) == 1 and abs(seen[0] - (start + 1)) == min(abs(t - (start + 1)) for t in (0, 8, 16))


def test_short_video_is_padded_by_repeating_its_last_frame(tmp_path):
    r = CacheReader(hand_made_cache(tmp_path / "c"))
    video, _ = load_clip(r, "v1", 0, clip_len=4, stride=2, box=(0, 0, H, W), flip=False, crop=8, with_flow=False)
    assert list(video[0, :, 0, 0]) == [0, 2, 2, 2]


def test_dataset_items_two_views_and_teacher_mask(tmp_path):
    ds = ClipDataset(hand_made_cache(tmp_path / "c"), clip_len=4, stride=2, crop=16, with_flow=True,
                     two_views=True, gap_seconds=(0.5, 10.0))
    item = ds[0]
    assert item["video"].shape == item["video2"].shape == (3, 4, 16, 16)
    assert item["flow"].shape == item["flow2"].shape == (2, 4, 16, 16)
    assert item["teacher_logits"].shape == (7, K) and item["teacher_mask"].sum() in (3, 4)
    start = int(item["video"][0, 0, 0, 0])
    start2 = int(item["video2"][0, 0, 0, 0])
    assert abs(start - start2) >= 4  # 0.5 s at 8 fps apart
    # the teacher rows inside the window are exactly the even frames of [start, start+7)
    frames_seen = item["teacher_embed"][item["teacher_mask"], 0].int().tolist()
    assert frames_seen == [f for f in range(start, start + 7) if f % 2 == 0]
    again = ds[0]
    assert torch.equal(again["video"], item["video"])  # deterministic per (seed, epoch, index)
    other = ds[(1, 0)]  # another epoch draws another clip of the same video
    assert not torch.equal(other["video"], item["video"]) or not torch.equal(other["video2"], item["video2"])
