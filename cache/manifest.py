"""`cache info` and `cache verify`: what a cache holds, and whether every byte of it is intact.

Zarr reads a missing chunk file as fill values without complaint, so verify checks that every chunk
file exists, then decompresses every chunk (unless quick), then checks the per-video tables against
the arrays: offsets in range, no overlaps, no orphan rows, teacher rows consistent.
"""
import collections
import json
import math
import os
import shutil

import google_crc32c
import numpy as np
import zarr

import cache.codecs  # noqa: F401  (registers the JPEG codec that frame arrays name)
from cache.fingerprint import CacheError, fingerprint_sha256, read_cache_json
from cache.index import READABLE, committed_parts, load_index, open_index, read_part_attrs, read_part_table
from cache.reader import source_status
from cache.shards import EMPTY
from cache.writer import LOCK_SUFFIX, PARTS_DIR, TMP_PREFIX, directory_bytes

QUARANTINE_DIR = "quarantine"
LARGEST = 5  # `cache info` lists this many of the longest videos


def cache_info(cache_dir):
    """A summary dict: counts by status, frames, failure reasons, fingerprint, bytes, sources that
    vanished or changed since extraction, and every video (id, frames, status)."""
    meta = read_cache_json(cache_dir)
    index = open_index(cache_dir)  # the consolidated index: one mapped file, not every part's table
    records = index.records()
    part_of = {r["id"]: index.part(row) for row, r in enumerate(records)}
    status = collections.Counter(r["status"] for r in records)
    reasons = collections.Counter(r["error"] for r in records if r["status"] == "failed")
    parts_dir = os.path.join(cache_dir, PARTS_DIR)
    stale = [n for n in os.listdir(parts_dir) if n.startswith(TMP_PREFIX) and not n.endswith(LOCK_SUFFIX)] \
        if os.path.isdir(parts_dir) else []
    fps = meta["fingerprint"]["preprocessing"]["fps"]
    frames = sum(r["frame_count"] for r in records if r["status"] in READABLE)
    source = {r["id"]: source_status(r) for r in records}
    return {
        "cache": cache_dir, "created": meta["created"], "fingerprint": meta["fingerprint"],
        "videos": len(records), "ok": status["ok"], "partial": status["partial"], "failed": status["failed"],
        "frames": frames, "video_seconds": frames / fps,
        "teacher_frames": sum(r["teacher_count"] for r in records if r["status"] in READABLE),
        "failure_reasons": reasons.most_common(),
        # per status: videos, stored frames, source bytes (what a status costs, and what it loses)
        "by_status": {st: {"videos": n, "frames": sum(r["frame_count"] for r in records if r["status"] == st),
                           "source_bytes": sum(r.get("size") or 0 for r in records if r["status"] == st)}
                      for st, n in sorted(status.items())},
        "largest_videos": [(r["id"], r["frame_count"], r.get("size")) for r in
                           sorted(records, key=lambda r: (-r["frame_count"], r["id"]))[:LARGEST] if r["frame_count"]],
        "failed_videos": [(r["id"], r["error"]) for r in records if r["status"] == "failed"],
        "partial_videos": [(r["id"], r["error"]) for r in records if r["status"] == "partial"],
        "parts": len(index.parts), "stale_tmp_parts": len(stale),
        "bytes": directory_bytes(cache_dir),
        # the files the videos were extracted from: gone (their frames stay usable), or replaced since
        # (another size or mtime: rerunning extract redoes them)
        "vanished_sources": sorted(i for i, s in source.items() if s == "vanished"),
        "changed_sources": sorted(i for i, s in source.items() if s == "changed"),
        "video_list": [{"id": r["id"], "frames": r["frame_count"], "status": r["status"], "error": r.get("error"),
                        "source": r.get("path"), "source_now": source[r["id"]], "part": part_of[r["id"]]}
                       for r in sorted(records, key=lambda r: r["id"])],
    }


def _missing_chunks(part_path, name, array):
    """Chunks a non-empty array must store but does not: its shard files ("c/i/0/..") must all exist, and
    each shard's index must list every chunk inside the array's length (Zarr would read a missing one
    as zeros without complaint)."""
    shard_rows = (array.shards or array.chunks)[0]
    chunk_rows, tail = array.chunks[0], ["0"] * (array.ndim - 1)
    count = shard_rows // chunk_rows
    missing = []
    for i in range(math.ceil(array.shape[0] / shard_rows)):
        key = "/".join(["c", str(i), *tail])
        path = os.path.join(part_path, name, key)
        if not os.path.isfile(path):
            missing.append(key)
            continue
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4 - 16 * count))
            index_bytes, checksum = f.read(16 * count), f.read(4)
        if len(checksum) < 4 or google_crc32c.value(index_bytes).to_bytes(4, "little") != checksum:
            missing.append(f"{key} (damaged: its chunk index fails its checksum)")
            continue
        index = np.frombuffer(index_bytes, dtype="<u8").reshape(count, 2)
        stored = min(count, math.ceil((array.shape[0] - i * shard_rows) / chunk_rows))
        missing += [f"{key} chunk {k}" for k in np.flatnonzero(index[:stored, 0] == EMPTY)]
    return missing


