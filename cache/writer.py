"""Write one part: a Zarr v3 group filled by exactly one process, committed by writing its record last.

A part lives under CACHE/parts/NAME and is written in place; it exists for readers only once
CACHE/commits/NAME.json does, which the writer writes after every byte of the part (one whole-object
write: there is no rename on an object store, and a local folder takes the same path). A killed writer
leaves a part folder with no commit record; the next extract of its shard, or `cache verify --repair`
when no extract runs, deletes it and its videos are redone.

Every array is sharded (cache/shards.py): frames and flow one frame per chunk in their codec (JPEG or
zstd), the teacher's fp16 rows ~1 MB per zstd chunk, and tens of MB per object. Memory stays bounded
however long a video is, and a video that fails midway is rolled back to where it began.
"""
import datetime
import json
import re
import time
import uuid

import numpy as np
import zarr

from cache.codecs import chunk_codecs
from cache.fingerprint import teacher_array
from cache.lease import ensure_held
from cache.shards import ShardAppender, shard_chunks
from cache.storage import open_storage

PARTS_DIR = "parts"
COMMITS_DIR = "commits"  # NAME.json per committed part: the only thing that makes a part visible
FORMAT_VERSION = 4  # of the part layout (cache/fingerprint.py's CACHE_FORMAT_VERSION: the cache's)
CHUNK_BYTES = 1 << 20  # teacher rows: >= 1 MB per chunk (uncompressed), read whole by a clip's few rows
# part-s<index>of<count>[w<worker>]-<ns>-<id>.zarr: the shard job that writes it (its garbage is that job's)
SHARD_TAG = re.compile(r"^part-s(\d+)of(\d+)(?:w\d+)?-")


def _chunk_rows(row_shape, dtype):
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    return max(1, -(-CHUNK_BYTES // row_bytes))


class PartWriter:
    """One part: arrays frames/flow/teacher_frame/logits/embed plus the per-video table.

    codecs: {"frames": (codec, quality), "flow": (codec, quality)} (cache/codecs.py); more_teachers:
    (num_classes, embed_dim) of each teacher after the first, whose logits_<slot>/embed_<slot> rows
    match the first's (every teacher sees the same frames)."""

    def __init__(self, cache_dir, tag, height, width, with_flow, num_classes, embed_dim, codecs, name=None,
                 more_teachers=()):
        self.storage = open_storage(cache_dir)
        # name: a part converted by `cache upgrade` keeps its name (it orders the parts' records)
        self.name = name or f"part-{tag}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.zarr"
        self.folder = f"{PARTS_DIR}/{self.name}"
        # Zarr makes the metadata documents (zarr.json of the group and of each array) in memory; they
        # reach the store through Storage, like every other byte, with its retries
        self.metadata = {}
        self.group = zarr.open_group(zarr.storage.MemoryStore(self.metadata), mode="w", zarr_format=3)
        specs = {"frames": ((height, width, 3), "uint8", codecs["frames"], 1)}
        if with_flow:
            specs["flow"] = ((height, width, 2), "uint8", codecs["flow"], 1)
        if num_classes:  # None: a frames-only cache (--teacher none, e.g. for evaluation data)
            specs["teacher_frame"] = ((), "int32", LOSSLESS, None)
            specs.update(teacher_specs([(num_classes, embed_dim), *more_teachers]))
        self.arrays = create_arrays(self.group, self.storage, self.folder, specs)
        self.videos = []
        self._video_start = None
        self._write_metadata()  # the part in flight is visible (as uncommitted) from its first moment

    def _write_metadata(self):
        for key, value in self.metadata.items():
            self.storage.write(f"{self.folder}/{key}", value.to_bytes())

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
        """Write the last shards and the video table, then the commit record. Returns bytes stored."""
        for a in self.arrays.values():
            a.close()
        self.group.attrs.update({**attrs, "videos": self.videos, "complete": True, "format_version": FORMAT_VERSION})
        self._write_metadata()
        stored = sum(a.stored_bytes for a in self.arrays.values())
        ensure_held()  # a job whose shard lease was lost commits nothing: another job may own the shard now
        write_commit_record(self.storage, self.name, {
            "video_count": len(self.videos), "rows": {k: len(a) for k, a in self.arrays.items()},
            "fingerprint_sha256": attrs.get("fingerprint_sha256"), "bytes": stored})
        return stored

    def abandon(self):
        self.storage.remove(self.folder, recursive=True)


LOSSLESS = ("zstd", 0)  # teacher outputs stay as the teacher gave them (fp16)


def teacher_specs(teachers, first_slot=0):
    """{array: (row shape, dtype, (codec, quality), chunk rows)} of teachers [(num_classes, embed_dim)]."""
    specs = {}
    for slot, (num_classes, embed_dim) in enumerate(teachers, first_slot):
        specs[teacher_array("logits", slot)] = ((num_classes,), "float16", LOSSLESS, None)
        specs[teacher_array("embed", slot)] = ((embed_dim,), "float16", LOSSLESS, None)
    return specs


def create_arrays(group, storage, folder, specs):
    """{name: ShardAppender} of new empty sharded arrays in `group` (their data goes to folder/name)."""
    arrays = {}
    for name, (row, dtype, (codec, quality), chunk_rows) in specs.items():
        chunk_rows = chunk_rows or _chunk_rows(row, dtype)
        serializer, compressors = chunk_codecs(codec, quality, dtype)
        shard_rows = chunk_rows * shard_chunks(chunk_rows, int(np.prod(row)) * np.dtype(dtype).itemsize)
        arr = group.create_array(name, shape=(0,) + row, chunks=(chunk_rows,) + row,
                                 shards=(shard_rows,) + row, dtype=dtype, serializer=serializer,
                                 compressors=compressors, fill_value=0)
        arrays[name] = ShardAppender(arr, storage, f"{folder}/{name}", codec, quality)
    return arrays


def write_commit_record(storage, part, fields):
    """Make a part visible: its record, written after everything else of the part (the commit point)."""
    record = {"part": part, "format_version": FORMAT_VERSION, **fields,
              "committed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    storage.write(f"{COMMITS_DIR}/{part}.json", json.dumps(record).encode())


def part_shard(part):
    """(index, count) of the shard job that wrote a part, from its name; None when the name does not say."""
    m = SHARD_TAG.match(part)
    return (int(m.group(1)), int(m.group(2))) if m else None


def uncommitted_parts(cache_dir):
    """Part folders without a commit record: being written, or left by a killed writer."""
    storage = open_storage(cache_dir)
    committed = {n[:-len(".json")] for n in storage.list(COMMITS_DIR) if n.endswith(".json")}
    return [n for n in storage.list(PARTS_DIR) if n not in committed]


def remove_uncommitted_parts(cache_dir, free_shards):
    """Delete the uncommitted parts whose shard job is gone: free_shards() -> is_free((index, count) or
    None) says so (the caller holds that shard's lock, or no live job holds it). It is asked after the
    listing, so a job that starts meanwhile holds its lock before its first part is listed. Returns how
    many parts."""
    storage = open_storage(cache_dir)
    removed = 0
    parts = uncommitted_parts(cache_dir)
    is_free = free_shards() if parts else None
    for part in parts:
        if is_free(part_shard(part)):
            storage.remove(PARTS_DIR, part, recursive=True)
            removed += 1
    return removed
