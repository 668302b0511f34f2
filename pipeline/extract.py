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
import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from cache.fingerprint import (VIDISTILL_VERSION, CacheError, create_or_check, fingerprint_sha256, read_cache_json,
                               sha256_file)
from cache.flow_codec import FLOW_BOUND, FLOW_CODEC
from cache.reader import load_index, source_status
from cache.writer import PartWriter, remove_stale_parts
from models.teacher import load_teacher, teacher_fingerprint
from pipeline.config import resolve_device
from pipeline.decode import VIDEO_EXTENSIONS, DecodeError, VideoDecode, ffmpeg_version
from pipeline.flow import FLOW_PARAMS, FlowStream, make_flow_fn
from pipeline.locks import FileLock, LockBusy, is_held, lock_holder
from pipeline.videolist import LIST_EXTENSIONS, is_video_list, read_video_list


class ExtractError(Exception):
    """Bad arguments or input folder; the message is a one-line explanation."""


def shard_from_env():
    """(index, count) from torchrun (RANK/WORLD_SIZE) or a Slurm array, else (0, 1)."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def find_videos(root, unlisted=None):
    """Sorted [(video_id, path)] of candidate videos under root; ids are POSIX paths relative to root.

    Follows directory symlinks but never the same real directory twice (symlink loops terminate).
    Broken symlinks and unreadable files are still listed: extraction records why they failed.
    Folders that cannot be listed are appended to `unlisted` as (path, reason), never skipped silently.
    A .txt or .csv root is a list of video paths instead (pipeline/videolist.py: ids relative to the
    list's folder).
    """
    if not os.path.exists(root):
        raise ExtractError(f"{root}: video folder does not exist")
    if is_video_list(root):
        return _listed_videos(root)
    if not os.path.isdir(root):
        raise ExtractError(f"{root}: not a folder (pass the folder that contains the videos, or a "
                           f"{' or '.join(LIST_EXTENSIONS)} list of video paths)")
    found, seen_dirs = [], set()

    def cannot_list(err):
        if unlisted is not None:
            unlisted.append((err.filename, err.strerror or str(err)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=cannot_list, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    if not found:
        if unlisted:
            raise ExtractError(f"{unlisted[0][0]}: cannot list the folder ({unlisted[0][1]})")
        raise ExtractError(f"{root}: no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    return sorted(found)


def _listed_videos(list_path):
    """find_videos for a .txt / .csv list (pipeline/videolist.py): its duplicates, missing files and
    folders are reported on stderr, never fatal."""
    found, problems = read_video_list(list_path)
    for line in problems[:20]:
        print(f"note: {list_path}: {line}", file=sys.stderr)
    if len(problems) > 20:
        print(f"note: {list_path}: … and {len(problems) - 20} more", file=sys.stderr)
    if not found:
        raise ExtractError(f"{list_path}: no video paths in the list")
    return found


def teacher_identity(teacher, device):
    """The teacher's part of a fingerprint: its description where it will run (CPU and GPU compute at
    different precision) and the sha256 of its weights file."""
    return teacher_fingerprint(teacher, device) | {"weights_sha256": sha256_file(teacher.weights_path)}


def make_fingerprint(cfg, teacher):
    return {
        # where the teacher will run, not where it was loaded to be fingerprinted
        "teacher": teacher_identity(teacher, resolve_device(cfg.device)) if teacher else {"name": "none"},
        "preprocessing": {"fps": cfg.fps, "height": cfg.height, "width": cfg.width,
                          "resize": "cover-scale + centre crop, SAR and rotation applied",
                          # the stored frames are downscaled from a decode at the teacher's size, so it
                          # changes their pixels even without a teacher
                          "teacher_size": cfg.teacher_size,
                          # without a teacher this does not change the cache: keep it out of its identity
                          "teacher_every": cfg.teacher_every if teacher else None},
        "flow": {"method": cfg.flow, "params": FLOW_PARAMS[cfg.flow], "bound": FLOW_BOUND, "codec": FLOW_CODEC,
                 "convention": "flow[t] = motion from frame t to t+1 in stored pixels; last frame 0"},
        "ffmpeg_version": ffmpeg_version(),
        "vidistill_version": VIDISTILL_VERSION,
    }


# What the decode thread sends, in order: each video's batches, then its end or failure; done last.
@dataclasses.dataclass(frozen=True)
class DecodedBatch:
    idx: int  # into `videos`
    stored: np.ndarray  # uint8 [B,H,W,3]
    teacher_in: np.ndarray  # uint8 [B,T,T,3]
    flow_rows: np.ndarray  # quantised flow of the frames whose successor is known; None without flow


@dataclasses.dataclass(frozen=True)
class VideoEnd:
    idx: int
    info: object  # pipeline.decode.SourceInfo
    last_flow: np.ndarray  # the last frame's (zero) flow; None without flow


@dataclasses.dataclass(frozen=True)
class VideoFailed:
    idx: int
    reason: str  # recorded in the cache; frames already sent for this video are rolled back
    signalled: bool = False  # ffmpeg was stopped by a signal: an interruption, maybe not the video's fault


@dataclasses.dataclass(frozen=True)
class DecodeDone:
    busy_seconds: dict  # {"decode": s, "flow": s}


def _decode_ahead(videos, cfg, out_queue, stop):
    """Producer thread: decode videos in order and compute their flow, a bounded queue ahead of the
    teacher. Flow runs here because OpenCV releases the GIL: it overlaps with the teacher's work.
    The final message carries this thread's busy seconds: decoding (ffmpeg pipe + resize) and flow."""
    busy = {"decode": 0.0, "flow": 0.0}
    clock = time.perf_counter
    for idx, (vid, path) in enumerate(videos):
        try:
            dec = VideoDecode(path, fps=cfg.fps, height=cfg.height, width=cfg.width,
                              teacher_size=cfg.teacher_size, batch_frames=cfg.batch_frames,
                              stall_timeout=cfg.stall_timeout)
            flow = FlowStream(cfg.flow) if cfg.flow != "none" else None
            batches, t = iter(dec), clock()
            for stored, teacher_in in batches:
                t1 = clock()
                flow_rows = flow.push(stored) if flow else None
                busy["decode"], busy["flow"] = busy["decode"] + t1 - t, busy["flow"] + clock() - t1
                out_queue.put(DecodedBatch(idx, stored, teacher_in, flow_rows))
                if stop.is_set():
                    return
                t = clock()
            busy["decode"] += clock() - t
            out_queue.put(VideoEnd(idx, dec.info, flow.finish() if flow else None))
        except DecodeError as e:
            out_queue.put(VideoFailed(idx, str(e), e.signalled))
        except Exception as e:  # an ffmpeg or OS surprise must not take the whole job down
            out_queue.put(VideoFailed(idx, f"decode failed: {type(e).__name__}: {e}"))
        if stop.is_set():
            return
    out_queue.put(DecodeDone(busy))


