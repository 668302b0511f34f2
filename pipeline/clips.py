"""Clip sampling and augmentation: which frames make a clip, how it is cut, and how it is coloured.

A clip is `clip_len` frames `stride` apart (its span is (clip_len - 1) * stride + 1 stored frames),
cut by one crop box and resized to `crop` x `crop`; the same box, flip and resize apply to the flow,
whose vectors are rescaled (and x negated on a flip) so they stay in output-pixel units. Teacher
outputs of every teacher frame inside the clip's span come along, padded to a fixed length with a
mask. All geometry is done on whole tensors, never per frame.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def clip_span(clip_len, stride):
    """Stored frames covered by a clip, first to last."""
    return (clip_len - 1) * stride + 1


def clip_frame_indices(n_frames, start, clip_len, stride):
    """Frame indices of a clip; a video shorter than the span repeats its last frame (padding rule)."""
    return np.minimum(start + np.arange(clip_len) * stride, n_frames - 1)


def random_start(n_frames, span, rng, other=None, gap_frames=None):
    """A random first frame of a clip; with `other`, one whose start is gap_frames=(lo, hi) away from
    it (a positive pair), or any start if the video is too short for that gap."""
    last = max(0, n_frames - span)
    if other is None:
        return int(rng.integers(0, last + 1))
    starts = np.arange(last + 1)
    ok = starts[(np.abs(starts - other) >= gap_frames[0]) & (np.abs(starts - other) <= gap_frames[1])]
    return int(rng.choice(ok)) if len(ok) else int(rng.integers(0, last + 1))


def view_starts(n_frames, clips, span):
    """First frames of `clips` evaluation views, uniformly spaced over the video."""
    return np.linspace(0, max(0, n_frames - span), clips).round().astype(int)


def random_box(h, w, rng, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), region=None):
    """A RandomResizedCrop box (top, left, bh, bw) inside an h x w frame, or inside region (top, left,
    rh, rw) of it, with scale a share of the region's area."""
    top0, left0, h, w = region or (0, 0, h, w)
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        bw, bh = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < bw <= w and 0 < bh <= h:
            return top0 + int(rng.integers(0, h - bh + 1)), left0 + int(rng.integers(0, w - bw + 1)), bh, bw
    side = min(h, w)
    return top0 + (h - side) // 2, left0 + (w - side) // 2, side, side


