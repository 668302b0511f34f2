"""Append rows to a sharded Zarr v3 array of one part, with bounded memory and whole-file writes.

Frames and flow are chunked one frame per chunk (a clip reads only its frames), teacher rows ~1 MB per
chunk, and many chunks are one file (a shard: Zarr's sharding codec, chunks back to back, then an index
of (offset, length) pairs and its CRC32C). Zarr would write a growing shard by reading and rewriting
it at every append, so the appender streams each encoded chunk to the end of the open shard's file and
writes the index when the shard is full, in the layout Zarr reads. The array's shape is set at close.
"""
import os

import google_crc32c
import numpy as np

from cache.codecs import decode_chunk, encode_chunk

SHARD_BYTES = 32 << 20  # raw bytes per shard (~3-30 MB stored): ~1 file per 16 MB at Kinetics scale
MAX_CHUNKS = 1024  # per shard: its index (16 bytes a chunk) stays <= 16 KB, read whole by verify
EMPTY = np.uint64(2 ** 64 - 1)  # Zarr's index entry of a chunk that is not stored


def shard_chunks(chunk_rows, row_bytes):
    """Chunks per shard: SHARD_BYTES of raw rows."""
    return max(1, min(MAX_CHUNKS, SHARD_BYTES // (chunk_rows * row_bytes)))


class ShardAppender:
    """Rows appended to a sharded array: array has shape (0, ...), chunks of `chunk_rows` rows and
    shards of whole chunks; path is its folder on disk; codec/quality as in cache/codecs.py.

    Each chunk is encoded as it fills and appended to the open shard's file at once (memory holds only
    the chunk being filled and the shard's (offset, length) entries); a full shard gets its index and
    checksum and is closed."""

    def __init__(self, array, path, codec, quality):
        self.array, self.path, self.codec, self.quality = array, path, codec, quality
        self.chunk_rows = array.chunks[0]
        self.count = array.shards[0] // self.chunk_rows  # chunks per shard
        self.row_shape = tuple(array.shape[1:])
        self.shards = 0  # whole shards written
        self.entries = []  # (offset, length) of the open shard's chunks in its file
        self.file = None  # the open shard's file
        self.rows = np.empty((0,) + self.row_shape, array.dtype)  # rows of the open chunk
        self.stored_bytes = 0

    def __len__(self):
        return (self.shards * self.count + len(self.entries)) * self.chunk_rows + len(self.rows)

    def _shard_path(self, i):
        return os.path.join(self.path, "c", str(i), *["0"] * len(self.row_shape))

    def append(self, rows):
        self.rows = np.concatenate([self.rows, np.asarray(rows, self.array.dtype)])
        while len(self.rows) >= self.chunk_rows:
            self._write_chunk(encode_chunk(self.rows[:self.chunk_rows], self.codec, self.quality))
            self.rows = self.rows[self.chunk_rows:]

    def _write_chunk(self, data):
        if self.file is None:
            path = self._shard_path(self.shards)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = open(path, "wb")
        offset = self.entries[-1][0] + self.entries[-1][1] if self.entries else 0
        self.file.write(data)
        self.entries.append((offset, len(data)))
        self.stored_bytes += len(data)
        if len(self.entries) == self.count:
            self._close_shard()

    def _close_shard(self):
        """Append the open shard's index (Zarr's layout: (offset, length) per chunk, then its CRC32C)."""
        index = np.full((self.count, 2), EMPTY, dtype="<u8")
        index[:len(self.entries)] = self.entries
        index_bytes = index.tobytes()
        self.file.write(index_bytes + google_crc32c.value(index_bytes).to_bytes(4, "little"))
        self.file.close()
        self.stored_bytes += len(index_bytes) + 4
        self.file, self.entries, self.shards = None, [], self.shards + 1

    def truncate(self, length):
        """Forget rows >= length (a rolled-back video): chunks are cut from the shard files, a chunk
        cut in the middle is decoded back into the open rows."""
        while length < self.shards * self.count * self.chunk_rows:
            self._reopen_last_shard()
        first = self.shards * self.count * self.chunk_rows
        keep = (length - first) // self.chunk_rows  # whole chunks kept in the open shard
        if keep < len(self.entries):
            cut = self.entries[keep:]
            partial = length - first - keep * self.chunk_rows
            if partial:  # the chunk `keep` holds rows that stay: decode it back
                off, n = cut[0]
                self.file.flush()
                with open(self._shard_path(self.shards), "rb") as f:
                    f.seek(off)
                    data = f.read(n)
                chunk = decode_chunk(data, self.codec, (self.chunk_rows,) + self.row_shape, self.array.dtype)
                self.rows = chunk[:partial]
            else:
                self.rows = self.rows[:0]
            self.entries = self.entries[:keep]
            self.file.truncate(cut[0][0])
            self.file.seek(cut[0][0])
            self.stored_bytes -= sum(n for _, n in cut)
        else:
            self.rows = self.rows[:length - first - len(self.entries) * self.chunk_rows]

    def _reopen_last_shard(self):
        """Drop the open shard (it holds only rows past the cut) and reopen the last complete one."""
        if self.file is not None:
            self.file.close()
            path = self._shard_path(self.shards)
            os.unlink(path)
            try:
                os.removedirs(os.path.dirname(path))  # its empty key folders (c/I/0/0), up to a non-empty one
            except OSError:
                pass
            self.stored_bytes -= sum(n for _, n in self.entries)
        self.shards -= 1
        path = self._shard_path(self.shards)
        with open(path, "rb") as f:
            data = f.read()
        index = np.frombuffer(data[-4 - 16 * self.count:-4], dtype="<u8").reshape(self.count, 2)
        self.entries = [(int(o), int(n)) for o, n in index if o != EMPTY]
        self.stored_bytes -= 16 * self.count + 4
        self.file = open(path, "r+b")
        self.file.truncate(len(data) - 16 * self.count - 4)  # the index goes; the chunks stay
        self.file.seek(0, os.SEEK_END)
        self.rows = self.rows[:0]

    def close(self):
        """Write the last (partial) chunk and shard and give the array its length."""
        n = len(self)
        if len(self.rows):  # Zarr stores an edge chunk at full size, the rows past the end as fill (0)
            full = np.zeros((self.chunk_rows,) + self.row_shape, self.array.dtype)
            full[:len(self.rows)] = self.rows
            self._write_chunk(encode_chunk(full, self.codec, self.quality))
            self.rows = self.rows[:0]
        if self.file is not None:
            self._close_shard()
        self.array.resize((n,) + self.row_shape)

    def abandon(self):
        """Close the open shard's file (the part is being deleted)."""
        if self.file is not None:
            self.file.close()
            self.file = None