def _source_record(vid, path):
    rec = {"id": vid, "path": os.path.abspath(path), "size": None, "mtime": None}
    try:
        st = os.stat(path)
        rec["size"], rec["mtime"] = st.st_size, st.st_mtime
    except OSError:
        pass
    return rec


def _append_rows(part, rows):  # runs on the write thread
    for name, value in rows:
        part.append(name, value)


class _PartSink:
    """Labels decoded batches with the teacher and writes them, with each video's record, into parts.

    Writes go through one thread, so parts are still written by exactly one writer, in order; a batch's
    write overlaps the teacher's work on the next, and at most one write is in flight.
    """

    def __init__(self, cfg, tag, teacher, seconds):
        self.cfg, self.tag, self.teacher, self.seconds = cfg, tag, teacher, seconds
        self.with_flow = make_flow_fn(cfg.flow) is not None
        self.attrs = {"vidistill_version": VIDISTILL_VERSION, "config": _config_dict(cfg),
                      "fingerprint_sha256": fingerprint_sha256(read_cache_json(cfg.cache)["fingerprint"])}
        self.write = ThreadPoolExecutor(max_workers=1)  # one thread: writes stay in submission order
        self.pending = None  # the last batch's write; waited on before the next, so at most one is in flight
        self.writer = None  # the open part, if any
        self.start = None  # the part's row counts where the current video began
        self.n_frames = self.n_teacher = 0  # the current video's, so far

    def _part(self):
        if self.writer is None:
            t = self.teacher
            self.writer = PartWriter(self.cfg.cache, self.tag, self.cfg.height, self.cfg.width, self.with_flow,
                                     t.num_classes if t else None, t.embed_dim if t else None)
        return self.writer

    def _wait_write(self, fn=None, *args):
        """Wait for the write in flight, then run fn(*args) on this thread; all of it is "wait_write"."""
        t = time.perf_counter()
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        result = fn(*args) if fn else None
        self.seconds["wait_write"] += time.perf_counter() - t
        return result

    def on_batch(self, msg):
        part = self._part()
        if self.n_frames == 0:
            self.start = self._wait_write(part.begin_video)
        pick = np.arange(self.n_frames, self.n_frames + len(msg.stored))
        pick = pick[pick % self.cfg.teacher_every == 0] if self.teacher else pick[:0]
        rows = [("frames", msg.stored)] + ([("flow", msg.flow_rows)] if self.with_flow else [])
        if len(pick):
            t = time.perf_counter()
            logits, embed = self.teacher.predict(msg.teacher_in[pick - self.n_frames])
            self.seconds["teacher"] += time.perf_counter() - t
            rows += [("teacher_frame", pick.astype(np.int32)), ("logits", logits), ("embed", embed)]
        self._wait_write()  # only now: the teacher ran while the previous batch was being written
        self.pending = self.write.submit(_append_rows, part, rows)
        self.n_frames += len(msg.stored)
        self.n_teacher += len(pick)

    def on_end(self, rec, info, last_flow):
        if self.with_flow:
            self._wait_write(self._part().append, "flow", last_flow)
        rec.update(status="partial" if info.warnings else "ok",
                   error="; ".join(info.warnings) or None,
                   src_container=info.container, src_codec=info.codec, src_width=info.width,
                   src_height=info.height, src_fps=info.fps, src_duration=info.duration,
                   rotation=info.rotation, frame_offset=self.start["frames"], frame_count=self.n_frames,
                   teacher_offset=self.start.get("logits", 0), teacher_count=self.n_teacher)
        self._add_record(rec)

    def discard_video(self):
        """Drop the frames of the video in progress (its decode broke, or the job is stopping)."""
        if self.n_frames:
            self._wait_write(self._part().rollback_video)
        self.n_frames = self.n_teacher = 0

    def on_failed(self, rec, reason):
        self.discard_video()  # the decode may have broken after some frames were already appended
        rec.update(status="failed", error=reason, frame_offset=0, frame_count=0,
                   teacher_offset=0, teacher_count=0)
        self._add_record(rec)

    def _add_record(self, rec):
        self._wait_write(self._part().add_record, rec)
        self.n_frames = self.n_teacher = 0

    def part_full(self):
        return len(self.writer.videos) >= self.cfg.part_videos

    def commit(self):
        """Commit the open part; returns its size in bytes."""
        committed = self._wait_write(self.writer.commit, self.attrs)
        self.writer = None
        return committed

    def close(self):
        """Stop the write thread and drop the part that was not committed."""
        if self.pending is not None:
            self.pending.exception()  # let an in-flight write finish before abandoning the part
        self.write.shutdown()
        if self.writer is not None:
            self.writer.abandon()


