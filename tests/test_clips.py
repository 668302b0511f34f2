"""Clip sampling geometry: frames and flow cut by the same box, flow vectors follow resize and flip."""
import numpy as np
import torch
from helpers import H, K, W, hand_made_cache

from cache.reader import CacheReader
from pipeline.distill.augment import colour_augment
from pipeline.distill.clips import ClipDataset, load_clip, random_box, teacher_square


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
    ds = ClipDataset(CacheReader(hand_made_cache(tmp_path / "c", teacher_every=8)), clip_len=3, stride=1, crop=8)
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
    ds = ClipDataset(CacheReader(hand_made_cache(tmp_path / "c")), clip_len=4, stride=2, crop=16, with_flow=True,
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


def test_dataset_serves_the_ids_it_is_given_and_skips_too_short_videos(tmp_path):
    r = CacheReader(hand_made_cache(tmp_path / "c"))  # v0: 20 frames, v1: 3
    ds = ClipDataset(r, clip_len=4, stride=2, crop=8, ids=["v1"])
    assert ds.ids == ["v1"] and len(ds) == 1 and ds.skipped == 0
    assert int(ds[0]["video"][0, -1, 0, 0]) == 2  # v1's last frame, repeated
    ds = ClipDataset(r, clip_len=4, stride=2, crop=8, min_frames=4)
    assert ds.ids == ["v0"] and ds.skipped == 1


def test_colour_augment_draws_one_transform_per_clip_for_all_its_frames():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (3, 1, 24, 24), dtype=torch.uint8)
    clips = frame.expand(3, 5, 24, 24)[None].repeat(6, 1, 1, 1, 1)  # 6 clips of 5 identical frames
    out = colour_augment(clips, jitter_p=1.0, grayscale_p=0.0, blur_p=1.0)
    assert out.shape == clips.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255
    assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-4)  # every frame got the same transform
    views = out.reshape(6, -1)
    assert all(not torch.allclose(views[i], views[j], atol=1.0) for i in range(6) for j in range(i))  # clips differ
    # colour statistics move: per-clip mean colours spread out although the input was one image
    assert out.mean(dim=(2, 3, 4)).std(0).mean() > 5


def test_colour_augment_off_is_the_identity_and_grayscale_equalises_channels():
    video = torch.randint(0, 256, (4, 3, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(colour_augment(video, jitter_p=0, grayscale_p=0, blur_p=0), video.float(), atol=1e-4)
    gray = colour_augment(video, jitter_p=0, grayscale_p=1.0, blur_p=0)
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-4) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-4)
    blurred = colour_augment(video, jitter_p=0, grayscale_p=0, blur_p=1.0)
    assert blurred.std() < video.float().std()  # blur removes the pixel noise


def test_the_distilled_view_is_cut_inside_the_teacher_square():
    top, left, side, _ = teacher_square(128, 171)
    assert (top, left, side) == (0, 21, 128)
    rng = np.random.default_rng(0)
    for _ in range(200):
        t, l, bh, bw = random_box(128, 171, rng, scale=(0.25, 1.0), region=teacher_square(128, 171))
        assert 0 <= t and t + bh <= 128 and 21 <= l and l + bw <= 21 + 128
    anywhere = [random_box(128, 171, rng, scale=(0.25, 1.0)) for _ in range(200)]
    assert any(l < 21 or l + bw > 149 for _, l, _, bw in anywhere)  # without the region crops reach the sides


def test_the_teacher_square_follows_the_teachers_crop(tmp_path):
    assert teacher_square(128, 171, 0.875) == (8, 29, 112, 112)  # the centre 112 of the central 128 square
    # a dataset reads the crop from the cache's fingerprint (a hand-made cache: the whole square)
    ds = ClipDataset(CacheReader(hand_made_cache(tmp_path / "c")), clip_len=2, stride=1, crop=8,
                     first_view_in_teacher_square=True)
    assert ds.first_region == teacher_square(H, W)