class ArrayLayout:
    """An array's shape, chunk and shard shapes, read from its zarr.json alone: the structural checks
    need no Zarr array object (opening one costs ~5 ms; distill checks every part at start-up)."""

    def __init__(self, path):
        with open(os.path.join(path, "zarr.json")) as f:
            meta = json.load(f)
        self.shape = tuple(meta["shape"])
        self.ndim = len(self.shape)
        outer = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        sharding = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
        self.chunks = tuple(sharding[0]["configuration"]["chunk_shape"]) if sharding else outer
        self.shards = outer if sharding else None


def verify_part(cache_dir, part, fingerprint, quick=False, attrs=None):
    """Problems found in one committed part (empty list: intact). attrs: its attributes, if read already."""
    path = os.path.join(cache_dir, PARTS_DIR, part)
    try:
        attrs = attrs or read_part_attrs(cache_dir, part)
        if not attrs.get("complete"):
            return [f"{part}: not marked complete"]
    except Exception as e:  # any failure to open is damage to report, not to crash on
        return [f"{part}: cannot open ({e})"]
    problems = []
    if attrs.get("fingerprint_sha256") != fingerprint_sha256(fingerprint):
        problems.append(f"{part}: written with other settings than cache.json records "
                        "(cache.json edited, or parts of another cache mixed in)")
    arrays = _check_arrays(part, path, _expected_rows(fingerprint), quick, problems)
    if problems:
        return problems
    n_frames = arrays["frames"].shape[0]
    n_teacher = arrays["logits"].shape[0] if "logits" in arrays else 0
    if "flow" in arrays and arrays["flow"].shape[0] != n_frames:
        problems.append(f"{part}/flow: {arrays['flow'].shape[0]} rows but frames has {n_frames}")
    for name in ("teacher_frame", "embed") if "logits" in arrays else ():
        if arrays[name].shape[0] != n_teacher:
            problems.append(f"{part}/{name}: {arrays[name].shape[0]} rows but logits has {n_teacher}")
    return problems + _check_tables(part, attrs["videos"], n_frames, n_teacher)


def _expected_rows(fingerprint):
    """{array name: shape of one row} that a part written with this fingerprint must hold."""
    pre = fingerprint["preprocessing"]
    expect = {"frames": (pre["height"], pre["width"], 3)}
    if fingerprint["teacher"]["name"] != "none":
        expect.update({"teacher_frame": (), "logits": (fingerprint["teacher"]["num_classes"],),
                       "embed": (fingerprint["teacher"]["embed_dim"],)})
    if fingerprint["flow"]["method"] != "none":
        expect["flow"] = (pre["height"], pre["width"], 2)
    return expect


def _check_arrays(part, path, expect, quick, problems):
    """Each expected array: present, the right row shape, every chunk there and (unless quick)
    decodable. Appends to problems; returns {name: ArrayLayout} of those present."""
    arrays = {}
    for name, row in expect.items():
        try:
            arr = ArrayLayout(os.path.join(path, name))
        except (OSError, ValueError, KeyError, IndexError):
            problems.append(f"{part}: array {name!r} is missing")
            continue
        if tuple(arr.shape[1:]) != row:
            problems.append(f"{part}/{name}: row shape {tuple(arr.shape[1:])}, expected {row}")
        missing = _missing_chunks(path, name, arr)
        if missing:
            problems.append(f"{part}/{name}: {len(missing)} chunk(s) missing (e.g. {missing[0]})")
        elif not quick:
            step = (arr.shards or arr.chunks)[0]
            data = zarr.open_array(os.path.join(path, name), mode="r")
            for lo in range(0, arr.shape[0], step):
                try:
                    data[lo:lo + step]
                except Exception as e:
                    problems.append(f"{part}/{name}: rows {lo}..{lo + step} unreadable ({type(e).__name__}: {e})")
                    break
        arrays[name] = arr
    return arrays


def _check_tables(part, videos, n_frames, n_teacher):
    """The video table must tile the frame and teacher arrays exactly: no overlap, no orphan rows."""
    problems = []
    frame_rows = sorted((r["frame_offset"], r["frame_count"], r["id"]) for r in videos if r["frame_count"])
    teacher_rows = sorted((r["teacher_offset"], r["teacher_count"], r["id"]) for r in videos if r["teacher_count"])
    for rows, total, what in ((frame_rows, n_frames, "frames"), (teacher_rows, n_teacher, "teacher rows")):
        cursor = 0
        for off, count, vid in rows:
            if off != cursor:
                problems.append(f"{part}: video {vid!r} {what} start at {off}, expected {cursor} "
                                f"({'overlap' if off < cursor else 'orphan rows'})")
            cursor = off + count
        if cursor != total:
            problems.append(f"{part}: table covers {cursor} {what} but the array has {total} "
                            f"({'orphan rows' if cursor < total else 'records past the end'})")
    return problems