def _consume(items, videos, sink, report, seconds, stopping):
    """The teacher thread's loop: label and write decoded batches, record each finished video, commit
    full parts; returns when the decoder is done or the job is stopping."""
    clock = time.perf_counter
    while not stopping():
        t = clock()
        try:
            msg = items.get(timeout=0.2)  # wakes up now and then to see whether the job is stopping
        except queue.Empty:
            continue
        finally:
            seconds["wait_decode"] += clock() - t
        if isinstance(msg, DecodeDone):
            seconds.update(msg.busy_seconds)
            return
        if isinstance(msg, DecodedBatch):
            sink.on_batch(msg)
            continue
        # ffmpeg ended on a signal: if it is the one stopping this job (a terminal's Ctrl-C reaches
        # ffmpeg too, maybe before this process), the video is unfinished, not broken
        signalled = msg.info.signalled if isinstance(msg, VideoEnd) else msg.signalled
        if signalled and _stops_within(stopping, 1.0):
            return
        rec = _source_record(*videos[msg.idx])
        if isinstance(msg, VideoEnd):
            sink.on_end(rec, msg.info, msg.last_flow)
        else:  # VideoFailed
            sink.on_failed(rec, msg.reason)
        report(rec)
        if sink.part_full():
            report({"committed_bytes": sink.commit()})


