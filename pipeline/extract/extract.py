"""Stage one: decode every video once, run the image teacher and optical flow, write the Zarr cache.

Work is split three ways without new machinery:
  --shard I/N   (or torchrun's RANK/WORLD_SIZE, or a Slurm array) picks every N-th video;
  --workers W   runs W processes inside a job, each writing its own parts;
  a decode thread in each process runs ffmpeg for the next video while this one is on the teacher.
A rerun skips every video already recorded in a committed part (done or failed) whose source is
unchanged (size, mtime), so a killed job loses at most the part it was writing, and no video is ever
stored twice; a replaced source is extracted again and its new record supersedes the old. A SIGINT or
SIGTERM commits the videos finished so far before the job stops.
"""

import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import time

from cache.codecs import CODECS, storage_description
from cache.fingerprint import (
    VIDISTILL_VERSION,
    CacheError,
    cache_teachers,
    create_or_check,
    fingerprint_sha256,
    read_cache_json,
    sha256_file,
)
from cache.flow_codec import FLOW_BOUND, FLOW_CODEC
from cache.index import load_index, open_index
from cache.reader import source_status
from cache.storage import open_storage
from cache.lease import LEASE_SECONDS, LeaseLost
from cache.writer import remove_uncommitted_parts
from models.teacher import teacher_fingerprint
from pipeline.common.config import resolve_device
from pipeline.common.errors import ExtractError, ExtractInterrupted
from pipeline.common.progress import progress_bar
from pipeline.common.teacher_spec import parse_teacher, render_teacher
from pipeline.extract.decode import ffmpeg_version
from pipeline.extract.flow import FLOW_PARAMS, make_flow_fn
from pipeline.extract.job import ShardLock, StopRequest, held_locks, shard_from_env, shard_videos, sigint_ignored
from pipeline.extract.part_sink import config_dict, stored_codecs
from pipeline.extract.teachers import load_teachers
from pipeline.extract.videolist import find_videos
from pipeline.extract.worker import extract_videos, worker_main


def teacher_identity(teacher, device):
    """The teacher's part of a fingerprint: its description where it will run (CPU and GPU compute at
    different precision) and the sha256 of its weights file."""
    return teacher_fingerprint(teacher, device) | {"weights_sha256": sha256_file(teacher.weights_path)}


def more_teacher_identity(teacher, device):
    """A teacher after the first: its identity, and the crop of the central square it sees (the first's
    crop and size are the cache's preprocessing; a later one always takes its own)."""
    return teacher_identity(teacher, device) | {"crop": round(teacher.eval_crop, 4)}


def make_fingerprint(cfg, teachers):
    device = resolve_device(cfg.device)  # where the teachers will run, not where they were loaded to be fingerprinted
    teacher = teachers[0] if teachers else None
    more = {"more_teachers": [more_teacher_identity(t, device) for t in teachers[1:]]} if teachers[1:] else {}
    return more | {
        "teacher": teacher_identity(teacher, device) if teacher else {"name": "none"},
        "preprocessing": {"fps": cfg.fps, "height": cfg.height, "width": cfg.width,
                          "resize": "cover-scale + centre crop, SAR and rotation applied",
                          # the stored frames are downscaled from a decode at the teacher's size, so it
                          # changes their pixels even without a teacher
                          "teacher_size": cfg.teacher_size,
                          # the teacher's crop of the central square sets the decode size too
                          "teacher_crop": cfg.teacher_crop,
                          # without a teacher this does not change the cache: keep it out of its identity
                          "teacher_every": cfg.teacher_every if teacher else None},
        "flow": {"method": cfg.flow, "params": FLOW_PARAMS[cfg.flow], "bound": FLOW_BOUND, "codec": FLOW_CODEC,
                 "convention": "flow[t] = motion from frame t to t+1 in stored pixels; last frame 0"},
        # how frames and flow are stored: a lossy codec changes the values a student trains on
        "storage": storage_description(stored_codecs(cfg)),
        "ffmpeg_version": ffmpeg_version(),
        "vidistill_version": VIDISTILL_VERSION,
    }


NO_TEACHER_SIZE = 224  # the decode size of a frames-only cache (and of caches that did not record one)


def run_extract(cfg):
    """The whole of `cli.py extract`. Returns a summary dict.

    The first SIGINT or SIGTERM commits the videos finished so far and raises ExtractInterrupted
    (rerunning the same command resumes); a second one aborts at once."""
    stop = StopRequest()
    with stop.on_signals(announce=cfg.progress):
        return _run_extract(cfg, stop)


