"""Which videos a cache holds and where: the committed parts' video tables, and one consolidated,
columnar index over them (CACHE/index.bin) that readers open with one read.

The parts are the truth: the committed ones are those with a record in commits/ (cache/writer.py).
index.bin records the parts it was built from; a reader whose listing of commits/ differs (a part
committed since, or quarantined) rebuilds it from the parts and replaces it whole, so a crash between
a part's commit and the index update loses nothing, and a missing or damaged index.bin is rebuilt,
never trusted. On an object store a reader keeps a local copy of index.bin (in the temp folder, named
by the cache and its parts) and maps that: its DataLoader workers map the same file.

Why a flat binary of numpy columns and not JSON, Parquet or a Zarr group: a reader maps it (mmap)
and looks ids up by binary search, so the index costs no Python objects per video. DataLoader workers
and DDP ranks share its pages through the page cache instead of each holding, and slowly copying
(copy-on-read of refcounts), a dict of 250,000 dicts; and numpy reads it without another dependency.
Full records (source path, error, decode details) are JSON inside the same file, parsed one at a time.
"""
import hashlib
import json
import mmap
import os
import tempfile
import uuid
import warnings
import zlib

import numpy as np

from cache.fingerprint import CacheError
from cache.storage import open_storage
from cache.writer import COMMITS_DIR, PARTS_DIR

INDEX_FILE = "index.bin"
MAGIC = b"VDISTIDX"
INDEX_VERSION = 2  # 2: a CRC-32 of the rest ends the file
CHECKSUM_BYTES = 4
READABLE = ("ok", "partial")  # "partial": decoded as far as the file allowed, with a warning
STATUSES = ("ok", "partial", "failed")
COLUMNS = {"part": "<i4", "frame_offset": "<i8", "frame_count": "<i8", "teacher_offset": "<i8",
           "teacher_count": "<i8", "status": "i1", "record_offset": "<i8", "record_length": "<i8"}
ALIGN = 64


def committed_parts(cache_dir):
    """Names of the parts that have a commit record, sorted."""
    return sorted(n[:-len(".json")] for n in open_storage(cache_dir).list(COMMITS_DIR) if n.endswith(".zarr.json"))


def _part_attrs(storage, part, data):
    """A part's attributes from its zarr.json bytes (or the exception reading them raised)."""
    where = storage.url(PARTS_DIR, part, "zarr.json")
    try:
        if isinstance(data, Exception):
            raise data
        attrs = json.loads(data)["attributes"]
        attrs["videos"]
    except (OSError, ValueError, KeyError) as e:
        raise CacheError(f"{where}: unreadable part metadata ({e}); run `cli.py cache verify`") from None
    return attrs


def read_part_attrs(cache_dir, part):
    """A committed part's attributes (video table, config, fingerprint hash) from its zarr.json."""
    storage = open_storage(cache_dir)
    try:
        data = storage.read(PARTS_DIR, part, "zarr.json")
    except OSError as e:
        data = e
    return _part_attrs(storage, part, data)


def read_part_tables(cache_dir, parts):
    """{part: video table} of many parts (on an object store, fetched concurrently)."""
    storage = open_storage(cache_dir)
    got = storage.read_many([f"{PARTS_DIR}/{p}/zarr.json" for p in parts])
    return {p: _part_attrs(storage, p, got[f"{PARTS_DIR}/{p}/zarr.json"])["videos"] for p in parts}


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


def load_index(cache_dir, parts=None, tables=None):
    """id -> (part, record) over all parts (or `parts`), read in the order the parts were written
    (tables: {part: video table} already read).

    A later record of another source file (size or mtime differ: the video was replaced and
    re-extracted) supersedes the earlier one. Of two records of the same source, a readable one wins
    over a failed one whichever part holds it (`extract --retry-failed` adds a new record and leaves
    the old failure in its part); two readable records of the same source are damage, never normal:
    the first is kept and the other is returned in duplicates, as (id, part).
    """
    index, duplicates = {}, []
    parts = sorted(committed_parts(cache_dir) if parts is None else parts, key=lambda p: (part_time(p), p))
    tables = dict(tables or {})
    tables.update(read_part_tables(cache_dir, [p for p in parts if p not in tables]))
    for part in parts:
        for rec in tables[part]:
            have = index.get(rec["id"])
            if have is not None and same_source(have[1], rec):
                if have[1]["status"] in READABLE and rec["status"] in READABLE:
                    duplicates.append((rec["id"], part))
                    continue
                if have[1]["status"] in READABLE:  # a failed record never hides frames of the same file
                    continue
            index[rec["id"]] = (part, rec)
    return index, duplicates