def extract_videos(videos, cfg, tag, report, gpu_slot=0, stopping=lambda: False):
    """Extract `videos` [(id, path)] into parts of cfg.cache; report(record) after each video.

    Three threads overlap: decode+flow (producer), the teacher (this thread), and writing (one
    writer thread, so parts are still written by exactly one writer, in order). Each hand-over is
    bounded, so memory does not grow with the number or length of videos. Once stopping() is true
    (a SIGINT or SIGTERM), the videos finished so far are committed and the video in flight dropped.
    """
    if stopping():
        return
    device = resolve_device(cfg.device, gpu_slot)
    teacher = load_teacher(cfg.teacher, cfg.teacher_weights, device=device) if cfg.teacher != "none" else None
    # Where the time goes. This thread: "teacher", and "wait_decode" / "wait_write", the parts of the
    # other stages not hidden behind the teacher. The decode thread: "decode" and "flow", busy time.
    seconds = {"teacher": 0.0, "wait_decode": 0.0, "wait_write": 0.0}
    sink = _PartSink(cfg, tag, teacher, seconds)
    items = queue.Queue(maxsize=8)  # ~8 decode batches ahead: overlap without unbounded memory
    stop = threading.Event()
    producer = threading.Thread(target=_decode_ahead, args=(videos, cfg, items, stop), daemon=True)
    producer.start()
    try:
        _consume(items, videos, sink, report, seconds, stopping)
        sink.discard_video()  # stopping: the video in flight is redone by the rerun
        if sink.writer is not None and sink.writer.videos:  # stopping or not, finished videos are committed
            report({"committed_bytes": sink.commit()})
        report({"stage_seconds": seconds})
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on the full queue, so it sees `stop`
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass
        sink.close()


def _stops_within(stopping, seconds):
    deadline = time.monotonic() + seconds
    while not stopping() and time.monotonic() < deadline:
        time.sleep(0.02)
    return stopping()


def _config_dict(cfg):
    d = dataclasses.asdict(cfg)
    d["shard"] = list(d["shard"]) if d["shard"] else None
    return d


def _worker_main(videos, cfg, tag, messages, threads, gpu_slot, stop_all):
    """Entry point of one --workers process: same code path, reports go through a queue. It stops
    (committing what it finished) on its own SIGINT/SIGTERM or when the parent sets stop_all."""
    torch.set_num_threads(threads)
    stop = StopRequest(forwarded=stop_all)
    with stop.on_signals(announce=False):
        try:
            extract_videos(videos, cfg, tag, messages.put, gpu_slot, stop)
            messages.put({"worker_done": tag})
        except BaseException:
            messages.put({"worker_error": tag, "traceback": traceback.format_exc()})