def verify_cache(cache_dir, quick=False):
    """(problems, notes, checked): problems mean damage; notes are harmless (e.g. stale tmp parts)."""
    meta = read_cache_json(cache_dir)
    problems, notes, checked = [], [], {"parts": 0, "videos": 0}
    parts_dir = os.path.join(cache_dir, PARTS_DIR)
    for name in sorted(os.listdir(parts_dir)) if os.path.isdir(parts_dir) else []:
        if name.startswith(TMP_PREFIX) and name.endswith(LOCK_SUFFIX):
            continue
        if name.startswith(TMP_PREFIX):
            notes.append(f"{name}: unfinished part of a killed run; the next extract removes it and redoes its videos")
        elif not (name.startswith("part-") and name.endswith(".zarr")):
            problems.append(f"{name}: unexpected entry in {parts_dir} (orphan)")
    tables = {}
    for part in committed_parts(cache_dir):
        try:
            attrs = read_part_attrs(cache_dir, part)
            tables[part] = attrs["videos"]
        except CacheError:
            attrs = None  # verify_part reports it
        problems += verify_part(cache_dir, part, meta["fingerprint"], quick=quick, attrs=attrs)
        checked["parts"] += 1
    try:
        index, duplicates = load_index(cache_dir, tables=tables)
        checked["videos"] = len(index)
        for vid, part in duplicates:
            problems.append(f"{part}: video {vid!r} is stored twice (ignored copy)")
    except CacheError as e:
        problems.append(str(e))
    return problems, notes, checked


def quarantine_damaged(cache_dir, problems):
    """Move every part named in `problems` to CACHE/quarantine/; a rerun of extract redoes its videos."""
    damaged = sorted({p.split("/")[0].split(":")[0] for p in problems if p.startswith("part-")})
    os.makedirs(os.path.join(cache_dir, QUARANTINE_DIR), exist_ok=True)
    moved = []
    for part in damaged:
        src = os.path.join(cache_dir, PARTS_DIR, part)
        if os.path.isdir(src):
            ids = []
            try:
                ids = [r["id"] for r in read_part_table(cache_dir, part)]
            except CacheError:
                pass
            shutil.move(src, os.path.join(cache_dir, QUARANTINE_DIR, part))
            moved.append((part, ids))
    return moved


def format_info(info):
    fp = info["fingerprint"]
    pre, flow, teacher = fp["preprocessing"], fp["flow"], fp["teacher"]
    lines = [
        f"cache      {info['cache']}  (created {info['created']}, {info['parts']} parts, {info['bytes'] / 1e6:.1f} MB)",
        f"videos     {info['videos']}: {info['ok']} ok, {info['partial']} partial, {info['failed']} failed",
        *[f"  {st:8} {c['videos']} videos, {c['frames']} frames, {c['source_bytes'] / 1e6:.1f} MB of source files"
          for st, c in info.get("by_status", {}).items()],
        f"frames     {info['frames']} ({info['video_seconds']:.1f} video-seconds), teacher frames {info['teacher_frames']}",
        f"frames at  {pre['fps']} fps, {pre['height']}x{pre['width']}; teacher sees {pre['teacher_size']}px "
        f"(the centre {pre.get('teacher_crop', 1.0):g} of the central square), "
        f"every {pre['teacher_every']} frame(s)",
        f"teacher    {teacher['name']}" + (f" sha256 {teacher['weights_sha256'][:16]}…" if "weights_sha256" in teacher else ""),
        f"flow       {flow['method']} {json.dumps(flow['params'])} bound ±{flow['bound']}px",
        f"ffmpeg     {fp['ffmpeg_version']}; vidistill {fp['vidistill_version']}",
    ]
    if info["vanished_sources"]:
        lines.append(f"vanished   {len(info['vanished_sources'])} source file(s) no longer exist (their frames stay "
                     f"in the cache and distill still uses them): " + ", ".join(info["vanished_sources"][:10])
                     + (" …" if len(info["vanished_sources"]) > 10 else ""))
    if info["changed_sources"]:
        lines.append(f"changed    {len(info['changed_sources'])} source file(s) were replaced since extraction (other "
                     "size or mtime); rerun extract to redo them: " + ", ".join(info["changed_sources"][:10])
                     + (" …" if len(info["changed_sources"]) > 10 else ""))
    if info["stale_tmp_parts"]:
        lines.append(f"unfinished {info['stale_tmp_parts']} part(s) from killed runs (rerun extract to finish)")
    for k, (vid, n, size) in enumerate(info.get("largest_videos", [])):
        lines.append(f"{'largest' if k == 0 else '':10} {vid}: {n} frames ({n / pre['fps']:.1f} s)"
                     + (f", source {size / 1e6:.1f} MB" if size else ""))
    for k, (reason, n) in enumerate(info["failure_reasons"]):
        lines.append(f"{'reasons' if k == 0 else '':10} {n} x {reason}")
    for vid, err in info["partial_videos"][:20]:
        lines.append(f"partial    {vid}: {err}")
    for vid, err in info["failed_videos"][:50]:
        lines.append(f"failed     {vid}: {err}")
    if len(info["failed_videos"]) > 50:
        lines.append(f"           … and {len(info['failed_videos']) - 50} more failed videos")
    return "\n".join(lines)
