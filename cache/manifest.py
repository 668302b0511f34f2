"""`cache info` and `cache verify`: what a cache holds, and whether every byte of it is intact.

Zarr reads a missing chunk as fill values without complaint, so verify checks that every shard exists
and its index lists every chunk, then decodes every chunk (unless quick), then checks the per-video
tables against the arrays: offsets in range, no overlaps, no orphan rows, teacher rows consistent.
Damage is reported with the part, the array and the video (and frame) it belongs to.
"""
import collections
import json
import os
import time

import numpy as np

from cache.codecs import decode_chunk
from cache.fingerprint import CacheError, cache_teachers, fingerprint_sha256, read_cache_json, teacher_array
from cache.index import (
    INDEX_FILE,
    READABLE,
    VideoIndex,
    build_index_bytes,
    committed_parts,
    load_index,
    open_index,
    read_part_attrs,
    read_part_table,
)
from cache.reader import source_status
from cache.shards import EMPTY, ArrayLayout, ShardReader, shard_key
from cache.storage import TMP_SUFFIX, open_storage
from cache.writer import COMMITS_DIR, PARTS_DIR, uncommitted_parts

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
    storage = open_storage(cache_dir)
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
        "parts": len(index.parts), "stale_tmp_parts": len(uncommitted_parts(cache_dir)),
        "bytes": storage.total_bytes(),
        # the files the videos were extracted from: gone (their frames stay usable), or replaced since
        # (another size or mtime: rerunning extract redoes them)
        "vanished_sources": sorted(i for i, s in source.items() if s == "vanished"),
        "changed_sources": sorted(i for i, s in source.items() if s == "changed"),
        "video_list": [{"id": r["id"], "frames": r["frame_count"], "status": r["status"], "error": r.get("error"),
                        "source": r.get("path"), "source_now": source[r["id"]], "part": part_of[r["id"]]}
                       for r in sorted(records, key=lambda r: r["id"])],
    }


def _owner(videos, array, row):
    """'video ID frame N' for a row of an array of a part (its table says whose rows are where)."""
    offset, count = ("frame_offset", "frame_count") if array in ("frames", "flow") else ("teacher_offset", "teacher_count")
    for r in videos:
        if r[count] and r[offset] <= row < r[offset] + r[count]:
            return f"video {r['id']!r} {'frame' if count == 'frame_count' else 'teacher row'} {row - r[offset]}"
    return f"row {row} (no video's)"