def build_index_bytes(cache_dir, parts, tables=None):
    """index.bin's content for these committed parts (tables: their video tables, if read already)."""
    index, _ = load_index(cache_dir, parts, tables)
    ids = sorted(index)
    part_number = {p: k for k, p in enumerate(parts)}
    records = [json.dumps(index[v][1], separators=(",", ":")).encode() for v in ids]
    lengths = np.array([len(r) for r in records], np.int64)
    # one JSON array, so `cache info` parses every record in one call; a record's offset points inside it
    starts = 1 + np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]) if len(ids) else np.zeros(0, np.int64)
    recs = [index[v][1] for v in ids]
    columns = {
        "id": np.array([v.encode() for v in ids], dtype=f"S{max([len(v.encode()) for v in ids] + [1])}"),
        "part": np.array([part_number[index[v][0]] for v in ids], COLUMNS["part"]),
        **{k: np.array([r[k] for r in recs], COLUMNS[k]) for k in
           ("frame_offset", "frame_count", "teacher_offset", "teacher_count")},
        "status": np.array([STATUSES.index(r["status"]) for r in recs], COLUMNS["status"]),
        "record_offset": starts.astype(COLUMNS["record_offset"]),
        "record_length": lengths.astype(COLUMNS["record_length"]),
    }
    layout, blobs, offset = {}, [], 0
    for name, col in columns.items():
        layout[name] = {"dtype": col.dtype.str, "offset": offset, "count": len(col)}
        data = col.tobytes()
        blobs.append(data + b"\0" * (-len(data) % ALIGN))
        offset += len(blobs[-1])
    blob = b"[" + b",".join(records) + b"]"
    layout["records"] = {"offset": offset, "bytes": len(blob)}
    blobs.append(blob)
    header = json.dumps({"version": INDEX_VERSION, "parts": parts, "columns": layout}).encode()
    head = MAGIC + len(header).to_bytes(8, "little") + header
    head += b"\0" * (-len(head) % ALIGN)
    data = head + b"".join(blobs)
    return data + _checksum(data)  # one changed byte anywhere: the file is rebuilt, never trusted


def _checksum(data):
    """CRC-32 (as Zarr's shard indexes have): it catches damage, and costs ~0.1 s per 100 MB at each open
    (a sha256 cost twice that here; bench/bench_commit.py)."""
    return zlib.crc32(data).to_bytes(CHECKSUM_BYTES, "little")


class VideoIndex:
    """The consolidated index, mapped read-only: columns are numpy views of the file's pages (shared by
    every process that maps it), records are parsed on demand. `ids` are sorted bytes."""

    def __init__(self, data, source):
        self.source = source
        if data[:len(MAGIC)] != MAGIC:
            raise ValueError("not an index file")
        n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
        start = len(MAGIC) + 8
        header = json.loads(bytes(data[start:start + n]))
        if header.get("version") != INDEX_VERSION:
            raise ValueError(f"index version {header.get('version')}")
        body = memoryview(data)[:max(0, len(data) - CHECKSUM_BYTES)]
        digest = _checksum(body)
        body.release()  # a mapped file can be closed again
        if digest != bytes(data[len(data) - CHECKSUM_BYTES:]):
            raise ValueError("it fails its checksum")
        base = start + n + (-(start + n) % ALIGN)
        self.parts = header["parts"]
        self.columns = {}
        for name, c in header["columns"].items():
            if name == "records":
                self.records_at, self.records_bytes = base + c["offset"], c["bytes"]
                continue
            self.columns[name] = np.frombuffer(data, dtype=c["dtype"], count=c["count"], offset=base + c["offset"])
        self.data = data
        self.ids = self.columns["id"]
        if self.records_at + self.records_bytes > len(data):
            raise ValueError("index file truncated")

    def __len__(self):
        return len(self.ids)

    def __contains__(self, video_id):
        return self.row(video_id) >= 0

    def __getitem__(self, name):
        return self.columns[name]

    def row(self, video_id):
        """The row of a video id, or -1 when the cache does not hold it."""
        key = video_id.encode() if isinstance(video_id, str) else video_id
        i = int(np.searchsorted(self.ids, key))
        return i if i < len(self.ids) and self.ids[i] == key else -1

    def id(self, row):
        return self.ids[row].decode()

    def part(self, row):
        return self.parts[self.columns["part"][row]]

    def record(self, row):
        """The full record of a row (a dict, as the part's table holds it)."""
        lo = self.records_at + int(self.columns["record_offset"][row])
        return json.loads(bytes(self.data[lo:lo + int(self.columns["record_length"][row])]))

    def records(self):
        """Every row's full record, in row order (one JSON parse: what `cache info` needs)."""
        return json.loads(bytes(self.data[self.records_at:self.records_at + self.records_bytes]))

    def readable(self):
        """Rows whose frames can be read (ok or partial, with frames)."""
        return np.flatnonzero((self.columns["status"] <= STATUSES.index("partial")) & (self.columns["frame_count"] > 0))


