"""Read the cache: the video index over all committed parts, and clip reads by video id + frame range.

Stage two reads through `CacheReader`. Zarr groups are opened lazily and re-opened after a fork,
because a store touched before a DataLoader forks its workers can deadlock in them.
"""
import json
import os

import numpy as np
import zarr

from cache.fingerprint import CacheError, read_cache_json
from cache.flow_codec import dequantize_flow
from cache.writer import PARTS_DIR

READABLE = ("ok", "partial")  # "partial": decoded as far as the file allowed, with a warning


def committed_parts(cache_dir):
    parts = os.path.join(cache_dir, PARTS_DIR)
    if not os.path.isdir(parts):
        return []
    return sorted(n for n in os.listdir(parts) if n.startswith("part-") and n.endswith(".zarr"))


def read_part_attrs(cache_dir, part):
    """A committed part's attributes (video table, config, fingerprint hash) from its zarr.json."""
    path = os.path.join(cache_dir, PARTS_DIR, part, "zarr.json")
    try:
        with open(path) as f:
            attrs = json.load(f)["attributes"]
        attrs["videos"]
    except (OSError, ValueError, KeyError) as e:
        raise CacheError(f"{path}: unreadable part metadata ({e}); run `cli.py cache verify`") from None
    return attrs


def read_part_table(cache_dir, part):
    return read_part_attrs(cache_dir, part)["videos"]


def load_index(cache_dir):
    """id -> (part, record) over all parts.

    A readable record wins over a failed one whichever part holds it (`extract --retry-failed` adds a
    new record and leaves the old failure in its part); of two readable records the first part's is
    kept and the other is returned in duplicates, as (id, part) - that is damage, never normal.
    """
    index, duplicates = {}, []
    for part in committed_parts(cache_dir):
        for rec in read_part_table(cache_dir, part):
            have = index.get(rec["id"])
            if have is None or (have[1]["status"] not in READABLE and rec["status"] in READABLE):
                index[rec["id"]] = (part, rec)
            elif have[1]["status"] in READABLE and rec["status"] in READABLE:
                duplicates.append((rec["id"], part))
    return index, duplicates


class CacheReader:
    """Random access to frames, flow, teacher logits and embeddings of cached videos."""

    def __init__(self, cache_dir):
        self.cache_dir = cache_dir
        self.meta = read_cache_json(cache_dir)
        self.fingerprint = self.meta["fingerprint"]
        self.flow_bound = self.fingerprint["flow"]["bound"]
        self.index, _ = load_index(cache_dir)
        self.ids = sorted(i for i, (_, r) in self.index.items() if r["status"] in READABLE and r["frame_count"] > 0)
        self._groups, self._pid = {}, None

    def __len__(self):
        return len(self.ids)

    @property
    def frame_size(self):
        """(height, width) of every stored frame."""
        pre = self.fingerprint["preprocessing"]
        return pre["height"], pre["width"]

    def record(self, video_id):
        try:
            return self.index[video_id][1]
        except KeyError:
            raise KeyError(f"video {video_id!r} is not in cache {self.cache_dir}") from None

    def num_frames(self, video_id):
        return self.record(video_id)["frame_count"]

    def _group(self, part):
        if self._pid != os.getpid():  # first use, or we are a freshly forked worker
            self._groups, self._pid = {}, os.getpid()
        if part not in self._groups:
            self._groups[part] = zarr.open_group(os.path.join(self.cache_dir, PARTS_DIR, part), mode="r")
        return self._groups[part]

    def read(self, video_id, start=0, stop=None, fields=("frames", "flow", "logits", "embed")):
        """Frames [start, stop) of a video.

        Returns a dict with any of: frames uint8 [T,H,W,3]; flow float32 [T,H,W,2] px/frame;
        teacher_frame int [M] (video-relative indices of the frames the teacher saw, within the
        range); logits float16 [M,K]; embed float16 [M,D].
        """
        rec = self.record(video_id)
        if rec["status"] not in READABLE:
            raise KeyError(f"video {video_id!r} failed to extract ({rec['error']}); it has no frames")
        part, n = self.index[video_id][0], rec["frame_count"]
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise IndexError(f"frames [{start}, {stop}) out of range for {video_id!r} ({n} frames)")
        try:
            return self._read(self._group(part), rec, start, stop, fields)
        except CacheError:
            raise
        except Exception as e:  # a truncated or corrupt chunk: name it, never a codec traceback
            raise CacheError(f"{self.cache_dir}/{PARTS_DIR}/{part}: unreadable data for video {video_id!r} "
                             f"({type(e).__name__}: {str(e)[:120]}); run `cli.py cache verify --repair`") from None

    def _read(self, g, rec, start, stop, fields):
        off = rec["frame_offset"]
        out = {}
        if "frames" in fields:
            out["frames"] = g["frames"][off + start:off + stop]
        if "flow" in fields:
            if "flow" not in g:
                raise CacheError(f"{self.cache_dir} was extracted with --flow none; it has no flow")
            out["flow"] = dequantize_flow(g["flow"][off + start:off + stop], self.flow_bound)
        if "logits" in fields or "embed" in fields:
            if "logits" not in g:
                raise CacheError(f"{self.cache_dir} was extracted with --teacher none; it has no teacher outputs")
            t0, tn = rec["teacher_offset"], rec["teacher_count"]
            teacher_frame = g["teacher_frame"][t0:t0 + tn]
            lo, hi = np.searchsorted(teacher_frame, [start, stop])  # teacher frames are sorted
            out["teacher_frame"] = teacher_frame[lo:hi]
            for name in ("logits", "embed"):
                if name in fields:
                    out[name] = g[name][t0 + lo:t0 + hi]
        return out
