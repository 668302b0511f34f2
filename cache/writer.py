"""Write one shard store (a "part"): a Zarr v3 group filled by exactly one process, committed atomically.

A part lives under CACHE/parts/. While it is written it is named `.tmp-*`, beside a `.tmp-*.lock`
file that its writer holds an flock on; commit renames it to `part-*.zarr` (an atomic rename on a POSIX file system), so a
reader or a rerun sees either the whole part or nothing. A killed writer leaves a `.tmp-*` directory
whose lock nobody holds; the next run on the cache deletes it and redoes its videos.

Rows are appended through a small in-memory buffer that is flushed one full chunk at a time, so memory
stays bounded however long a video is, and a video that fails midway is rolled back to where it began.
"""
import fcntl
import os
import shutil
import time
import uuid

import numpy as np
import zarr
from zarr.codecs import BloscCodec

PARTS_DIR = "parts"
TMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"  # beside the .tmp- folder, held by its writer
CHUNK_BYTES = 1 << 20  # >= 1 MB per chunk (uncompressed): few files, efficient reads


def _chunk_rows(row_shape, dtype):
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    return max(1, -(-CHUNK_BYTES // row_bytes))


class _Appender:
    """Append rows to a 1-D-growing Zarr array, writing whole chunks only."""

    def __init__(self, array):
        self.array = array
        self.rows = array.chunks[0]
        self.flushed = 0  # rows already in the store, always a multiple of self.rows
        self.pending = np.empty((0,) + array.shape[1:], array.dtype)

    def __len__(self):
        return self.flushed + len(self.pending)

    def append(self, rows):
        self.pending = np.concatenate([self.pending, np.asarray(rows, self.array.dtype)])
        if len(self.pending) >= self.rows:
            self._flush(len(self.pending) // self.rows * self.rows)

    def _flush(self, n):
        end = self.flushed + n
        self.array.resize((end,) + self.array.shape[1:])
        self.array[self.flushed:end] = self.pending[:n]
        self.flushed, self.pending = end, self.pending[n:]

    def truncate(self, length):
        """Forget rows >= length (a rolled-back video); rows in flushed chunks are read back."""
        if length >= self.flushed:
            self.pending = self.pending[:length - self.flushed]
            return
        start = length // self.rows * self.rows
        self.pending = self.array[start:length]
        self.flushed = start

    def close(self):
        if len(self.pending):
            self._flush(len(self.pending))
        self.array.resize((self.flushed,) + self.array.shape[1:])


def _compressor(dtype):
    # byte-shuffle helps multi-byte types (fp16 logits); it is a no-op cost for uint8 pixels
    shuffle = "shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle"
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)


class PartWriter:
    """One part: arrays frames/flow/teacher_frame/logits/embed plus the per-video table."""

    def __init__(self, cache_dir, tag, height, width, with_flow, num_classes, embed_dim):
        parts = os.path.join(cache_dir, PARTS_DIR)
        os.makedirs(parts, exist_ok=True)
        self.name = f"part-{tag}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.zarr"
        self.final_path = os.path.join(parts, self.name)
        self.tmp_path = os.path.join(parts, TMP_PREFIX + self.name)
        # The lock exists (and is held) before the folder does, so a folder without a held lock is
        # always debris of a killed writer.
        self._lock_path = self.tmp_path + LOCK_SUFFIX
        self._lock = open(self._lock_path, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.group = zarr.open_group(self.tmp_path, mode="w", zarr_format=3)
        specs = {"frames": ((height, width, 3), "uint8")}
        if num_classes:  # None: a frames-only cache (--teacher none, e.g. for evaluation data)
            specs.update({"teacher_frame": ((), "int32"), "logits": ((num_classes,), "float16"),
                          "embed": ((embed_dim,), "float16")})
        if with_flow:
            specs["flow"] = ((height, width, 2), "uint8")
        self.arrays = {}
        for name, (row, dtype) in specs.items():
            # write_empty_chunks: an all-zero chunk (black frames, still flow, teacher_frame [0]) is
            # stored too, so a missing chunk file always means damage (cache verify relies on it)
            arr = self.group.create_array(name, shape=(0,) + row, chunks=(_chunk_rows(row, dtype),) + row,
                                          dtype=dtype, compressors=_compressor(dtype), fill_value=0,
                                          config={"write_empty_chunks": True})
            self.arrays[name] = _Appender(arr)
        self.videos = []
        self._video_start = None

    @property
    def num_frames(self):
        return len(self.arrays["frames"])

    def begin_video(self):
        self._video_start = {k: len(a) for k, a in self.arrays.items()}
        return dict(self._video_start)

    def append(self, name, rows):
        self.arrays[name].append(rows)

    def rollback_video(self):
        for k, a in self.arrays.items():
            a.truncate(self._video_start[k])
        self._video_start = None

    def add_record(self, record):
        self.videos.append(record)
        self._video_start = None

    def commit(self, attrs):
        """Flush, write the video table, and atomically publish the part. Returns bytes on disk."""
        for a in self.arrays.values():
            a.close()
        self.group.attrs.update({**attrs, "videos": self.videos, "complete": True})
        os.rename(self.tmp_path, self.final_path)
        os.unlink(self._lock_path)
        self._lock.close()
        return directory_bytes(self.final_path)

    def abandon(self):
        shutil.rmtree(self.tmp_path, ignore_errors=True)
        os.unlink(self._lock_path)
        self._lock.close()


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def remove_stale_parts(cache_dir):
    """Delete `.tmp-*` parts (and their locks) left by killed writers. Returns how many parts."""
    parts = os.path.join(cache_dir, PARTS_DIR)
    removed = 0
    names = sorted(os.listdir(parts)) if os.path.isdir(parts) else []
    for name in names:
        if not name.startswith(TMP_PREFIX) or name.endswith(LOCK_SUFFIX):
            continue
        path = os.path.join(parts, name)
        try:
            lock = open(path + LOCK_SUFFIX, "r+")  # never creates
        except FileNotFoundError:
            lock = None  # the lock is made before the folder: no lock means its writer is gone
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a live writer holds it
            shutil.rmtree(path, ignore_errors=True)
            if lock is not None:
                os.unlink(path + LOCK_SUFFIX)
            removed += 1
        except BlockingIOError:
            pass
        finally:
            if lock is not None:
                lock.close()
    for name in names:  # locks whose writer died before making its folder
        if name.startswith(TMP_PREFIX) and name.endswith(LOCK_SUFFIX) and name[:-len(LOCK_SUFFIX)] not in names:
            try:
                with open(os.path.join(parts, name), "r+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(os.path.join(parts, name))
            except (BlockingIOError, FileNotFoundError):
                pass
    return removed
