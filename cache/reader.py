"""Read the cache: the consolidated video index (cache/index.py), and clip reads by video id + frames.

Stage two reads through `CacheReader`. A part's arrays are opened lazily and again in every process
(a DataLoader worker opens its own storage: an object store's client and the event loop it runs in
do not survive a fork). Chunks are read with one ranged request per shard (cache/shards.py).
"""
import collections
import json
import os

import numpy as np

from cache.fingerprint import CacheError, cache_teachers, fingerprint_sha256, read_cache_json, teacher_array
from cache.flow_codec import dequantize_flow
from cache.index import READABLE, STATUSES, open_index
from cache.shards import ArrayLayout, ShardReader
from cache.storage import open_storage
from cache.writer import COMMITS_DIR, PARTS_DIR

ARRAYS = ("frames", "flow", "teacher_frame", "logits", "embed")

# Decompressed frame and flow chunks kept per process: a cache that fits (the demo's pool, ~190 MB) is
# decompressed once, not at every epoch; on a large cache the least recently used chunks make room.
CHUNK_CACHE_MB = 512


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
    """Decoded chunks within a byte budget, the least recently used dropped first."""

    def __init__(self, budget_bytes):
        self.budget, self.used, self.chunks = budget_bytes, 0, collections.OrderedDict()

    def get_many(self, keys, load):
        """{key: chunk} for `keys`; load(missing keys) -> their chunks in order, one call for all."""
        missing = [k for k in keys if k not in self.chunks]
        got = {k: self.chunks[k] for k in keys if k in self.chunks}  # before any new chunk evicts one
        for k in got:
            self.chunks.move_to_end(k)
        for k, chunk in zip(missing, load(missing) if missing else ()):
            got[k] = chunk
            self._put(k, chunk)
        return got

    def _put(self, key, chunk):
        if self.budget and chunk.nbytes <= self.budget:
            self.chunks[key] = chunk
            self.used += chunk.nbytes
            while self.used > self.budget:
                self.used -= self.chunks.popitem(last=False)[1].nbytes


