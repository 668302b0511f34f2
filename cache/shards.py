"""Sharded Zarr v3 arrays of one part: appending rows with bounded memory, and reading chunks with
one ranged request per shard.

Frames and flow are chunked one frame per chunk (a clip reads only its frames), teacher rows ~1 MB per
chunk, and many chunks are one object (a shard: Zarr's sharding codec, chunks back to back, then an
index of (offset, length) pairs and its CRC32C). Zarr would write a growing shard by reading and
rewriting it at every append, and an object store cannot append at all, so the appender keeps the
open shard's encoded chunks in memory (a shard is <= SHARD_BYTES raw, a few MB encoded) and writes it
whole, index included, in the layout Zarr reads, when it is full. The array's shape is set at close.

The reader reads what Zarr would, with fewer requests: a shard's index once per process, then the
chunks a clip needs as one byte range (Zarr asks for each chunk on its own).
"""
import math

import google_crc32c
import numpy as np

from cache.codecs import JPEG_CODEC_NAME, decode_chunk, encode_chunk

SHARD_BYTES = 32 << 20  # raw bytes per shard (~3-30 MB stored): ~1 file per 16 MB at Kinetics scale
MAX_CHUNKS = 1024  # per shard: its index (16 bytes a chunk) stays <= 16 KB, read whole by verify
EMPTY = np.uint64(2 ** 64 - 1)  # Zarr's index entry of a chunk that is not stored


