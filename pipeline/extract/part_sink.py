"""Where decoded batches go: the teacher labels them and one write thread appends them, with each
video's record, to the open part; a video that breaks is rolled back, a full part is committed."""
import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cache.fingerprint import VIDISTILL_VERSION, CacheError, fingerprint_sha256, read_cache_json, teacher_array
from cache.writer import PartWriter
from pipeline.extract.flow import make_flow_fn


def source_record(vid, path):
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


class PartSink:
    """Labels decoded batches with the teachers and writes them, with each video's record, into parts.

    Writes go through one thread, so parts are still written by exactly one writer, in order; a batch's
    write overlaps the teacher's work on the next, and at most one write is in flight.
    """

    def __init__(self, cfg, tag, teachers, seconds, fence):
        self.cfg, self.tag, self.teachers, self.seconds = cfg, tag, teachers, seconds
        self.fence = fence  # every commit goes through it (cache/lease.py): a lost shard commits nothing
        self.with_flow = make_flow_fn(cfg.flow) is not None
        self.attrs = {"vidistill_version": VIDISTILL_VERSION, "config": config_dict(cfg),
                      "fingerprint_sha256": fingerprint_sha256(read_cache_json(cfg.cache)["fingerprint"])}
        self.write = ThreadPoolExecutor(max_workers=1)  # one thread: writes stay in submission order
        self.pending = None  # the last batch's write; waited on before the next, so at most one is in flight
        self.writer = None  # the open part, if any
        self.start = None  # the part's row counts where the current video began
        self.n_frames = self.n_teacher = 0  # the current video's, so far

    def _part(self):
        if self.writer is None:
            dims = [(t.num_classes, t.embed_dim) for t in self.teachers] or [(None, None)]
            self.writer = PartWriter(self.cfg.cache, self.tag, self.cfg.height, self.cfg.width, self.with_flow,
                                     *dims[0], stored_codecs(self.cfg), more_teachers=dims[1:])
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
        pick = pick[pick % self.cfg.teacher_every == 0] if self.teachers else pick[:0]
        rows = [("frames", msg.stored)] + ([("flow", msg.flow_rows)] if self.with_flow else [])
        if len(pick):
            rows.append(("teacher_frame", pick.astype(np.int32)))
            for slot, (teacher, teacher_in) in enumerate(zip(self.teachers, msg.teacher_in)):
                t = time.perf_counter()
                logits, embed = teacher.predict(teacher_in[pick - self.n_frames])
                self.seconds["teacher"] += time.perf_counter() - t
                rows += [(teacher_array("logits", slot), logits), (teacher_array("embed", slot), embed)]
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
        stored = sum(a.stored_bytes for a in self.writer.arrays.values())
        return len(self.writer.videos) >= self.cfg.part_videos or stored >= self.cfg.part_mb << 20

    def commit(self):
        """Commit the open part; returns its size in bytes."""
        committed = self._wait_write(self.writer.commit, self.attrs, self.fence)
        self.writer = None
        return committed

    def close(self):
        """Stop the write thread and drop the part that was not committed (one whose commit was tried
        stays: the writer keeps it, see PartWriter.commit)."""
        if self.pending is not None:
            self.pending.exception()  # let an in-flight write finish before abandoning the part
        self.write.shutdown()
        if self.writer is not None:
            try:
                self.writer.abandon()
            except (OSError, CacheError):  # the store is failing: the next run of this shard deletes it
                pass


def stored_codecs(cfg):
    """{array: (codec, quality)} of the frames and flow (cache/codecs.py), as the fingerprint records them."""
    return {"frames": (cfg.frame_codec, cfg.frame_quality), "flow": (cfg.flow_codec, cfg.flow_quality)}


def config_dict(cfg):
    d = dataclasses.asdict(cfg)
    d["shard"] = list(d["shard"]) if d["shard"] else None
    return d
