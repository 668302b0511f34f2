"""`extract --add-teacher SPEC`: another teacher's outputs added to a cache, its frames and flow untouched.

Every committed part gets logits_<slot> and embed_<slot> beside the first teacher's, for the very frames
the first teacher saw (its teacher_frame rows), so every teacher of a cache describes the same frames.
The sources are decoded again at the cache's settings and the new teacher's input is cut from that
decode as `extract --teacher A --teacher B` cuts it (pipeline/extract/decode.py): nothing stored is
rewritten, and only decoding and the new teacher cost time (no flow).

A part holds the teacher once its logits' metadata (zarr.json) exists: it is written last, after the
embeddings' and every data shard, so a killed run leaves nothing half-visible and a rerun of the same
command does the parts that lack it (their leftovers are overwritten). cache.json lists the teacher from
the start: `cache verify` and distill report the parts that do not hold it yet.
"""
import json
import signal
import time

import numpy as np
import zarr

from cache.fingerprint import CACHE_JSON, CacheError, cache_teachers, read_cache_json, teacher_array
from cache.index import committed_parts, read_part_tables
from cache.reader import source_status
from cache.shards import ArrayLayout, ShardReader
from cache.storage import open_storage
from cache.writer import PARTS_DIR, create_arrays, teacher_specs
from models.teacher import load_teacher
from pipeline.common.config import resolve_device
from pipeline.common.errors import ExtractError, ExtractInterrupted
from pipeline.common.progress import progress_bar
from pipeline.common.teacher_spec import parse_teacher, render_teacher
from pipeline.extract.decode import DecodeError, VideoDecode, ffmpeg_version
from pipeline.extract.extract import more_teacher_identity
from pipeline.extract.job import ShardLock, StopRequest, held_locks


def run_add_teacher(cache, teacher, device="auto", batch_frames=32, stall_timeout=60.0, progress=True):
    """The whole of `cli.py extract --add-teacher`. Returns a summary dict. A SIGINT or SIGTERM stops
    after the part in flight is dropped (ExtractInterrupted); the parts finished so far keep the teacher."""
    stop = StopRequest()
    with stop.on_signals(announce=progress):
        return _add_teacher(cache, teacher, device, batch_frames, stall_timeout, progress, stop)


def _add_teacher(cache, text, device, batch_frames, stall_timeout, progress, stop):
    t0 = time.time()
    try:
        meta = read_cache_json(cache)
    except CacheError as e:
        raise ExtractError(str(e)) from None
    if not cache_teachers(meta["fingerprint"]):
        raise ExtractError(f"{cache} has no teacher (extracted with --teacher none); --add-teacher adds to the "
                           "teachers a cache has: extract it with one first")
    if meta["fingerprint"]["ffmpeg_version"] != ffmpeg_version():  # another decoder: other pixels than the cache's
        raise ExtractError(f"{cache} was decoded with ffmpeg {meta['fingerprint']['ffmpeg_version']}, this machine has "
                           f"{ffmpeg_version()}; add the teacher where the cache was extracted, or extract it again")
    busy = held_locks(cache)  # before loading the teacher: a refusal should not wait for its weights
    if busy:
        raise ExtractError(f"{cache}: extract jobs are writing into it ({', '.join(f'{k} by {v}' for k, v in busy.items())}); "
                           "add the teacher once they have finished")
    spec, weights, classes = parse_teacher(text)
    device = resolve_device(device)
    teacher = load_teacher(spec, weights, device=device, classes=classes)
    lock = ShardLock(cache, 0, 1, meta["config"].get("single_writer", False))  # no extract starts meanwhile
    try:
        stop.conditions.append(lambda: lock.lost)
        slot = _teacher_slot(cache, meta, spec, more_teacher_identity(teacher, device),
                             render_teacher(spec, weights, classes), lock.fence)
        summary = {"cache": cache, "teacher": spec, "slot": slot, "parts": 0, "parts_held": 0, "videos": 0,
                   "frames": 0, "seconds": {"decode": 0.0, "teacher": 0.0}}
        storage = open_storage(cache)
        parts = committed_parts(cache)
        logits = teacher_array("logits", slot)
        held = storage.read_many([f"{PARTS_DIR}/{p}/{logits}/zarr.json" for p in parts])
        todo = [p for p in parts if not isinstance(held[f"{PARTS_DIR}/{p}/{logits}/zarr.json"], bytes)]
        summary["parts_held"] = len(parts) - len(todo)
        tables = read_part_tables(cache, todo)
        bar = progress_bar(total=sum(1 for p in todo for r in tables[p] if r["teacher_count"]), unit="video",
                           desc=f"add {spec}", disable=not progress)
        try:
            for part in todo:
                _add_to_part(storage, part, tables[part], meta["fingerprint"]["preprocessing"], teacher, slot,
                             batch_frames, stall_timeout, summary, bar, stop, lock.fence)
                summary["parts"] += 1
        finally:
            bar.close()
    finally:
        lock.release()
    summary["wall_seconds"] = time.time() - t0
    return summary