def _map(path):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError("empty index file")
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)


def _save_and_map(path, data):
    """Write index bytes to a local file whole (readers see the old file or the new one) and map it."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return VideoIndex(_map(path), path)
    except OSError:  # a read-only place: the index lives in this process only
        if os.path.exists(tmp):
            os.unlink(tmp)
        return VideoIndex(data, "memory")


def _local_copy(storage, parts):
    """Where a reader of a remote cache keeps its copy of index.bin: named by the cache and its parts."""
    cache_key = hashlib.sha256(storage.location.encode()).hexdigest()[:12]
    parts_key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"vidistill-index-{cache_key}-{parts_key}.bin")


def _drop_older_copies(local):
    """Delete this cache's copies of index.bin for other parts (a process still mapping one keeps its
    pages until it unmaps them)."""
    folder, name = os.path.split(local)
    prefix = name.rsplit("-", 1)[0] + "-"
    for other in os.listdir(folder):
        if other.startswith(prefix) and other.endswith(".bin") and other != name:
            try:
                os.unlink(os.path.join(folder, other))
            except OSError:
                pass


def open_index(cache_dir, parts=None, warn=True):
    """The cache's VideoIndex, rebuilt from the parts (and saved, where the cache is writable) when
    index.bin is missing, damaged or built from other parts than commits/ lists now (with a warning,
    unless warn=False: extract, which has just committed parts, brings it up to date). parts: the index
    of exactly these parts instead (a DataLoader worker must see the rows its parent chose, even if a
    part was committed since); built in memory when index.bin holds other ones."""
    storage = open_storage(cache_dir)
    pinned = parts is not None
    parts = committed_parts(cache_dir) if parts is None else list(parts)
    local = _local_copy(storage, parts) if storage.remote else storage.path(INDEX_FILE)
    try:
        index = VideoIndex(_map(local), local)
        if index.parts == parts:
            return index
        if warn and not pinned and not storage.remote:
            added, gone = len(set(parts) - set(index.parts)), len(set(index.parts) - set(parts))
            warnings.warn(f"{local} does not list the committed parts ({added} more, {gone} fewer: a run killed "
                          "before it updated the index, or an extract running now); rebuilt from the parts",
                          stacklevel=2)
    except FileNotFoundError:
        pass  # not built yet (or a remote cache's first read here): fetched or built below
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        if warn:
            warnings.warn(f"{local} is damaged ({e}); rebuilt from the parts", stacklevel=2)
    if storage.remote:
        try:
            data = storage.read(INDEX_FILE)
            if VideoIndex(data, "memory").parts == parts:
                _drop_older_copies(local)
                return _save_and_map(local, data)
            if warn and not pinned:
                warnings.warn(f"{storage.url(INDEX_FILE)} does not list the committed parts; rebuilt from the parts",
                              stacklevel=2)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass
    data = build_index_bytes(cache_dir, parts)
    if pinned:
        return VideoIndex(data, "memory")
    if storage.remote:
        try:
            storage.write(INDEX_FILE, data)
        except (OSError, CacheError):
            pass  # a read-only store: this reader keeps its own copy
        _drop_older_copies(local)
    return _save_and_map(local, data)
