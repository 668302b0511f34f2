"""Clip sampling and augmentation: which frames make a clip, how it is cut, and how it is coloured.

A clip is `clip_len` frames `stride` apart (its span is (clip_len - 1) * stride + 1 stored frames),
cut by one crop box and resized to `crop` x `crop`; the same box, flip and resize apply to the flow,
whose vectors are rescaled (and x negated on a flip) so they stay in output-pixel units. Teacher
outputs of every teacher frame inside the clip's span come along, padded to a fixed length with a
mask. All geometry is done on whole tensors, never per frame.
"""

import math

import cv2
import numpy as np
import torch

from cache.flow_codec import dequantize_flow


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


def teacher_square(h, w, crop=1.0):
    """The part of a stored h x w frame the teacher saw: the centre `crop` of its central square (stage
    one cuts the teacher's input from the centre of the same decode the stored frame is scaled from)."""
    side = int(round(min(h, w) * crop))
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
    """Read and transform one clip. Returns video uint8 [3,T,S,S] and flow float16 [2,T,S,S] or None.

    Resized frame by frame with OpenCV on the stored uint8 pixels (area averaging when shrinking, which
    antialiases; bilinear when enlarging): a few times faster than converting to float for torch's
    resize, and the loader is what a CPU step waits for."""
    idx = clip_frame_indices(reader.num_frames(video_id), start, clip_len, stride)
    data = reader.frames_at(video_id, idx, with_flow)
    top, left, bh, bw = box
    interpolation = cv2.INTER_AREA if bh * bw > crop * crop else cv2.INTER_LINEAR
    pixels = data["frames"][:, top:top + bh, left:left + bw]  # [T,bh,bw,3]
    frames = np.stack([cv2.resize(f, (crop, crop), interpolation=interpolation) for f in pixels])  # [T,S,S,3]
    if flip:
        frames = frames[:, :, ::-1]
    video = torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))  # [3,T,S,S]
    flow = None
    if with_flow:
        codes = data["flow_codes"][:, top:top + bh, left:left + bw]  # [T,bh,bw,2] uint8
        # resized as codes (uint8 is what OpenCV resizes fastest): rounding the average code costs at
        # most half a quantisation step (0.08 px at the default bound)
        codes = np.stack([cv2.resize(c, (crop, crop), interpolation=interpolation) for c in codes])  # [T,S,S,2]
        f = dequantize_flow(codes, reader.flow_bound) * np.array([crop / bw, crop / bh], np.float32)  # output px
        if flip:
            f = f[:, :, ::-1] * np.array([-1.0, 1.0], np.float32)
        flow = torch.from_numpy(np.ascontiguousarray(f.transpose(3, 0, 1, 2), dtype=np.float16))  # [2,T,S,S]
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
        crop = reader.fingerprint["preprocessing"].get("teacher_crop", 1.0)  # caches before it: the whole square
        self.first_region = teacher_square(*reader.frame_size, crop) if first_view_in_teacher_square else None
        fps = reader.fingerprint["preprocessing"]["fps"]
        self.gap_frames = tuple(int(round(g * fps)) for g in gap_seconds)
        self.span = clip_span(clip_len, stride)
        # index rows, not id strings: a worker holds no Python object per video (cache/index.py)
        candidates = reader.rows if ids is None else np.array([reader.row(v) for v in ids], np.int64)
        self.rows = candidates[reader.index["frame_count"][candidates] >= min_frames]
        self.skipped = len(candidates) - len(self.rows)
        self.max_teacher = self.span  # every frame in the span at most
        self.seed = seed

    def __len__(self):
        return len(self.rows)

    @property
    def ids(self):
        """The videos' ids, in item order."""
        return [self.reader.index.id(r) for r in self.rows]

    def shorter_than_a_clip(self):
        """How many videos are shorter than a clip's span (their clips repeat the last frame)."""
        return int((self.reader.index["frame_count"][self.rows] < self.span).sum())

    def __getitem__(self, key):
        """key: an item index, or (epoch, index) so each epoch draws new clips. Item i is a clip of
        video i % len(self): a sampler may ask for several clips of each video in one epoch."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        c = self.cfg
        rng = np.random.default_rng([self.seed, epoch, i])
        i %= len(self.rows)
        vid = self.reader.index.id(self.rows[i])
        n = int(self.reader.index["frame_count"][self.rows[i]])
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


class ClipSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) pairs: a seeded permutation per epoch, split across ranks.

    Starting from any step makes resume exact, and one DataLoader serves the whole run, so its
    workers persist across epochs.
    """

    def __init__(self, n, seed, rank, world, batch_size, start_step):
        # n items: videos x clips per video; the dataset maps item i to video i % videos
        self.n, self.seed, self.rank, self.world, self.batch_size = n, seed, rank, world, batch_size
        self.per_rank = n // world  # drop the tail so every rank takes equal steps
        self.steps_per_epoch = self.per_rank // batch_size
        self.epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
        self.skip = step_in_epoch * batch_size

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            mine = perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            mine = mine[:self.steps_per_epoch * self.batch_size]  # whole batches: epochs align with steps
            for i in mine[skip:]:
                yield epoch, i
            epoch, skip = epoch + 1, 0


def make_loader(dataset, cfg, rank, world, batches_used, clips_per_video=1):
    """One DataLoader for the whole run, starting where the last run stopped."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size,
        sampler=ClipSampler(len(dataset) * clips_per_video, cfg.seed, rank, world, cfg.batch_size, batches_used),
        num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"), persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers else None, multiprocessing_context="spawn" if cfg.workers else None,
        # its own generator: creating the iterator would otherwise draw from the global one, which the
        # step's augmentations use, and a resumed run would draw one number more than a straight one
        generator=torch.Generator().manual_seed(cfg.seed))