class ExtractInterrupted(ExtractError):
    """A SIGINT or SIGTERM stopped the job after it committed the videos it had finished."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """Set by the first SIGINT or SIGTERM: the job commits the videos it has finished, then stops. A
    second signal aborts at once, as a kill would (the part in flight is dropped; a rerun redoes it).

    Called, it says whether to stop: a signal to this process, or (in a --workers process) the
    parent's request forwarded through an mp.Event.
    """

    def __init__(self, forwarded=None):
        self.signum = None
        self.forwarded = forwarded
        self.children = []  # worker processes, killed on a second signal

    def __call__(self):
        return self.signum is not None or (self.forwarded is not None and self.forwarded.is_set())

    @contextlib.contextmanager
    def on_signals(self, announce=True):
        """Handle SIGINT and SIGTERM this way inside the block (main thread only; elsewhere as before)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signum is not None:
                for p in self.children:
                    p.kill()
                if announce:
                    os.write(2, f"\n{name} again: aborted; the part in flight is dropped, rerun the same "
                                "command to resume\n".encode())
                os._exit(128 + signum)
            self.signum = signum
            if announce:  # os.write: a handler must not re-enter a buffered stream (tqdm writes to stderr)
                os.write(2, f"\n{name}: committing the videos finished so far, then stopping (send it again "
                            "to abort at once)\n".encode())

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, signal.SIG_DFL if h is None else h)


class _ShardLock:
    """An flock per shard: two jobs on the same shard of a cache never run at once."""

    def __init__(self, cache_dir, index, count):
        locks = os.path.join(cache_dir, "locks")
        try:
            self.lock = FileLock(os.path.join(locks, f"shard-{index}-of-{count}.lock"))
        except LockBusy as e:
            raise ExtractError(f"{cache_dir}: shard {index}/{count} is being extracted by another process "
                               f"({e.holder}); wait for it to finish or pick another --shard") from None
        # jobs that split the videos another way would take some of ours too
        for other in held_locks(cache_dir):
            if not other.endswith(f"-of-{count}.lock"):
                self.lock.release()
                raise ExtractError(f"{cache_dir}: a job with another shard count is running ({other}, "
                                   f"{lock_holder(os.path.join(locks, other))}); every job on one cache must use "
                                   "the same --shard I/N") from None

    def release(self):
        self.lock.release()


def held_locks(cache_dir):
    """Names of the shard locks some live process holds (a lock file alone means nothing: flock
    is released when its holder dies, however it dies)."""
    locks = os.path.join(cache_dir, "locks")
    return [name for name in (sorted(os.listdir(locks)) if os.path.isdir(locks) else [])
            if is_held(os.path.join(locks, name))]


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
    if cfg.teacher_pretrained:  # fetched once, here: every worker then loads the same local file
        from models.clip import resolve_pretrained
        teacher, weights = resolve_pretrained(cfg.teacher, cfg.teacher_pretrained)
        cfg = dataclasses.replace(cfg, teacher=teacher, teacher_weights=weights)
    shard_index, shard_count = cfg.shard
    unlisted = []
    videos = find_videos(cfg.videos, unlisted)
    teacher = load_teacher(cfg.teacher, cfg.teacher_weights, device="cpu") if cfg.teacher != "none" else None
    fingerprint = make_fingerprint(cfg, teacher)
    del teacher
    _prepare_cache(cfg, fingerprint)

    lock = _ShardLock(cfg.cache, shard_index, shard_count)
    try:
        remove_stale_parts(cfg.cache)
        mine = videos[shard_index::shard_count]
        todo, changed, vanished = _videos_to_do(cfg, mine, videos)
        summary = {"videos_found": len(videos), "unlisted_folders": unlisted, "shard": f"{shard_index}/{shard_count}",
                   "skipped": len(mine) - len(todo), "done": 0, "partial": 0, "failed": 0, "frames": 0,
                   "video_seconds": 0.0, "bytes_written": 0, "failures": [], "stage_seconds": {},
                   "changed": changed, "vanished": vanished}
        bar = tqdm(total=len(todo), unit="video", desc="extract", disable=not cfg.progress, dynamic_ncols=True)
        try:
            _run_workers(todo, cfg, _summary_reporter(summary, bar, cfg.fps, t0), stop)
        except OSError as e:  # e.g. a full disk: committed parts stay valid, the part in flight is dropped
            raise ExtractError(f"{cfg.cache}: cannot write ({e.strerror or e}); the {summary['done'] + summary['failed']}"
                               " videos finished in this run are committed - free space and rerun to resume") from None
        finally:
            bar.close()
        if stop():
            finished = summary["done"] + summary["partial"] + summary["failed"]
            raise ExtractInterrupted(
                f"interrupted ({signal.Signals(stop.signum or signal.SIGTERM).name}): the {finished} videos finished "
                f"in this run are committed to {cfg.cache}, {len(todo) - finished} are not; rerun the same command "
                "to resume", stop.signum or signal.SIGTERM)
    finally:
        lock.release()
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
    if cfg.fps <= 0 or cfg.height < 8 or cfg.width < 8 or cfg.workers < 1:
        raise ExtractError(f"--fps must be > 0, --height and --width >= 8, --workers >= 1 "
                           f"(got {cfg.fps}, {cfg.height}, {cfg.width}, {cfg.workers})")
    make_flow_fn(cfg.flow)  # an unknown or unavailable flow method fails before any work
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
    return dataclasses.replace(cfg, shard=(shard_index, shard_count), teacher_weights=weights)