class CacheReader:
    """Random access to frames, flow, teacher logits and embeddings of cached videos.

    ids: the readable videos (sorted); rows: their rows in the index (cache/index.py), whose columns
    (frame counts, offsets) answer per-video questions without a Python object per video.
    chunk_cache_mb: decoded frame/flow chunks kept in memory, per process (0: none)."""

    def __init__(self, cache_dir, chunk_cache_mb=CHUNK_CACHE_MB, parts=None):
        """parts: read exactly these committed parts (DDP ranks share rank 0's listing), not the listing
        of commits/ made here."""
        self.cache_dir = cache_dir
        self.chunk_cache_bytes = int(chunk_cache_mb * 2 ** 20)
        self.meta = read_cache_json(cache_dir)
        self.fingerprint = self.meta["fingerprint"]
        self.fingerprint_sha256 = fingerprint_sha256(self.fingerprint)
        self.flow_bound = self.fingerprint["flow"]["bound"]
        self.index = open_index(cache_dir, parts=parts)
        self.rows = self.index.readable()
        self.teachers = [t["name"] for t in cache_teachers(self.fingerprint)]  # in slot order
        self.arrays = ARRAYS + tuple(teacher_array(name, slot) for slot in range(1, len(self.teachers))
                                     for name in ("logits", "embed"))
        self._groups, self._pid, self._ids = {}, None, None

    def __len__(self):
        return len(self.rows)

    def __getstate__(self):  # a worker maps the index file itself: its pages are shared, not pickled
        state = dict(self.__dict__, index=self.index.parts, _groups={}, _pid=None, _ids=None)
        state.pop("_chunks", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.index = open_index(self.cache_dir, parts=state["index"])  # the parent's rows mean the same

    @property
    def ids(self):
        """Readable video ids, sorted (a list, made on first use: small tools and eval use it)."""
        if self._ids is None:
            self._ids = [v.decode() for v in self.index.ids[self.rows]]
        return self._ids

    @property
    def frame_size(self):
        """(height, width) of every stored frame."""
        pre = self.fingerprint["preprocessing"]
        return pre["height"], pre["width"]

    def row(self, video_id):
        row = self.index.row(video_id)
        if row < 0:
            raise KeyError(f"video {video_id!r} is not in cache {self.cache_dir}")
        return row

    def record(self, video_id):
        """The video's full record (source, status, error, decode details)."""
        return self.index.record(self.row(video_id))

    def num_frames(self, video_id):
        return int(self.index["frame_count"][self.row(video_id)])

    def _readable_row(self, video_id):
        row = self.row(video_id)
        if STATUSES[self.index["status"][row]] not in READABLE:
            raise KeyError(f"video {video_id!r} failed to extract ({self.index.record(row)['error']}); "
                           "it has no frames")
        return row

    def _arrays(self, part):
        """{name: ShardReader} of a part's arrays, opened once per process (their metadata and shard
        indexes are read once, not at every clip)."""
        if self._pid != os.getpid():  # first use, or we are a freshly forked worker
            self._groups, self._pid = {}, os.getpid()
            self._chunks = ChunkCache(self.chunk_cache_bytes)
        if part not in self._groups:
            storage = open_storage(self.cache_dir)
            record = f"{COMMITS_DIR}/{part}.json"
            got = storage.read_many([record] + [f"{PARTS_DIR}/{part}/{name}/zarr.json" for name in self.arrays])
            try:  # values of other settings (another frame size, teacher, codec) must never reach a student
                written_with = json.loads(got[record])["fingerprint_sha256"] if isinstance(got[record], bytes) else None
            except (ValueError, KeyError):
                written_with = None
            if written_with != self.fingerprint_sha256:
                raise CacheError(f"{storage.url(PARTS_DIR, part)}: written with other settings than "
                                 f"{storage.url('cache.json')} records (or its commit record is unreadable); "
                                 "run `cli.py cache verify --repair`")
            self._groups[part] = {
                name: ShardReader(storage, f"{PARTS_DIR}/{part}/{name}", ArrayLayout(json.loads(data)))
                for name in self.arrays if isinstance(data := got[f"{PARTS_DIR}/{part}/{name}/zarr.json"], bytes)}
            if "frames" not in self._groups[part]:
                raise CacheError(f"{storage.url(PARTS_DIR, part)}: its frames are missing; "
                                 "run `cli.py cache verify --repair`")
        return self._groups[part]

    def _damage(self, part, video_id, e):
        return CacheError(f"{self.cache_dir}/{PARTS_DIR}/{part}: unreadable data for video {video_id!r} "
                          f"({type(e).__name__}: {str(e)[:120]}); run `cli.py cache verify --repair`")

    def read(self, video_id, start=0, stop=None, fields=("frames", "flow", "logits", "embed")):
        """Frames [start, stop) of a video.

        Returns a dict with any of: frames uint8 [T,H,W,3]; flow float32 [T,H,W,2] px/frame;
        teacher_frame int [M] (video-relative indices of the frames the teacher saw, within the
        range); logits float16 [M,K]; embed float16 [M,D]; logits_<slot>, embed_<slot>: the same of
        the cache's slot-th teacher (cache.fingerprint.teacher_array).
        """
        row = self._readable_row(video_id)
        n = int(self.index["frame_count"][row])
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise IndexError(f"frames [{start}, {stop}) out of range for {video_id!r} ({n} frames)")
        part = self.index.part(row)
        try:
            return self._read(part, row, start, stop, fields)
        except CacheError:
            raise
        except Exception as e:  # a truncated or corrupt chunk: name it, never a codec traceback
            raise self._damage(part, video_id, e) from None

    def frames_at(self, video_id, indices, with_flow=False):
        """Frames (and flow) at these video-relative frame indices, in their order (repeats allowed):
        a clip reads its own frames, not the span between them. Returns frames uint8 [T,H,W,3] and
        flow_codes uint8 [T,H,W,2] (cache/flow_codec.py; decoded after the clip is cut and resized,
        where there are fewer pixels to decode)."""
        row = self._readable_row(video_id)
        n = int(self.index["frame_count"][row])
        indices = np.asarray(indices)
        if len(indices) and not (0 <= indices.min() and indices.max() < n):
            raise IndexError(f"frames {indices.min()}..{indices.max()} out of range for {video_id!r} ({n} frames)")
        part, rows = self.index.part(row), int(self.index["frame_offset"][row]) + indices
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
            raise self._damage(part, video_id, e) from None

    def _take(self, part, name, rows):
        """array[rows] for any row indices of a part's array, through the chunk cache: the chunks not
        cached yet are read in one ranged request per shard."""
        array = self._arrays(part)[name]
        rows = np.asarray(rows)
        if not len(rows):
            return np.zeros((0,) + array.layout.shape[1:], array.layout.dtype)
        per = array.chunk_rows
        chunks = self._chunks.get_many([(part, name, int(c)) for c in np.unique(rows // per)],
                                       lambda keys: array.read([c for _, _, c in keys]))
        return np.stack([chunks[(part, name, int(r // per))][r % per] for r in rows])

    def _read(self, part, row, start, stop, fields):
        g, off = self._arrays(part), int(self.index["frame_offset"][row])
        out = {}
        if "frames" in fields:
            out["frames"] = self._take(part, "frames", np.arange(off + start, off + stop))
        if "flow" in fields:
            if "flow" not in g:
                raise CacheError(f"{self.cache_dir} was extracted with --flow none; it has no flow")
            out["flow"] = dequantize_flow(self._take(part, "flow", np.arange(off + start, off + stop)), self.flow_bound)
        teacher_fields = [name for name in fields if name.startswith(("logits", "embed"))]
        if teacher_fields:
            if "logits" not in g:
                raise CacheError(f"{self.cache_dir} was extracted with --teacher none; it has no teacher outputs")
            t0, tn = int(self.index["teacher_offset"][row]), int(self.index["teacher_count"][row])
            teacher_frame = self._take(part, "teacher_frame", np.arange(t0, t0 + tn)) if tn else np.zeros(0, np.int32)
            lo, hi = np.searchsorted(teacher_frame, [start, stop])  # teacher frames are sorted
            out["teacher_frame"] = teacher_frame[lo:hi]
            for name in teacher_fields:
                if name not in g:
                    raise CacheError(f"{self.cache_dir}/{PARTS_DIR}/{part} does not hold {name} (a teacher added with "
                                     "`extract --add-teacher` that did not finish: rerun it)")
                out[name] = self._take(part, name, np.arange(t0 + lo, t0 + hi))
        return out