def shard_chunks(chunk_rows, row_bytes):
    """Chunks per shard: SHARD_BYTES of raw rows."""
    return max(1, min(MAX_CHUNKS, SHARD_BYTES // (chunk_rows * row_bytes)))


def shard_key(i, ndim):
    """The object name of shard i of an array with ndim dimensions, below the array's folder."""
    return "/".join(["c", str(i)] + ["0"] * (ndim - 1))


def index_bytes(count):
    """Bytes of a shard's index with its checksum, at the shard's end."""
    return 16 * count + 4


def parse_shard_index(tail, count):
    """[count, 2] (offset, length) from a shard's last index_bytes(count) bytes; None when its
    checksum fails (a damaged or truncated shard)."""
    data, checksum = tail[:-4], tail[-4:]
    if len(tail) != index_bytes(count) or google_crc32c.value(data).to_bytes(4, "little") != checksum:
        return None
    return np.frombuffer(data, dtype="<u8").reshape(count, 2)


class ShardAppender:
    """Rows appended to a sharded array: array has shape (0, ...), chunks of `chunk_rows` rows and
    shards of whole chunks; storage and folder say where its objects go (cache/storage.py);
    codec/quality as in cache/codecs.py.

    Each chunk is encoded as it fills and added to the open shard (memory holds the open chunk's rows
    and the open shard's encoded chunks); a full shard gets its index and checksum and is written."""

    def __init__(self, array, storage, folder, codec, quality):
        self.array, self.storage, self.folder, self.codec, self.quality = array, storage, folder, codec, quality
        self.chunk_rows = array.chunks[0]
        self.count = array.shards[0] // self.chunk_rows  # chunks per shard
        self.row_shape = tuple(array.shape[1:])
        self.shards = 0  # whole shards written
        self.entries = []  # (offset, length) of the open shard's chunks
        self.data = bytearray()  # the open shard's encoded chunks
        self.rows = np.empty((0,) + self.row_shape, array.dtype)  # rows of the open chunk
        self.stored_bytes = 0

    def __len__(self):
        return (self.shards * self.count + len(self.entries)) * self.chunk_rows + len(self.rows)

    def _shard_name(self, i):
        return f"{self.folder}/{shard_key(i, len(self.row_shape) + 1)}"

    def append(self, rows):
        self.rows = np.concatenate([self.rows, np.asarray(rows, self.array.dtype)])
        while len(self.rows) >= self.chunk_rows:
            self._write_chunk(encode_chunk(self.rows[:self.chunk_rows], self.codec, self.quality))
            self.rows = self.rows[self.chunk_rows:]

    def _write_chunk(self, data):
        self.entries.append((len(self.data), len(data)))
        self.data += data
        self.stored_bytes += len(data)
        if len(self.entries) == self.count:
            self._close_shard()

    def _close_shard(self):
        """Write the open shard with its index (Zarr's layout: (offset, length) per chunk, then its CRC32C)."""
        index = np.full((self.count, 2), EMPTY, dtype="<u8")
        index[:len(self.entries)] = self.entries
        index = index.tobytes()
        self.storage.write(self._shard_name(self.shards),
                           bytes(self.data) + index + google_crc32c.value(index).to_bytes(4, "little"))
        self.stored_bytes += len(index) + 4
        self.data, self.entries, self.shards = bytearray(), [], self.shards + 1

    def truncate(self, length):
        """Forget rows >= length (a rolled-back video): chunks are cut from the open shard (written
        shards past the cut are read back and deleted), a chunk cut in the middle is decoded back into
        the open rows."""
        while length < self.shards * self.count * self.chunk_rows:
            self._reopen_last_shard()
        first = self.shards * self.count * self.chunk_rows
        keep = (length - first) // self.chunk_rows  # whole chunks kept in the open shard
        if keep < len(self.entries):
            cut = self.entries[keep:]
            partial = length - first - keep * self.chunk_rows
            if partial:  # the chunk `keep` holds rows that stay: decode it back
                off, n = cut[0]
                chunk = decode_chunk(bytes(self.data[off:off + n]), self.codec, (self.chunk_rows,) + self.row_shape,
                                     self.array.dtype)
                self.rows = chunk[:partial]
            else:
                self.rows = self.rows[:0]
            self.entries = self.entries[:keep]
            del self.data[cut[0][0]:]
            self.stored_bytes -= sum(n for _, n in cut)
        else:
            self.rows = self.rows[:length - first - len(self.entries) * self.chunk_rows]

    def _reopen_last_shard(self):
        """Drop the open shard (it holds only rows past the cut) and reopen the last written one."""
        self.stored_bytes -= sum(n for _, n in self.entries)
        self.shards -= 1
        name = self._shard_name(self.shards)
        data = self.storage.read(name)
        self.storage.remove(name)
        index = parse_shard_index(data[-index_bytes(self.count):], self.count)
        self.entries = [(int(o), int(n)) for o, n in index if o != EMPTY]
        self.stored_bytes -= index_bytes(self.count)
        self.data = bytearray(data[:-index_bytes(self.count)])  # the index goes; the chunks stay
        self.rows = self.rows[:0]

    def close(self):
        """Write the last (partial) chunk and shard and give the array its length."""
        n = len(self)
        if len(self.rows):  # Zarr stores an edge chunk at full size, the rows past the end as fill (0)
            full = np.zeros((self.chunk_rows,) + self.row_shape, self.array.dtype)
            full[:len(self.rows)] = self.rows
            self._write_chunk(encode_chunk(full, self.codec, self.quality))
            self.rows = self.rows[:0]
        if self.entries:
            self._close_shard()
        self.array.resize((n,) + self.row_shape)


class ShardReader:
    """Chunks of one array of a part, read as Zarr would read them but with fewer requests: each
    shard's index once (kept), then one byte range per shard for all the chunks asked for at once.

    layout: the array's ArrayLayout."""

    def __init__(self, storage, folder, layout):
        self.storage, self.folder, self.layout, self.codec = storage, folder, layout, layout.codec
        self.chunk_rows = layout.chunks[0]
        self.count = (layout.shards or layout.chunks)[0] // self.chunk_rows  # chunks per shard
        self.indexes = {}  # shard -> its [count, 2] index

    def shard_name(self, shard):
        return f"{self.folder}/{shard_key(shard, self.layout.ndim)}"

    def shard_index(self, shard):
        """[count, 2] (offset, length) of a shard's chunks, read once (FileNotFoundError: no shard;
        ValueError: its index fails its checksum)."""
        if shard not in self.indexes:
            name = self.shard_name(shard)
            size = self.storage.size(name)
            index = parse_shard_index(self.storage.read_range(name, max(0, size - index_bytes(self.count)), size),
                                      self.count)
            if index is None:
                raise ValueError(f"{name}: its chunk index fails its checksum")
            self.indexes[shard] = index
        return self.indexes[shard]

    def read(self, chunks):
        """The decoded chunks [chunk_rows, *row] of these chunk numbers, in their order."""
        shape = (self.chunk_rows,) + tuple(self.layout.shape[1:])
        out = {}
        by_shard = {}
        for c in chunks:
            by_shard.setdefault(c // self.count, []).append(c)
        for shard, members in by_shard.items():
            index = self.shard_index(shard)
            spans = index[[c % self.count for c in members]]
            if (spans[:, 0] == EMPTY).any():
                missing = members[int(np.flatnonzero(spans[:, 0] == EMPTY)[0])]
                raise ValueError(f"chunk {missing} is not stored")
            lo, hi = int(spans[:, 0].min()), int((spans[:, 0] + spans[:, 1]).max())
            data = self.storage.read_range(self.shard_name(shard), lo, hi)
            for c, (off, n) in zip(members, spans):
                out[c] = decode_chunk(data[int(off) - lo:int(off + n) - lo], self.codec, shape, self.layout.dtype)
        return [out[c] for c in chunks]


class ArrayLayout:
    """An array's shape, dtype, chunk and shard shapes and codec, from its zarr.json alone: reads and
    structural checks need no Zarr array object (opening one costs a few requests and ~5 ms)."""

    def __init__(self, meta):
        self.shape = tuple(meta["shape"])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(meta["data_type"])
        outer = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        sharding = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
        inner = sharding[0]["configuration"]["codecs"] if sharding else meta["codecs"]
        self.chunks = tuple(sharding[0]["configuration"]["chunk_shape"]) if sharding else outer
        self.shards = outer if sharding else None
        self.codec = "jpeg" if any(c["name"] == JPEG_CODEC_NAME for c in inner) else "zstd"

    @property
    def shard_count(self):
        return math.ceil(self.shape[0] / (self.shards or self.chunks)[0])