def _run_extract(cfg, stop):
    t0 = time.time()
    cfg = _validate(cfg)
    try:  # a missing bucket, no credentials or a refused request: said now, before any decoding
        storage = open_storage(cfg.cache)
        storage.check_access()
        # leases need conditional writes the store really honours (some S3-compatible stores ignore them)
        honoured, why = (True, None) if cfg.single_writer else storage.probe_conditional_writes()
    except CacheError as e:
        raise ExtractError(str(e)) from None
    if not honoured:
        raise ExtractError(f"{cfg.cache}: {why}; two jobs on one shard could not be kept apart - pass "
                           "--single-writer if only one job writes this cache")
    if cfg.teacher_pretrained:  # fetched once, here: every worker then loads the same local file
        from models.clip import resolve_pretrained
        teacher, weights = resolve_pretrained(cfg.teacher, cfg.teacher_pretrained)
        cfg = dataclasses.replace(cfg, teacher=teacher, teacher_weights=weights)
    shard_index, shard_count = cfg.shard
    unlisted = []
    videos = find_videos(cfg.videos, unlisted)
    teachers = load_teachers(cfg, "cpu")
    teacher = teachers[0] if teachers else None
    # 0: the first teacher's own input size and evaluation crop; without a teacher 224 and the whole
    # square (they set the decode size)
    cfg = dataclasses.replace(cfg, teacher_crop=cfg.teacher_crop or (teacher.eval_crop if teacher else 1.0),
                              teacher_size=cfg.teacher_size or (teacher.input_size if teacher else NO_TEACHER_SIZE))
    fingerprint = make_fingerprint(cfg, teachers)
    del teacher, teachers
    _prepare_cache(cfg, fingerprint)

    lock = ShardLock(cfg.cache, shard_index, shard_count, cfg.single_writer)
    try:
        stop.conditions.append(lambda: lock.lost)  # not renewable: stop, and its workers with it
        # what an earlier job of this shard left uncommitted is garbage: it can commit nothing any more
        remove_uncommitted_parts(cfg.cache, (shard_index, shard_count))
        mine = shard_videos(videos, shard_index, shard_count)
        todo, changed, vanished = _videos_to_do(cfg, mine, videos)
        summary = {"videos_found": len(videos), "unlisted_folders": unlisted, "shard": f"{shard_index}/{shard_count}",
                   "skipped": len(mine) - len(todo), "done": 0, "partial": 0, "failed": 0, "frames": 0,
                   "video_seconds": 0.0, "bytes_written": 0, "failures": [], "stage_seconds": {},
                   "changed": changed, "vanished": vanished, "notes": []}
        bar = progress_bar(total=len(todo), unit="video", desc="extract", disable=not cfg.progress)
        try:
            _run_workers(todo, cfg, _summary_reporter(summary, bar, cfg.fps, t0), stop, lock.fence)
        except LeaseLost as e:  # another job holds the shard now: what this one had not committed is its
            raise ExtractError(str(e)) from None
        except OSError as e:  # e.g. a full disk: committed parts stay valid, the part in flight is dropped
            raise ExtractError(f"{cfg.cache}: cannot write ({e.strerror or e}); the {summary['done'] + summary['failed']}"
                               " videos finished in this run are committed - free space and rerun to resume") from None
        except CacheError as e:  # an object store that kept failing after the retries: the same
            raise ExtractError(f"{e}; the {summary['done'] + summary['failed']} videos finished in this run are "
                               "committed - rerun to resume") from None
        finally:
            bar.close()
        if lock.lost:
            raise ExtractError(f"{cfg.cache}: this job's lease on shard {shard_index}/{shard_count} could not be "
                               f"renewed for {LEASE_SECONDS * 2 / 3:.0f} s (another job may take the shard over); it "
                               "stopped after committing what it had finished - rerun to resume")
        if stop():
            finished = summary["done"] + summary["partial"] + summary["failed"]
            raise ExtractInterrupted(
                f"interrupted ({signal.Signals(stop.signum or signal.SIGTERM).name}): the {finished} videos finished "
                f"in this run are committed to {cfg.cache}, {len(todo) - finished} are not; rerun the same command "
                "to resume", stop.signum or signal.SIGTERM)
    finally:
        lock.release()
    open_index(cfg.cache, warn=False)  # brings index.bin up to date with the parts committed
    summary["wall_seconds"] = time.time() - t0
    summary["cache"] = cfg.cache
    summary["failed_in_cache"] = _failed_in_cache(cfg.cache, mine)
    if cfg.strict and (summary["failed_in_cache"] or unlisted):
        summary["strict_failure"] = True
    return summary


