"""Write one shard store (a "part"): a Zarr v3 group filled by exactly one process, committed atomically.

A part lives under CACHE/parts/. While it is written it is named `.tmp-*`, beside a `.tmp-*.lock`
file that its writer holds an flock on; commit renames it to `part-*.zarr` (an atomic rename on a POSIX file system), so a
reader or a rerun sees either the whole part or nothing. A killed writer leaves a `.tmp-*` directory
whose lock nobody holds; the next run on the cache deletes it and redoes its videos.

Every array is sharded (cache/shards.py): frames and flow one frame per chunk in their codec (JPEG or
zstd), the teacher's fp16 rows ~1 MB per zstd chunk, and tens of MB per file. Memory stays bounded
however long a video is, and a video that fails midway is rolled back to where it began.
"""
import fcntl
import os
import shutil
import time
import uuid

import numpy as np
import zarr

from cache.codecs import chunk_codecs
from cache.shards import ShardAppender, shard_chunks

PARTS_DIR = "parts"
FORMAT_VERSION = 3  # of the part layout (cache/fingerprint.py's CACHE_FORMAT_VERSION: the cache's)
TMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"  # beside the .tmp- folder, held by its writer
CHUNK_BYTES = 1 << 20  # teacher rows: >= 1 MB per chunk (uncompressed), read whole by a clip's few rows


def _chunk_rows(row_shape, dtype):
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    return max(1, -(-CHUNK_BYTES // row_bytes))


class PartWriter:
    """One part: arrays frames/flow/teacher_frame/logits/embed plus the per-video table.

    codecs: {"frames": (codec, quality), "flow": (codec, quality)} (cache/codecs.py)."""

    def __init__(self, cache_dir, tag, height, width, with_flow, num_classes, embed_dim, codecs, name=None):
        parts = os.path.join(cache_dir, PARTS_DIR)
        os.makedirs(parts, exist_ok=True)
        # name: a part converted by `cache upgrade` keeps its name (it orders the parts' records)
        self.name = name or f"part-{tag}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.zarr"
        self.final_path = os.path.join(parts, self.name)
        self.tmp_path = os.path.join(parts, TMP_PREFIX + self.name)
        # The lock exists (and is held) before the folder does, so a folder without a held lock is
        # always debris of a killed writer.
        self._lock_path = self.tmp_path + LOCK_SUFFIX
        self._lock = open(self._lock_path, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.group = zarr.open_group(self.tmp_path, mode="w", zarr_format=3)
        specs = {"frames": ((height, width, 3), "uint8", codecs["frames"], 1)}
        if with_flow:
            specs["flow"] = ((height, width, 2), "uint8", codecs["flow"], 1)
        if num_classes:  # None: a frames-only cache (--teacher none, e.g. for evaluation data)
            lossless = ("zstd", 0)  # teacher outputs stay as the teacher gave them (fp16)
            specs.update({"teacher_frame": ((), "int32", lossless, None),
                          "logits": ((num_classes,), "float16", lossless, None),
                          "embed": ((embed_dim,), "float16", lossless, None)})
        self.arrays = {}
        for name, (row, dtype, (codec, quality), chunk_rows) in specs.items():
            chunk_rows = chunk_rows or _chunk_rows(row, dtype)
            serializer, compressors = chunk_codecs(codec, quality, dtype)
            shard_rows = chunk_rows * shard_chunks(chunk_rows, int(np.prod(row)) * np.dtype(dtype).itemsize)
            arr = self.group.create_array(name, shape=(0,) + row, chunks=(chunk_rows,) + row,
                                          shards=(shard_rows,) + row, dtype=dtype, serializer=serializer,
                                          compressors=compressors, fill_value=0)
            self.arrays[name] = ShardAppender(arr, os.path.join(self.tmp_path, name), codec, quality)
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
        self.group.attrs.update({**attrs, "videos": self.videos, "complete": True, "format_version": FORMAT_VERSION})
        os.rename(self.tmp_path, self.final_path)
        os.unlink(self._lock_path)
        self._lock.close()
        return directory_bytes(self.final_path)

    def abandon(self):
        for a in self.arrays.values():
            a.abandon()
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
