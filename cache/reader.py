"""Read the cache: the video index over all committed parts, and clip reads by video id + frame range.

Stage two reads through `CacheReader`. Zarr groups are opened lazily and re-opened after a fork,
because a store touched before a DataLoader forks its workers can deadlock in them.
"""
import collections
import json
import os

import numpy as np
import zarr

from cache.fingerprint import CacheError, read_cache_json
from cache.flow_codec import dequantize_flow
from cache.writer import PARTS_DIR

READABLE = ("ok", "partial")  # "partial": decoded as far as the file allowed, with a warning
# Decompressed frame and flow chunks kept per process: a cache that fits (the demo's pool, ~190 MB) is
# decompressed once, not at every epoch; on a large cache the least recently used chunks make room.
CHUNK_CACHE_MB = 512


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


def part_time(part):
    """When a part was started (ns since the epoch), from its name part-<tag>-<ns>-<id>.zarr; 0 if the
    name does not say. Parts are read in this order, so of two records for one video the later wins."""
    try:
        return int(part[:-len(".zarr")].rsplit("-", 2)[1])
    except (ValueError, IndexError):
        return 0


def same_source(a, b):
    """Whether two records of one id describe the same source file (size and mtime; unknown = same)."""
    return (a.get("size"), a.get("mtime")) == (b.get("size"), b.get("mtime"))


def load_index(cache_dir):
    """id -> (part, record) over all parts, read in the order the parts were written.

    A later record of another source file (size or mtime differ: the video was replaced and
    re-extracted) supersedes the earlier one. Of two records of the same source, a readable one wins
    over a failed one whichever part holds it (`extract --retry-failed` adds a new record and leaves
    the old failure in its part); two readable records of the same source are damage, never normal:
    the first is kept and the other is returned in duplicates, as (id, part).
    """
    index, duplicates = {}, []
    for part in sorted(committed_parts(cache_dir), key=lambda p: (part_time(p), p)):
        for rec in read_part_table(cache_dir, part):
            have = index.get(rec["id"])
            if have is not None and same_source(have[1], rec):
                if have[1]["status"] in READABLE and rec["status"] in READABLE:
                    duplicates.append((rec["id"], part))
                    continue
                if have[1]["status"] in READABLE:  # a failed record never hides frames of the same file
                    continue
            index[rec["id"]] = (part, rec)
    return index, duplicates


def source_status(rec, path=None):
    """"same", "changed" (size or mtime differ from the record) or "vanished" (no file there any more)
    for a record's source; `path` is where the source is now (default: where it was extracted from).
    A record without size and mtime (the file could not be read then) counts as changed once it can."""
    if not (path or rec.get("path")) or "size" not in rec:
        return "same"  # written without source details: nothing to compare
    try:
        st = os.stat(path or rec["path"])
    except OSError:
        return "same" if rec["size"] is None else "vanished"  # None: it could not be read then either
    return "same" if (rec["size"], rec["mtime"]) == (st.st_size, st.st_mtime) else "changed"


class ChunkCache:
    """Decompressed chunks within a byte budget, the least recently used dropped first."""

    def __init__(self, budget_bytes):
        self.budget, self.used, self.chunks = budget_bytes, 0, collections.OrderedDict()

    def get(self, key, load):
        chunk = self.chunks.get(key)
        if chunk is not None:
            self.chunks.move_to_end(key)
            return chunk
        chunk = load()
        if chunk.nbytes <= self.budget:
            self.chunks[key] = chunk
            self.used += chunk.nbytes
            while self.used > self.budget:
                self.used -= self.chunks.popitem(last=False)[1].nbytes
        return chunk