def _check_array(storage, part, name, layout, videos, quick):
    """Problems of one array: every shard there with an intact index listing every chunk, and (unless
    quick) every chunk decodable. Zarr would read a missing chunk as zeros without complaint."""
    reader = ShardReader(storage, f"{PARTS_DIR}/{part}/{name}", layout)
    count, chunk_rows = reader.count, reader.chunk_rows
    shape = (chunk_rows,) + layout.shape[1:]
    for i in range(layout.shard_count):
        where = f"{part}/{name}: shard {shard_key(i, layout.ndim)}"
        try:
            index = reader.shard_index(i)
        except FileNotFoundError:
            return [f"{where} is missing (from {_owner(videos, name, i * count * chunk_rows)})"]
        except ValueError:
            return [f"{where} is damaged: its chunk index fails its checksum "
                    f"(from {_owner(videos, name, i * count * chunk_rows)})"]
        stored = min(count, -(-(layout.shape[0] - i * count * chunk_rows) // chunk_rows))
        empty = np.flatnonzero(index[:stored, 0] == EMPTY)
        if len(empty):
            row = (i * count + int(empty[0])) * chunk_rows
            return [f"{where}: {len(empty)} chunk(s) missing, e.g. {_owner(videos, name, row)}"]
        if quick:
            continue
        lo, hi = int(index[:stored, 0].min()), int((index[:stored, 0] + index[:stored, 1]).max())
        data = storage.read_range(reader.shard_name(i), lo, hi)
        for k, (off, n) in enumerate(index[:stored]):  # one by one: a failure names its video and frame
            try:
                decode_chunk(data[int(off) - lo:int(off + n) - lo], layout.codec, shape, layout.dtype)
            except Exception as e:
                row = (i * count + k) * chunk_rows
                return [f"{part}/{name}: {_owner(videos, name, row)} is unreadable ({type(e).__name__}: {str(e)[:80]})"]
    return []


def verify_part(cache_dir, part, fingerprint, quick=False, attrs=None, lacking=None):
    """Problems found in one committed part (empty list: intact). attrs: its attributes, if read already,
    or its commit record (then the video table is not checked, and damage is named by row). lacking: a
    list to which the slots of added teachers (`extract --add-teacher`) the part does not hold yet are
    appended: unfinished work, not damage."""
    try:
        attrs = attrs or read_part_attrs(cache_dir, part)
        if "videos" in attrs and not attrs.get("complete"):
            return [f"{part}: not marked complete"]
    except Exception as e:  # any failure to open is damage to report, not to crash on
        return [f"{part}: cannot open ({e})"]
    problems = []
    if attrs.get("fingerprint_sha256") != fingerprint_sha256(fingerprint):
        problems.append(f"{part}: written with other settings than cache.json records "
                        "(cache.json edited, or parts of another cache mixed in)")
    videos = attrs.get("videos")
    expect = _expected_rows(fingerprint)
    # a teacher added to the cache after this part was written: there once its logits' metadata is
    # (written last); until then the part lacks it, which `extract --add-teacher` finishes
    later = [slot for slot in range(1, len(cache_teachers(fingerprint))) if teacher_array("logits", slot) in expect]
    held = storage_has(cache_dir, [f"{PARTS_DIR}/{part}/{teacher_array('logits', slot)}/zarr.json" for slot in later])
    for slot, there in zip(later, held):
        if not there:
            expect.pop(teacher_array("logits", slot)), expect.pop(teacher_array("embed", slot))
            if lacking is not None:
                lacking.append(slot)
    arrays = _check_arrays(cache_dir, part, expect, videos or [], quick, problems)
    if problems:
        return problems
    n_frames = arrays["frames"].shape[0]
    n_teacher = arrays["logits"].shape[0] if "logits" in arrays else 0
    if "flow" in arrays and arrays["flow"].shape[0] != n_frames:
        problems.append(f"{part}/flow: {arrays['flow'].shape[0]} rows but frames has {n_frames}")
    for name in [n for n in arrays if n not in ("frames", "flow", "logits")] if "logits" in arrays else ():
        if arrays[name].shape[0] != n_teacher:
            problems.append(f"{part}/{name}: {arrays[name].shape[0]} rows but logits has {n_teacher}")
    return problems + (_check_tables(part, videos, n_frames, n_teacher) if videos is not None else [])


def storage_has(cache_dir, keys):
    """Whether each of these objects exists, in one concurrent round of reads."""
    got = open_storage(cache_dir).read_many(keys) if keys else {}
    return [isinstance(got[k], bytes) for k in keys]


def _expected_rows(fingerprint):
    """{array name: shape of one row} that a part written with this fingerprint must hold."""
    pre = fingerprint["preprocessing"]
    expect = {"frames": (pre["height"], pre["width"], 3)}
    for slot, teacher in enumerate(cache_teachers(fingerprint)):
        expect["teacher_frame"] = ()
        expect.update({teacher_array("logits", slot): (teacher["num_classes"],),
                       teacher_array("embed", slot): (teacher["embed_dim"],)})
    if fingerprint["flow"]["method"] != "none":
        expect["flow"] = (pre["height"], pre["width"], 2)
    return expect


def _check_arrays(cache_dir, part, expect, videos, quick, problems):
    """Each expected array: present, the right row shape, every chunk there and (unless quick)
    decodable. Appends to problems; returns {name: ArrayLayout} of those present."""
    storage = open_storage(cache_dir)
    metas = storage.read_many([f"{PARTS_DIR}/{part}/{name}/zarr.json" for name in expect])
    arrays = {}
    for name, row in expect.items():
        try:
            meta = metas[f"{PARTS_DIR}/{part}/{name}/zarr.json"]
            if isinstance(meta, Exception):
                raise meta
            arr = ArrayLayout(json.loads(meta))
        except (OSError, ValueError, KeyError, IndexError):
            problems.append(f"{part}: array {name!r} is missing")
            continue
        if tuple(arr.shape[1:]) != row:
            problems.append(f"{part}/{name}: row shape {tuple(arr.shape[1:])}, expected {row}")
        problems += _check_array(storage, part, name, arr, videos, quick)
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


def verify_cache(cache_dir, quick=False, with_tables=True):
    """(problems, notes, checked): problems mean damage; notes are harmless (e.g. unfinished parts).
    with_tables=False (distill's start-up check, cheap at any scale): each part's settings from its commit
    record and its arrays' structure, without parsing the video tables (index.bin holds them)."""
    meta = read_cache_json(cache_dir)
    storage = open_storage(cache_dir)
    # lacking_teachers: {teacher name: parts that do not hold it yet (an unfinished --add-teacher)}
    problems, notes, checked = [], [], {"parts": 0, "videos": 0, "lacking_teachers": {}}
    names = [t["name"] for t in cache_teachers(meta["fingerprint"])]
    committed = committed_parts(cache_dir)
    present = set(storage.list(PARTS_DIR))
    for name in sorted(present - set(committed)):
        if name.startswith("part-"):
            notes.append(f"{name}: uncommitted part (being written, or left by a killed run); the next extract of "
                         "its shard or `cache verify --repair` removes it and its videos are redone")
        else:
            problems.append(f"{name}: unexpected entry in {storage.url(PARTS_DIR)} (orphan)")
    tables = {}
    records = {} if with_tables else storage.read_many([f"{COMMITS_DIR}/{part}.json" for part in committed])
    for part in committed:
        checked["parts"] += 1
        if part not in present:
            problems.append(f"{part}: committed, but its data is missing")
            continue
        try:
            if records:
                record = records[f"{COMMITS_DIR}/{part}.json"]
                attrs = json.loads(record) if isinstance(record, bytes) else None
            else:
                attrs = read_part_attrs(cache_dir, part)
                tables[part] = attrs["videos"]
        except (CacheError, ValueError):
            attrs = None  # verify_part reports it
        lacking = []
        problems += verify_part(cache_dir, part, meta["fingerprint"], quick=quick, attrs=attrs, lacking=lacking)
        for slot in lacking:
            checked["lacking_teachers"][names[slot]] = checked["lacking_teachers"].get(names[slot], 0) + 1
    for name, count in checked["lacking_teachers"].items():
        notes.append(f"{count} part(s) do not hold teacher {name} yet (its `extract --add-teacher` did not finish); "
                     "rerun it to finish")
    if records:
        return problems, notes, checked
    try:
        index, duplicates = load_index(cache_dir, parts=list(tables), tables=tables)
        checked["videos"] = len(index)
        for vid, part in duplicates:
            problems.append(f"{part}: video {vid!r} is stored twice (ignored copy)")
        problems += _check_index(storage, cache_dir, committed, tables, notes)
    except CacheError as e:
        problems.append(str(e))
    leftovers = leftover_tmp_files(cache_dir)
    if leftovers:
        notes.append(f"{len(leftovers)} temporary file(s) (*{TMP_SUFFIX}) left by killed writes, e.g. {leftovers[0]}; "
                     "`cache verify --repair` removes them")
    return problems, notes, checked


INDEX_PROBLEM = "the consolidated index"  # how verify's problems with index.bin begin (--repair rebuilds it)


def _check_index(storage, cache_dir, committed, tables, notes):
    """index.bin against its checksum and against the parts' tables it was built from: a reader trusts
    its offsets, so one changed byte would serve one video's frames as another's."""
    where = f"{INDEX_PROBLEM} {storage.url(INDEX_FILE)}"
    try:
        data = storage.read(INDEX_FILE)
        if VideoIndex(data, "memory").parts != committed:
            notes.append(f"{storage.url(INDEX_FILE)} lists other parts than commits/ (a part committed since); "
                         "the next reader rebuilds it")
            return []
    except FileNotFoundError:
        return []  # not built yet: the next reader builds it
    except (OSError, ValueError, KeyError) as e:
        return [f"{where} is damaged ({e}); readers rebuild it, `cache verify --repair` rebuilds it now"]
    if data != build_index_bytes(cache_dir, committed, tables):
        return [f"{where} does not match the parts' video tables; `cache verify --repair` rebuilds it"]
    return []


def rebuild_index(cache_dir):
    """Replace index.bin by one built from the parts (`cache verify --repair`)."""
    open_storage(cache_dir).remove(INDEX_FILE)
    open_index(cache_dir, warn=False)


TMP_STALE_SECONDS = 60  # a temporary file older than this is no write in flight (those last milliseconds)


def leftover_tmp_files(cache_dir, older_than=0):
    """Temporary files (*.tmp) in a local cache, left by writes a kill interrupted, older than this many
    seconds; paths relative to the cache. (An object store has none: its writes are single requests.)"""
    storage = open_storage(cache_dir)
    if storage.remote:
        return []
    now, found = time.time(), []
    for folder, _, files in os.walk(storage.path()):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if name.endswith(TMP_SUFFIX) and now - os.path.getmtime(path) >= older_than:
                    found.append(os.path.relpath(path, storage.path()))
            except OSError:  # finished (renamed) meanwhile
                pass
    return sorted(found)


def remove_leftover_tmp_files(cache_dir):
    """Delete the temporary files that are surely no write in flight. Returns how many."""
    storage = open_storage(cache_dir)
    leftovers = leftover_tmp_files(cache_dir, TMP_STALE_SECONDS)
    for name in leftovers:
        storage.remove(name)
    return len(leftovers)


def quarantine_damaged(cache_dir, problems):
    """Take every part named in `problems` out of the cache: its commit record goes first (readers stop
    seeing it), its data moves to CACHE/quarantine/; a rerun of extract redoes its videos."""
    storage = open_storage(cache_dir)
    damaged = sorted({p.split("/")[0].split(":")[0] for p in problems if p.startswith("part-")})
    moved = []
    for part in damaged:
        ids = []
        try:
            ids = [r["id"] for r in read_part_table(cache_dir, part)]
        except CacheError:
            pass
        storage.remove(COMMITS_DIR, f"{part}.json")
        storage.move(f"{PARTS_DIR}/{part}", f"{QUARANTINE_DIR}/{part}")
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
        *[f"  + {t['name']} sha256 {t['weights_sha256'][:16]}… (its own {t['input_size']}px, the centre {t['crop']:g} "
          "of the central square)" for t in fp.get("more_teachers", [])],
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