def _validate(cfg):
    """Refuse bad settings before any work; returns cfg with its shard (index, count) filled in."""
    if cfg.teacher_every < 1:
        raise ExtractError("--teacher-every must be >= 1")
    if cfg.teacher_pretrained and (not cfg.teacher.startswith("clip:") or cfg.teacher_weights):
        raise ExtractError("--teacher-pretrained TAG is for a clip:ARCH teacher without --teacher-weights")
    if cfg.fps <= 0 or cfg.height < 8 or cfg.width < 8 or cfg.workers < 0:
        raise ExtractError(f"--fps must be > 0, --height and --width >= 8, --workers >= 1 or auto "
                           f"(got {cfg.fps}, {cfg.height}, {cfg.width}, {cfg.workers})")
    make_flow_fn(cfg.flow)  # an unknown or unavailable flow method fails before any work
    for what, codec, quality in (("frame", cfg.frame_codec, cfg.frame_quality), ("flow", cfg.flow_codec, cfg.flow_quality)):
        if codec not in CODECS or not 1 <= quality <= 100:
            raise ExtractError(f"--{what}-codec must be one of {', '.join(CODECS)} and --{what}-quality in 1..100 "
                               f"(got {codec!r}, {quality})")
    if cfg.part_videos < 1 or cfg.part_mb < 1:
        raise ExtractError(f"--part-videos and --part-mb must be >= 1 (got {cfg.part_videos}, {cfg.part_mb})")
    shard_index, shard_count = cfg.shard or shard_from_env()
    if not 0 <= shard_index < shard_count:
        raise ExtractError(f"shard {shard_index}/{shard_count}: index must be in [0, {shard_count})")
    # recorded in the cache as absolute paths: an evaluation run from elsewhere loads the same teacher
    weights = os.path.abspath(cfg.teacher_weights) if cfg.teacher_weights else None
    if cfg.teacher.startswith("clip:"):
        from models.clip import absolute_spec
        try:
            cfg = dataclasses.replace(cfg, teacher=absolute_spec(cfg.teacher))
        except ValueError as e:
            raise ExtractError(str(e)) from None
    parsed = [parse_teacher(text) for text in cfg.more_teachers]
    more = tuple(render_teacher(*p) for p in parsed)  # their files' paths absolute
    if more and cfg.teacher == "none":
        raise ExtractError("--teacher none cannot be combined with other teachers")
    specs = [cfg.teacher] + [spec for spec, _, _ in parsed]
    if len(set(specs)) < len(specs):  # distill and eval name a teacher by its spec
        raise ExtractError(f"--teacher: each teacher once ({', '.join(specs)})")
    return dataclasses.replace(cfg, shard=(shard_index, shard_count), teacher_weights=weights, more_teachers=more)


def _prepare_cache(cfg, fingerprint):
    """Create the cache, or check it was made with the same settings; --overwrite replaces one that was not."""
    try:
        create_or_check(cfg.cache, fingerprint, config_dict(cfg))
    except CacheError as e:
        if not cfg.overwrite:
            raise ExtractError(_teachers_differ(cfg, fingerprint) or str(e)) from None
        _remove_cache(cfg.cache)  # other settings and --overwrite: start anew
        create_or_check(cfg.cache, fingerprint, config_dict(cfg))


def _teachers_differ(cfg, fingerprint):
    """When a cache differs from this run in its teachers alone (one was added with --add-teacher):
    which ones to name, in one line."""
    try:
        meta = read_cache_json(cfg.cache)
    except CacheError:  # not created: the store refused (the caller's error says so)
        return None
    if fingerprint_sha256(meta["fingerprint"]) != fingerprint_sha256(fingerprint):  # more than the teachers differ
        return None
    names = [t["name"] for t in cache_teachers(meta["fingerprint"])]
    more = " ".join(f"--teacher {t}" for t in meta["config"].get("more_teachers", []))
    return (f"{cfg.cache} has teachers {', '.join(names)}; extract into it with all of them, in that order "
            f"(after the first: {more or 'none'})")


def _videos_to_do(cfg, mine, found):
    """(todo, changed, vanished): the shard's videos not yet recorded in a committed part (failed ones
    are, unless --retry-failed), plus those whose source changed since (another size or mtime: the file
    was replaced; the new record supersedes the old); the ids of changed sources; and the ids the
    cache holds that are no longer among the videos found (their frames stay in the cache)."""
    index, _ = load_index(cfg.cache)
    todo, changed = [], []
    for vid, path in mine:
        rec = index[vid][1] if vid in index else None
        if rec is None or (cfg.retry_failed and rec["status"] == "failed"):
            todo.append((vid, path))
        elif source_status(rec, path) == "changed":
            todo.append((vid, path))
            changed.append(vid)
    present = {vid for vid, _ in found}
    return todo, changed, sorted(vid for vid in index if vid not in present)


