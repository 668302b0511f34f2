"""One extraction process: a decode thread (ffmpeg + flow) a bounded queue ahead of the teacher, the
teacher on this thread, and one write thread into parts (pipeline/extract/part_sink.py). `--workers`
runs several of these as spawned processes."""
import dataclasses
import queue
import threading
import time
import traceback

import numpy as np
import torch

from cache.lease import LeaseLost
from pipeline.common.config import resolve_device
from pipeline.extract.decode import DecodeError, VideoDecode
from pipeline.extract.flow import FlowStream
from pipeline.extract.job import StopRequest
from pipeline.extract.part_sink import PartSink, source_record
from pipeline.extract.teachers import load_teachers


# What the decode thread sends, in order: each video's batches, then its end or failure; done last.
@dataclasses.dataclass(frozen=True)
class DecodedBatch:
    idx: int  # into `videos`
    stored: np.ndarray  # uint8 [B,H,W,3]
    teacher_in: list  # uint8 [B,T,T,3] per teacher, each at its own size
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


def _decode_ahead(videos, cfg, more_views, out_queue, stop):
    """Producer thread: decode videos in order and compute their flow, a bounded queue ahead of the
    teacher. Flow runs here because OpenCV releases the GIL: it overlaps with the teacher's work.
    The final message carries this thread's busy seconds: decoding (ffmpeg pipe + resize) and flow.
    more_views: (input size, crop) of each teacher after the first, cut from the same decode."""
    busy = {"decode": 0.0, "flow": 0.0}
    clock = time.perf_counter

    for idx, (vid, path) in enumerate(videos):
        try:
            dec = VideoDecode(path, fps=cfg.fps, height=cfg.height, width=cfg.width,
                              teacher_size=cfg.teacher_size, teacher_crop=cfg.teacher_crop, batch_frames=cfg.batch_frames,
                              stall_timeout=cfg.stall_timeout, more_teachers=more_views)
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
        if signalled and stops_within(stopping, 1.0):
            return
        rec = source_record(*videos[msg.idx])
        if isinstance(msg, VideoEnd):
            sink.on_end(rec, msg.info, msg.last_flow)
        else:  # VideoFailed
            sink.on_failed(rec, msg.reason)
        report(rec)
        if sink.part_full():
            report({"committed_bytes": sink.commit()})


def extract_videos(videos, cfg, tag, report, fence, gpu_slot=0, stopping=lambda: False):
    """Extract `videos` [(id, path)] into parts of cfg.cache; report(record) after each video.

    Three threads overlap: decode+flow (producer), the teacher (this thread), and writing (one
    writer thread, so parts are still written by exactly one writer, in order). Each hand-over is
    bounded, so memory does not grow with the number or length of videos. Once stopping() is true
    (a SIGINT or SIGTERM), the videos finished so far are committed and the video in flight dropped.
    """
    if stopping():
        return
    device = resolve_device(cfg.device, gpu_slot)
    teachers = load_teachers(cfg, device)
    # Where the time goes. This thread: "teacher", and "wait_decode" / "wait_write", the parts of the
    # other stages not hidden behind the teacher. The decode thread: "decode" and "flow", busy time.
    seconds = {"teacher": 0.0, "wait_decode": 0.0, "wait_write": 0.0}
    sink = PartSink(cfg, tag, teachers, seconds, fence)
    items = queue.Queue(maxsize=8)  # ~8 decode batches ahead: overlap without unbounded memory
    stop = threading.Event()
    more_views = [(t.input_size, t.eval_crop) for t in teachers[1:]]
    producer = threading.Thread(target=_decode_ahead, args=(videos, cfg, more_views, items, stop), daemon=True)
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


def stops_within(stopping, seconds):
    deadline = time.monotonic() + seconds
    while not stopping() and time.monotonic() < deadline:
        time.sleep(0.02)
    return stopping()


def worker_main(videos, cfg, tag, fence, messages, threads, gpu_slot, stop_all):
    """Entry point of one --workers process: same code path, reports go through a queue. It stops
    (committing what it finished) on its own SIGINT/SIGTERM or when the parent sets stop_all. Its
    commits go through its own copy of the job's fence: each checks the shard's lease itself."""
    torch.set_num_threads(threads)
    stop = StopRequest(forwarded=stop_all)
    with stop.on_signals(announce=False):
        try:
            extract_videos(videos, cfg, tag, messages.put, fence, gpu_slot, stop)
            messages.put({"worker_done": tag})
        except LeaseLost as e:
            messages.put({"worker_lost": str(e)})
        except BaseException:
            messages.put({"worker_error": tag, "traceback": traceback.format_exc()})