def _teacher_slot(cache, meta, spec, identity, rendered, fence):
    """The slot of the teacher in the cache: a new one (cache.json lists it from now on), or its own
    when a run adding it was interrupted. A teacher the cache has with other weights is refused."""
    fingerprint, config = meta["fingerprint"], meta["config"]
    names = [t["name"] for t in cache_teachers(fingerprint)]
    if spec in names:
        slot = names.index(spec)
        if slot == 0 or fingerprint["more_teachers"][slot - 1] != identity:
            raise ExtractError(f"{cache} already has teacher {spec}" + (" (its first)" if slot == 0 else
                               " with other weights or settings") + "; a cache holds each teacher once")
        return slot
    fingerprint["more_teachers"] = fingerprint.get("more_teachers", []) + [identity]
    config["more_teachers"] = list(config.get("more_teachers") or []) + [rendered]
    fence.check()
    open_storage(cache).write(CACHE_JSON, json.dumps(meta, indent=2, sort_keys=True).encode())
    return len(names)


def _read_all(storage, folder):
    """Every row of a part's array."""
    layout = ArrayLayout(json.loads(storage.read(f"{folder}/zarr.json")))
    if layout.shape[0] == 0:
        return np.zeros(layout.shape, layout.dtype)
    reader = ShardReader(storage, folder, layout)
    chunks = reader.read(list(range(-(-layout.shape[0] // reader.chunk_rows))))
    return np.concatenate(chunks)[:layout.shape[0]]


def _add_to_part(storage, part, videos, pre, teacher, slot, batch_frames, stall_timeout, summary, bar, stop, fence):
    """The teacher's rows of one part, written beside the first teacher's; its logits' metadata last."""
    folder = f"{PARTS_DIR}/{part}"
    names = [teacher_array("embed", slot), teacher_array("logits", slot)]  # in the order they become visible
    for name in names:  # what an interrupted run left of this part
        storage.remove(f"{folder}/{name}", recursive=True)
    teacher_frame = _read_all(storage, f"{folder}/teacher_frame")
    metadata = {}
    group = zarr.open_group(zarr.storage.MemoryStore(metadata), mode="w", zarr_format=3)
    arrays = create_arrays(group, storage, folder, teacher_specs([(teacher.num_classes, teacher.embed_dim)], slot))
    committing = False
    try:
        for rec in sorted((r for r in videos if r["teacher_count"]), key=lambda r: r["teacher_offset"]):
            if stop():
                raise ExtractInterrupted(f"interrupted: {summary['parts']} more part(s) of {summary['cache']} hold "
                                         f"{summary['teacher']}; rerun the same command to add it to the rest",
                                         stop.signum or signal.SIGTERM)
            if rec["teacher_offset"] != len(arrays[names[1]]):
                raise ExtractError(f"{storage.url(folder)}: its video table does not tile its teacher rows at "
                                   f"{rec['id']!r}; run `cli.py cache verify`")
            picks = teacher_frame[rec["teacher_offset"]:rec["teacher_offset"] + rec["teacher_count"]]
            logits, embed = _label_video(rec, picks, pre, teacher, batch_frames, stall_timeout, summary["seconds"])
            arrays[names[1]].append(logits)
            arrays[names[0]].append(embed)
            summary["videos"] += 1
            summary["frames"] += len(picks)
            bar.update(1)
        for a in arrays.values():
            a.close()
        # a lost lock commits nothing (cache/lease.py); a swap whose answer was lost may have committed
        committing = True
        fence.commit([(f"{folder}/{name}/zarr.json", metadata[f"{name}/zarr.json"].to_bytes()) for name in names],
                     requires=f"{folder}/zarr.json")
    except BaseException:
        for name in names if not committing else ():
            try:
                storage.remove(f"{folder}/{name}", recursive=True)
            except (OSError, CacheError):  # the store is failing: the rerun overwrites it
                pass
        raise


def _label_video(rec, picks, pre, teacher, batch_frames, stall_timeout, seconds):
    """The teacher's (logits, embeddings) of a video's frames `picks` (video-relative, sorted), from a
    new decode of its source at the cache's settings."""
    status = source_status(rec)
    if status != "same":
        raise ExtractError(f"{rec['path']}: the source of {rec['id']!r} {status} since it was extracted; "
                           "--add-teacher decodes the sources again: restore it, or extract the video again")
    logits, embeds, n = [], [], 0
    clock = time.perf_counter
    try:
        t = clock()
        for stored, (_, teacher_in) in VideoDecode(rec["path"], fps=pre["fps"], height=pre["height"], width=pre["width"],
                                                   teacher_size=pre["teacher_size"], teacher_crop=pre.get("teacher_crop", 1.0),
                                                   batch_frames=batch_frames, stall_timeout=stall_timeout,
                                                   more_teachers=[(teacher.input_size, teacher.eval_crop)]):
            seconds["decode"] += clock() - t
            here = picks[(picks >= n) & (picks < n + len(stored))] - n
            if len(here):
                t = clock()
                out = teacher.predict(teacher_in[here])
                seconds["teacher"] += clock() - t
                logits.append(out[0])
                embeds.append(out[1])
            n += len(stored)
            t = clock()
    except DecodeError as e:
        raise ExtractError(f"{rec['path']}: cannot decode it again ({e})") from None
    got = sum(len(x) for x in logits)
    if n != rec["frame_count"] or got != len(picks):
        raise ExtractError(f"{rec['path']}: decodes to {n} frames now, {rec['frame_count']} when it was extracted; "
                           "the decoder (ffmpeg) changed since - extract the cache again")
    return np.concatenate(logits), np.concatenate(embeds)