def _prepare_cache(cfg, fingerprint):
    """Create the cache, or check it was made with the same settings; --overwrite replaces one that was not."""
    try:
        create_or_check(cfg.cache, fingerprint, _config_dict(cfg))
    except CacheError as e:
        if not cfg.overwrite:
            raise ExtractError(str(e)) from None
        _remove_cache(cfg.cache)  # other settings and --overwrite: start anew
        create_or_check(cfg.cache, fingerprint, _config_dict(cfg))


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


def _run_workers(todo, cfg, report, stop):
    tag_base = f"s{cfg.shard[0]}of{cfg.shard[1]}"
    workers = max(1, min(cfg.workers, len(todo)))
    if not todo or stop():
        return
    if workers == 1:
        extract_videos(todo, cfg, tag_base, report, int(os.environ.get("LOCAL_RANK", 0)), stop)
        return
    ctx = mp.get_context("spawn")  # never fork a process that holds torch/zarr threads
    messages, stop_all = ctx.Queue(), ctx.Event()
    threads = max(1, (os.cpu_count() or 1) // workers)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    procs = [ctx.Process(target=_worker_main, args=(todo[w::workers], cfg, f"{tag_base}w{w}", messages, threads,
                                                    local_rank * workers + w, stop_all), daemon=True)
             for w in range(workers)]
    with _sigint_ignored():  # inherited: a Ctrl-C while a worker imports torch must not kill it mid-start
        for p in procs:
            p.start()
    stop.children = procs
    running, errors = workers, []
    while running:
        if stop() and not stop_all.is_set():
            stop_all.set()  # SIGTERM may reach this process alone (kill PID, a scheduler): pass it on
        try:
            msg = messages.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break  # a worker died without a word (e.g. OOM-killed); its part stays uncommitted
            continue
        if "worker_done" in msg or "worker_error" in msg:
            running -= 1
            if "worker_error" in msg:
                errors.append(msg["traceback"])
        else:
            report(msg)
    for p in procs:
        p.join()
    if (errors or any(p.exitcode != 0 for p in procs)) and not stop():
        raise ExtractError("an extraction worker crashed; rerun the same command to resume. "
                           + (errors[0].strip().splitlines()[-1] if errors else "exit codes "
                              + str([p.exitcode for p in procs])))


@contextlib.contextmanager
def _sigint_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def _remove_cache(cache_dir):
    import shutil
    if not os.path.exists(os.path.join(cache_dir, "cache.json")) and os.listdir(cache_dir):
        raise ExtractError(f"{cache_dir}: refusing to --overwrite a non-empty folder that is not a vidistill cache")
    busy = held_locks(cache_dir)
    if busy:
        raise ExtractError(f"{cache_dir}: refusing to --overwrite while other jobs extract into it ({', '.join(busy)})")
    shutil.rmtree(cache_dir)