def _summary_reporter(summary, bar, fps, t0):
    """The report(msg) that extract_videos calls: adds each video record, committed part and stage
    timing to `summary`, and moves the progress bar."""

    def report(msg):
        if "note" in msg:  # a line for the user (the --workers auto choice)
            summary["notes"].append(msg["note"])
            return
        if "committed_bytes" in msg:
            summary["bytes_written"] += msg["committed_bytes"]
            return
        if "stage_seconds" in msg:  # summed over workers: CPU-seconds per stage, not wall time
            for k, v in msg["stage_seconds"].items():
                summary["stage_seconds"][k] = summary["stage_seconds"].get(k, 0.0) + v
            return
        status = msg["status"]
        summary["done" if status == "ok" else status] += 1
        if status == "failed":
            summary["failures"].append((msg["id"], msg["error"]))
        summary["frames"] += msg["frame_count"]
        summary["video_seconds"] += msg["frame_count"] / fps
        bar.update(1)
        bar.set_postfix(frames_per_s=f"{summary['frames'] / max(time.time() - t0, 1e-9):.0f}",
                        failed=summary["failed"])

    return report


def _failed_in_cache(cache, mine):
    """Failures of this shard recorded by this run or an earlier one (a resumed run skips those)."""
    index, _ = load_index(cache)
    return sum(1 for vid, _ in mine if vid in index and index[vid][1]["status"] == "failed")


def auto_workers(cores, gpus):
    """(processes, threads per process) for `--workers auto`, so that processes x threads = the cores.
    With GPUs the teacher is cheap and decoding + flow bound the job: one process per 2 cores, at most
    8 per GPU (on an H100 with 16 cores 8 processes ran 411 frames/s and 15 ran 250); on CPU the
    teacher runs in every process and wants several threads for its convolutions: one per 4 cores."""
    processes = max(1, min(cores // 2, 8 * gpus) if gpus else cores // 4)
    return processes, max(1, cores // processes)


def _run_workers(todo, cfg, report, stop, fence):
    tag_base = f"s{cfg.shard[0]}of{cfg.shard[1]}"
    if cfg.workers == 0:  # auto
        import torch
        cores, gpus = os.cpu_count() or 1, torch.cuda.device_count() if cfg.device != "cpu" else 0
        processes, threads = auto_workers(cores, gpus)
        report({"note": f"--workers auto: {processes} process(es) x {threads} thread(s) "
                        f"({cores} cores, {gpus or 'no'} GPU{'s' if gpus != 1 else ''})"})
        cfg = dataclasses.replace(cfg, workers=processes)
    workers = max(1, min(cfg.workers, len(todo)))
    if not todo or stop():
        return
    if workers == 1:
        extract_videos(todo, cfg, tag_base, report, fence, int(os.environ.get("LOCAL_RANK", 0)), stop)
        return
    ctx = mp.get_context("spawn")  # never fork a process that holds torch/zarr threads
    messages, stop_all = ctx.Queue(), ctx.Event()
    threads = max(1, (os.cpu_count() or 1) // workers)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    procs = [ctx.Process(target=worker_main, args=(todo[w::workers], cfg, f"{tag_base}w{w}", fence, messages,
                                                    threads, local_rank * workers + w, stop_all), daemon=True)
             for w in range(workers)]
    with sigint_ignored():  # inherited: a Ctrl-C while a worker imports torch must not kill it mid-start
        for p in procs:
            p.start()
    stop.children = procs
    running, errors, lost = workers, [], []
    while running:
        if stop() and not stop_all.is_set():
            stop_all.set()  # SIGTERM may reach this process alone (kill PID, a scheduler): pass it on
        try:
            msg = messages.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break  # a worker died without a word (e.g. OOM-killed); its part stays uncommitted
            continue
        if "worker_done" in msg or "worker_error" in msg or "worker_lost" in msg:
            running -= 1
            if "worker_error" in msg:
                errors.append(msg["traceback"])
            if "worker_lost" in msg:  # the shard is another job's now: the others stop too
                lost.append(msg["worker_lost"])
                stop_all.set()
        else:
            report(msg)
    for p in procs:
        p.join()
    if lost:
        raise LeaseLost(lost[0])
    if (errors or any(p.exitcode != 0 for p in procs)) and not stop():
        raise ExtractError("an extraction worker crashed; rerun the same command to resume. "
                           + (errors[0].strip().splitlines()[-1] if errors else "exit codes "
                              + str([p.exitcode for p in procs])))


def _remove_cache(cache_dir):
    storage = open_storage(cache_dir)
    if not storage.exists("cache.json") and storage.list():
        raise ExtractError(f"{cache_dir}: refusing to --overwrite a non-empty folder that is not a vidistill cache")
    busy = held_locks(cache_dir)
    if busy:
        raise ExtractError(f"{cache_dir}: refusing to --overwrite while other jobs extract into it "
                           f"({', '.join(f'{k} by {v}' for k, v in busy.items())})")
    storage.remove(recursive=True)
