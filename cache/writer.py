"""Write one part: a Zarr v3 group filled by exactly one process, committed by writing its record last.

A part lives under CACHE/parts/NAME and is written in place; it exists for readers only once
CACHE/commits/NAME.json does, which the writer writes after every byte of the part (one whole-object
write: there is no rename on an object store, and a local folder takes the same path). The commit goes
through the job's fence (cache/lease.py): on an object store it is conditioned on the shard's lease
still being this job's, so a writer that lost its shard commits nothing. A killed writer leaves a part
folder with no commit record; the next extract of its shard, or `cache verify --repair` when no
extract runs, deletes it (holding the shard's lock) and its videos are redone.

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
        self.commit_tried = False  # from then on the part may be committed: never deleted by this writer
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

    def commit(self, attrs, fence):
        """Write the last shards and the video table, then the commit record through `fence` (LeaseLost
        when the shard is another job's now). Returns bytes stored."""
        for a in self.arrays.values():
            a.close()
        self.group.attrs.update({**attrs, "videos": self.videos, "complete": True, "format_version": FORMAT_VERSION})
        self._write_metadata()
        stored = sum(a.stored_bytes for a in self.arrays.values())
        # a swap whose answer was lost may have committed it: from here on the part is never deleted by
        # this writer (the shard's next holder keeps it, or deletes it once fenced)
        self.commit_tried = True
        fence.commit([commit_record(self.name, {
            "video_count": len(self.videos), "rows": {k: len(a) for k, a in self.arrays.items()},
            "fingerprint_sha256": attrs.get("fingerprint_sha256"), "bytes": stored})],
            requires=f"{self.folder}/zarr.json")
        return stored

    def abandon(self):
        if not self.commit_tried:
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


def commit_record(part, fields):
    """(name, bytes) of a part's commit record: written after everything else of the part, it makes the
    part visible (the commit point)."""
    record = {"part": part, "format_version": FORMAT_VERSION, **fields,
              "committed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return f"{COMMITS_DIR}/{part}.json", json.dumps(record).encode()


def write_commit_record(storage, part, fields):
    """Commit a part by writing its record (a caller that no other job can race: `cache upgrade`)."""
    storage.write(*commit_record(part, fields))


def part_shard(part):
    """(index, count) of the shard job that wrote a part, from its name; None when the name does not say."""
    m = SHARD_TAG.match(part)
    return (int(m.group(1)), int(m.group(2))) if m else None


def uncommitted_parts(cache_dir):
    """Part folders without a commit record: being written, or left by a killed writer."""
    storage = open_storage(cache_dir)
    committed = {n[:-len(".json")] for n in storage.list(COMMITS_DIR) if n.endswith(".json")}
    return [n for n in storage.list(PARTS_DIR) if n not in committed]


def remove_uncommitted_parts(cache_dir, shard):
    """Delete the uncommitted parts of shard (index, count), whose lock the caller holds: on an object
    store its lease, taken over, so no writer of an earlier holding can commit any more (a commit it
    won before is rolled forward and listed here as committed). Returns how many parts."""
    storage = open_storage(cache_dir)
    parts = [p for p in uncommitted_parts(cache_dir) if part_shard(p) == tuple(shard)]
    for part in parts:
        storage.remove(PARTS_DIR, part, recursive=True)
    return len(parts)