class CacheReader:
    """Random access to frames, flow, teacher logits and embeddings of cached videos.

    chunk_cache_mb: decompressed frame/flow chunks kept in memory, per process (0: none)."""

    def __init__(self, cache_dir, chunk_cache_mb=CHUNK_CACHE_MB):
        self.cache_dir = cache_dir
        self.chunk_cache_bytes = int(chunk_cache_mb * 2 ** 20)
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

    def _arrays(self, part):
        """{name: zarr array} of a part, opened once per process: looking an array up in its group
        costs a metadata read each time, more than reading a clip's chunk."""
        if self._pid != os.getpid():  # first use, or we are a freshly forked worker
            self._groups, self._pid = {}, os.getpid()
            self._chunks = ChunkCache(self.chunk_cache_bytes)
        if part not in self._groups:
            group = zarr.open_group(os.path.join(self.cache_dir, PARTS_DIR, part), mode="r")
            self._groups[part] = dict(group.arrays())
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
            return self._read(part, rec, start, stop, fields)
        except CacheError:
            raise
        except Exception as e:  # a truncated or corrupt chunk: name it, never a codec traceback
            raise CacheError(f"{self.cache_dir}/{PARTS_DIR}/{part}: unreadable data for video {video_id!r} "
                             f"({type(e).__name__}: {str(e)[:120]}); run `cli.py cache verify --repair`") from None

    def frames_at(self, video_id, indices, with_flow=False):
        """Frames (and flow) at these video-relative frame indices, in their order (repeats allowed):
        a clip reads its own frames, not the span between them. Returns frames uint8 [T,H,W,3] and
        flow_codes uint8 [T,H,W,2] (cache/flow_codec.py; decoded after the clip is cut and resized,
        where there are fewer pixels to decode)."""
        rec = self.record(video_id)
        if rec["status"] not in READABLE:
            raise KeyError(f"video {video_id!r} failed to extract ({rec['error']}); it has no frames")
        indices = np.asarray(indices)
        if len(indices) and not (0 <= indices.min() and indices.max() < rec["frame_count"]):
            raise IndexError(f"frames {indices.min()}..{indices.max()} out of range for {video_id!r} "
                             f"({rec['frame_count']} frames)")
        part, rows = self.index[video_id][0], rec["frame_offset"] + indices
        try:
            out = {"frames": self._take(part, "frames", rows)}
            if with_flow:
                if "flow" not in self._arrays(part):
                    raise CacheError(f"{self.cache_dir} was extracted with --flow none; it has no flow")
                out["flow_codes"] = self._take(part, "flow", rows)
            return out
        except CacheError:
            raise
        except Exception as e:  # a truncated or corrupt chunk: name it, never a codec traceback
            raise CacheError(f"{self.cache_dir}/{PARTS_DIR}/{part}: unreadable data for video {video_id!r} "
                             f"({type(e).__name__}: {str(e)[:120]}); run `cli.py cache verify --repair`") from None

    def _take(self, part, name, rows):
        """array[rows] for any row indices of a part's array, through the chunk cache."""
        array = self._arrays(part)[name]
        if not self.chunk_cache_bytes:
            return array.get_orthogonal_selection((rows,))
        per = array.chunks[0]
        chunks = {c: self._chunks.get((part, name, c), lambda c=c: array[c * per:(c + 1) * per])
                  for c in np.unique(rows // per)}
        return np.stack([chunks[r // per][r % per] for r in rows]) if len(rows) else \
            np.zeros((0,) + array.shape[1:], array.dtype)

    def _rows(self, part, name, lo, hi):
        """Rows [lo, hi) of a part's array, through the chunk cache: whole chunks are read (zarr
        decompresses whole chunks anyway) and kept; the caller gets its own copy. Every read of a clip
        goes through here: a direct Zarr read costs a round trip through its event loop (~1 ms)."""
        array = self._arrays(part)[name]
        if not self.chunk_cache_bytes:
            return array[lo:hi]
        rows = array.chunks[0]
        pieces = [self._chunks.get((part, name, c), lambda c=c: array[c * rows:(c + 1) * rows])
                  [max(lo - c * rows, 0):hi - c * rows] for c in range(lo // rows, (hi - 1) // rows + 1)]
        return np.concatenate(pieces)  # a copy even of one piece: the cached chunk stays untouched

    def _read(self, part, rec, start, stop, fields):
        g, off = self._arrays(part), rec["frame_offset"]
        out = {}
        if "frames" in fields:
            out["frames"] = self._rows(part, "frames", off + start, off + stop)
        if "flow" in fields:
            if "flow" not in g:
                raise CacheError(f"{self.cache_dir} was extracted with --flow none; it has no flow")
            out["flow"] = dequantize_flow(self._rows(part, "flow", off + start, off + stop), self.flow_bound)
        if "logits" in fields or "embed" in fields:
            if "logits" not in g:
                raise CacheError(f"{self.cache_dir} was extracted with --teacher none; it has no teacher outputs")
            t0, tn = rec["teacher_offset"], rec["teacher_count"]
            teacher_frame = self._rows(part, "teacher_frame", t0, t0 + tn) if tn else np.zeros(0, np.int32)
            lo, hi = np.searchsorted(teacher_frame, [start, stop])  # teacher frames are sorted
            out["teacher_frame"] = teacher_frame[lo:hi]
            for name in ("logits", "embed"):
                if name in fields:
                    out[name] = self._rows(part, name, t0 + lo, t0 + hi) if hi > lo else g[name][0:0]
        return out