def teacher_square(h, w):
    """The part of a stored h x w frame the teacher saw: its central square (stage one cuts the
    teacher's input from the centre of the same decode the stored frame is scaled from)."""
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def view_boxes(h, w, crops):
    """Square evaluation boxes: the centre, or left/centre/right (top/centre/bottom for portrait)."""
    side = min(h, w)
    if crops == 1:
        return [((h - side) // 2, (w - side) // 2, side, side)]
    if crops != 3:
        raise ValueError("--crops must be 1 or 3")
    if w >= h:
        return [(0, left, side, side) for left in (0, (w - side) // 2, w - side)]
    return [(top, 0, side, side) for top in (0, (h - side) // 2, h - side)]


def load_clip(reader, video_id, start, clip_len, stride, box, flip, crop, with_flow):
    """Read and transform one clip. Returns video uint8 [3,T,S,S] and flow float16 [2,T,S,S] or None."""
    n = reader.num_frames(video_id)
    idx = clip_frame_indices(n, start, clip_len, stride)
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    data = reader.read(video_id, lo, hi, fields=("frames", "flow") if with_flow else ("frames",))
    top, left, bh, bw = box
    frames = torch.from_numpy(data["frames"][idx - lo, top:top + bh, left:left + bw])  # [T,bh,bw,3]
    video = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(crop, crop), mode="bilinear",
                          antialias=True, align_corners=False)  # [T,3,S,S]
    if flip:
        video = video.flip(-1)
    video = video.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()  # [3,T,S,S]
    flow = None
    if with_flow:
        f = torch.from_numpy(data["flow"][idx - lo, top:top + bh, left:left + bw]).permute(0, 3, 1, 2)  # [T,2,bh,bw]
        f = F.interpolate(f, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
        f = f * torch.tensor([crop / bw, crop / bh]).view(1, 2, 1, 1)  # vectors into output pixels
        if flip:
            f = f.flip(-1) * torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
        flow = f.permute(1, 0, 2, 3).to(torch.float16).contiguous()  # [2,T,S,S]
    return video, flow


class ClipDataset(torch.utils.data.Dataset):
    """Random augmented clips of cached videos: one per video per epoch, or two (a positive pair
    0.5-10 s apart) for the contrastive objectives. Serves distillation and fine-tuning alike.

    Items are keyed (epoch, index) and drawn from a generator seeded by (seed, epoch, index), so the
    same clips come out whatever the worker count, and after a resume.
    """

    def __init__(self, reader, clip_len=8, stride=2, crop=112, with_flow=False, teacher_fields=("logits", "embed"),
                 two_views=False, gap_seconds=(0.5, 10.0), min_frames=1, seed=0, crop_scale=0.25, ids=None,
                 first_view_in_teacher_square=False):
        self.reader = reader  # only the index: Zarr opens lazily in each worker
        self.cfg = dict(clip_len=clip_len, stride=stride, crop=crop, with_flow=with_flow, crop_scale=crop_scale,
                        teacher_fields=tuple(teacher_fields), two_views=two_views)
        # the view distilled from the teacher is cut inside what the teacher saw, so its target
        # never describes an object the clip does not show
        self.first_region = teacher_square(*reader.frame_size) if first_view_in_teacher_square else None
        fps = reader.fingerprint["preprocessing"]["fps"]
        self.gap_frames = tuple(int(round(g * fps)) for g in gap_seconds)
        self.span = clip_span(clip_len, stride)
        candidates = reader.ids if ids is None else ids
        self.ids = [v for v in candidates if reader.num_frames(v) >= min_frames]
        self.skipped = len(candidates) - len(self.ids)
        self.max_teacher = self.span  # every frame in the span at most
        self.seed = seed

    def __len__(self):
        return len(self.ids)

    def shorter_than_a_clip(self):
        """How many videos are shorter than a clip's span (their clips repeat the last frame)."""
        return sum(self.reader.num_frames(v) < self.span for v in self.ids)

    def __getitem__(self, key):
        """key: an item index, or (epoch, index) so each epoch draws new clips. Item i is a clip of
        video i % len(self): a sampler may ask for several clips of each video in one epoch."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        c = self.cfg
        rng = np.random.default_rng([self.seed, epoch, i])
        i %= len(self.ids)
        vid = self.ids[i]
        n = self.reader.num_frames(vid)
        h, w = self.reader.frame_size
        starts = [random_start(n, self.span, rng)]
        if c["two_views"]:
            starts.append(random_start(n, self.span, rng, other=starts[0], gap_frames=self.gap_frames))
        out = {"index": i}
        for k, start in enumerate(starts):
            suffix = "" if k == 0 else "2"
            region = self.first_region if k == 0 else None
            box, flip = random_box(h, w, rng, scale=(c["crop_scale"], 1.0), region=region), bool(rng.random() < 0.5)
            video, flow = load_clip(self.reader, vid, start, c["clip_len"], c["stride"], box, flip, c["crop"],
                                    c["with_flow"])
            out["video" + suffix] = video
            if flow is not None:
                out["flow" + suffix] = flow
        if c["teacher_fields"]:
            out.update(self.teacher_window(vid, starts[0], n, c["teacher_fields"]))
        return out

    def teacher_window(self, vid, start, n, fields=("logits", "embed")):
        """Teacher logits (and embeddings, when asked: most objectives never read them) of the teacher
        frames inside [start, start+span), padded + mask.

        With a sparse teacher (extract --teacher-every larger than the clip span) a window can hold no
        teacher frame; it then takes the teacher frame nearest to its centre, so every clip has a target.
        """
        stop = min(start + self.span, n)
        t = self.reader.read(vid, start, stop, fields=fields)
        if len(t["teacher_frame"]) == 0:
            t = self.reader.read(vid, fields=fields)
            j = int(np.argmin(np.abs(t["teacher_frame"] - (start + stop - 1) / 2)))
            t = {k: v[j:j + 1] for k, v in t.items()}
        m = len(t["teacher_frame"])
        out = {"teacher_mask": torch.zeros(self.max_teacher, dtype=torch.bool)}
        out["teacher_mask"][:m] = True
        for name in fields:
            rows = torch.zeros(self.max_teacher, t[name].shape[1], dtype=torch.float16)
            rows[:m] = torch.from_numpy(t[name])
            out[f"teacher_{name}"] = rows
        return out


# ---- colour augmentations, batched on the training device inside the step ----------------------

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _gray(x):  # [B,3,T,H,W] -> [B,1,T,H,W]
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue_rotation(turns):
    """[B,3,3] RGB matrices shifting hue by `turns` of the colour wheel: a rotation of the chroma plane
    in YIQ space (a linear stand-in for HSV's hue shift, so it composes with the other colour ops)."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=turns.device)
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    rot = torch.zeros(len(turns), 3, 3, device=turns.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur of every frame, one sigma [B] per clip."""
    b, c, t, h, w = x.shape
    r = int(math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, 2r+1]
    y = x.permute(2, 0, 1, 3, 4).reshape(t, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(t, b, c, h, w).permute(1, 2, 0, 3, 4)


def colour_augment(video, jitter=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0)):
    """MaCLR's colour augmentations on a batch of clips: colour jitter (brightness, contrast and
    saturation factors in [1-jitter, 1+jitter], then a hue shift in [-hue, hue]) with probability
    jitter_p, grayscale with grayscale_p, Gaussian blur (sigma in blur_sigma, pixels) with blur_p.
    One draw per clip, identical for all its frames (a per-frame draw would flicker, which flow would
    call motion). Jitter and grayscale are linear in RGB, so each clip's are composed into one affine
    colour map applied in a single pass and clamped once (torchvision clamps after every op; the two
    differ only where a channel saturates midway). Randomness from torch's generator on the clips'
    device, so a resumed run draws the same.

    video [B,3,T,H,W] uint8 or float on 0..255 -> float [B,3,T,H,W] on 0..255.
    """
    x = video.float() / 255
    n, dev = len(x), x.device
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    gray = torch.tensor(_GRAY, device=dev)
    to_gray = torch.ones(3, 1, device=dev) * gray[None]  # [3,3]: every channel becomes the luma

    def factor(lo, hi):
        return torch.empty(n, 1, 1, device=dev).uniform_(lo, hi)
    b, c, s = factor(1 - jitter, 1 + jitter), factor(1 - jitter, 1 + jitter), factor(1 - jitter, 1 + jitter)
    clip_luma = x.mean(dim=(2, 3, 4)) @ gray  # [B]: contrast pulls towards the clip's mean grey
    # y = c * b * x + (1 - c) * b * luma, then saturation s (towards each pixel's grey), then hue
    mix = _hue_rotation(torch.empty(n, device=dev).uniform_(-hue, hue)) @ (s * eye + (1 - s) * to_gray)  # [B,3,3]
    matrix, offset = mix * (c * b), mix.sum(2, keepdim=True) * ((1 - c) * b * clip_luma.view(n, 1, 1))  # [B,3,1]
    on = torch.rand(n, device=dev) < jitter_p
    matrix, offset = torch.where(on.view(n, 1, 1), matrix, eye), torch.where(on.view(n, 1, 1), offset, 0.0)
    grayscale = (torch.rand(n, device=dev) < grayscale_p).view(n, 1, 1)
    matrix, offset = torch.where(grayscale, to_gray @ matrix, matrix), torch.where(grayscale, to_gray @ offset, offset)
    x = (torch.einsum("bij,bjthw->bithw", matrix, x) + offset.view(n, 3, 1, 1, 1)).clamp(0, 1)
    sigma, blur = torch.empty(n, device=dev).uniform_(*blur_sigma), torch.rand(n, device=dev) < blur_p
    if blur.any():  # blur only the clips drawn for it: the costliest of these steps
        x = x.clone()
        x[blur] = _gaussian_blur(x[blur], sigma[blur])
    return x * 255
