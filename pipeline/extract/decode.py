"""Decode a video once with ffmpeg: resample fps, scale, crop, rgb24 frames out of one pipe.

One ffmpeg process per video does the expensive work (demux, decode, fps resampling, SAR and
rotation correction, scaling). It outputs frames at a "cover" size that has the stored frame's aspect
ratio and a short side large enough for the teacher; in-process we derive the small stored frame
(INTER_AREA downscale) and the teacher's square centre crop from that one decode, so the teacher never
sees frames upsampled from the small stored ones.
"""
import math
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import ffmpeg
import numpy as np

# Probing each file is the final word (a .txt is never tried, a broken .mp4 is reported);
# the extension list only decides which files are candidates.
VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv", ".ogg", ".flv",
    ".wmv", ".asf", ".3gp", ".3g2", ".ts", ".mts", ".m2ts", ".vob", ".divx", ".f4v", ".mxf", ".gif",
}

# Demuxers that mean "this is a picture, not a video", e.g. a JPEG renamed to .mp4.
_IMAGE_DEMUXER = re.compile(r"(_pipe|^image2|^apng|^webp)")


@lru_cache(maxsize=1)
def ffmpeg_binary():
    """System ffmpeg if present, else the static binary inside the imageio-ffmpeg wheel."""
    system = shutil.which("ffmpeg")
    if system:
        return system
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


@lru_cache(maxsize=1)
def ffmpeg_version():
    out = subprocess.run([ffmpeg_binary(), "-version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


class DecodeError(Exception):
    """A video that cannot be decoded; str(e) is the specific reason recorded in the cache.
    `signalled`: ffmpeg was stopped by a signal it did not get from us (e.g. the terminal's Ctrl-C)."""

    def __init__(self, reason, signalled=False):
        super().__init__(reason)
        self.signalled = signalled


@dataclass
class SourceInfo:
    """What ffmpeg reported about the source (parsed from its log; fields stay None if absent)."""
    container: str = None
    codec: str = None
    width: int = None
    height: int = None
    fps: float = None
    duration: float = None
    rotation: float = 0.0
    warnings: list = field(default_factory=list)
    signalled: bool = False  # ffmpeg ended on a signal (SIGINT/SIGTERM sent to the job), not at the end of the file


def cover_size(height, width, teacher_size, teacher_crop=1.0):
    """(H, W) of the decoded frame: the stored aspect ratio, short side >= both consumers' needs (the
    teacher's crop of the central square is at least teacher_size: it is never upsampled)."""
    short = max(math.ceil(teacher_size / teacher_crop), min(height, width))
    if height <= width:
        return short, int(round(short * width / height))
    return int(round(short * height / width)), short


def split_views(decoded, height, width, teacher_size, teacher_crop=1.0, more_teachers=()):
    """Decoded uint8 [B,Hc,Wc,3] -> (stored [B,H,W,3], [teacher [B,T,T,3], ...]) from the same pixels.
    A teacher sees the centre `teacher_crop` of the central square (as its own evaluation crops an
    image), resized to teacher_size; more_teachers ((size, crop), ...) are cut from the same decode, so
    several teachers cost one (the decode is sized for the first; a later one may be upsampled a little)."""
    b, hc, wc, _ = decoded.shape
    if (hc, wc) == (height, width):
        stored = decoded
    else:
        stored = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in decoded])
    teachers = [_teacher_view(decoded, size, crop) for size, crop in ((teacher_size, teacher_crop), *more_teachers)]
    return np.ascontiguousarray(stored), teachers


def _teacher_view(decoded, size, crop):
    hc, wc = decoded.shape[1:3]
    side = int(round(min(hc, wc) * crop))
    top, left = (hc - side) // 2, (wc - side) // 2
    teacher = decoded[:, top:top + side, left:left + side]
    if side != size:
        teacher = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in teacher])
    return np.ascontiguousarray(teacher)


def _parse_log(lines):
    info = SourceInfo()
    for line in lines:
        m = re.match(r"Input #0, ([^,]+(?:,[^,\s]+)*), from", line)
        if m and info.container is None:
            info.container = m.group(1)
        m = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", line)
        if m and info.duration is None:
            h, mnt, s = m.groups()
            info.duration = int(h) * 3600 + int(mnt) * 60 + float(s)
        if "Video:" in line and "Stream #0:" in line and info.codec is None:
            m = re.search(r"Video: (\w+)", line)
            info.codec = m.group(1) if m else None
            m = re.search(r", (\d{2,5})x(\d{2,5})", line)
            if m:
                info.width, info.height = int(m.group(1)), int(m.group(2))
            m = re.search(r", ([\d.]+) (?:fps|tbr)", line)
            if m:
                info.fps = float(m.group(1))
        m = re.search(r"rotation of (-?[\d.]+) degrees", line)
        if m:
            info.rotation = float(m.group(1))
    return info


def _failure_reason(lines, returncode):
    """Turn ffmpeg's log into one specific, useful reason."""
    text = "\n".join(lines)
    checks = [
        ("moov atom not found", "truncated or incomplete MP4 (moov atom not found)"),
        ("matches no streams", "no video stream (audio-only or data file)"),
        ("does not contain any stream", "no video stream (audio-only or data file)"),
        ("partial file", "truncated file (the data ends early)"),
        ("Invalid data found when processing input", "not a decodable media file (invalid data)"),
        ("Permission denied", "permission denied"),
        ("No such file or directory", "file not found"),
        ("End of file", "truncated file (unexpected end of file)"),
    ]
    for needle, reason in checks:
        if needle in text:
            return reason
    last = next((l for l in reversed(lines) if l.strip()), "no output")
    return f"ffmpeg failed (exit {returncode}): {last.strip()[:200]}"


def _has_mp4_header(path):
    """Whether the file starts like an ISO media file: a box whose type is ftyp (or an old QuickTime
    moov/mdat/wide/free box)."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
    except OSError:
        return False


def _check_readable(path):
    """Raise DecodeError for what is wrong before ffmpeg even starts: missing, empty, unreadable."""
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            raise DecodeError(f"broken symbolic link (target {os.readlink(path)!r} is missing)") from None
        raise DecodeError(f"cannot stat file ({e.strerror})") from None
    if st.st_size == 0 and stat.S_ISREG(st.st_mode):  # FIFOs report 0 too; the watchdog covers them
        raise DecodeError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DecodeError("permission denied")


def _ffmpeg_args(path, fps, height, width, teacher_size, teacher_crop):
    """The ffmpeg command line that writes rgb24 frames at the cover size to stdout."""
    hc, wc = cover_size(height, width, teacher_size, teacher_crop)
    # SAR first (anamorphic sources), then cover-scale and centre-crop to the fixed size.
    # ffmpeg applies rotation metadata itself (autorotate is on by default).
    stream = (ffmpeg.input(path)["v:0"]
              .filter("fps", fps=fps)
              .filter("scale", "trunc(iw*sar/2)*2", "ih")
              .filter("setsar", 1)
              .filter("scale", wc, hc, force_original_aspect_ratio="increase")
              .filter("crop", wc, hc))
    return (stream.output("pipe:", format="rawvideo", pix_fmt="rgb24")
            .global_args("-nostdin", "-hide_banner", "-nostats", "-loglevel", "info")
            .compile(cmd=ffmpeg_binary()))


class _FfmpegPipe:
    """A running ffmpeg: its log drained into `log`, a watchdog that kills it if it stalls.

    A stall is stall_timeout seconds without bytes while we wait on ffmpeg; between
    pause_watchdog() and resume_watchdog() the consumer has the frames, and that time is no stall.
    """

    def __init__(self, args, stall_timeout):
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.stall_timeout = stall_timeout
        self.log = []
        self.timed_out = threading.Event()
        self.last_progress = time.monotonic()  # None while the watchdog is paused
        self.threads = [threading.Thread(target=self._drain_stderr, daemon=True),
                        threading.Thread(target=self._watchdog, daemon=True)]
        for t in self.threads:
            t.start()

    def _drain_stderr(self):  # ffmpeg blocks if nobody reads its log
        for raw in self.proc.stderr:
            self.log.append(raw.decode("utf-8", "replace").rstrip())

    def _watchdog(self):  # a decoder that stops producing bytes is killed, never waited on forever
        while self.proc.poll() is None:
            since = self.last_progress
            if since is not None and time.monotonic() - since > self.stall_timeout:
                self.timed_out.set()
                self.proc.kill()
                return
            time.sleep(0.2)

    def read(self, n_bytes):
        """Up to n_bytes of frames; fewer only at the end of the output."""
        buf = self.proc.stdout.read(n_bytes)
        self.last_progress = time.monotonic()
        return buf

    def pause_watchdog(self):
        self.last_progress = None

    def resume_watchdog(self):
        self.last_progress = time.monotonic()

    def wait(self):
        """ffmpeg's exit code, once it has exited and its whole log is read."""
        returncode = self.proc.wait()
        for t in self.threads:
            t.join(timeout=5)
        return returncode

    def close(self):
        if self.proc.poll() is None:  # the consumer stopped early: do not leave ffmpeg running
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def decode_video(path, fps, height, width, teacher_size, teacher_crop=1.0, batch_frames=32, stall_timeout=60.0,
                 more_teachers=()):
    """Yield (stored, [teacher, ...]) uint8 batches for one video (split_views); returns SourceInfo via
    StopIteration.

    Use through `VideoDecode`, which keeps the SourceInfo. Raises DecodeError with a specific reason
    when nothing can be decoded; a video that breaks midway yields what decoded and records a warning.
    """
    _check_readable(path)
    hc, wc = cover_size(height, width, teacher_size, teacher_crop)
    pipe = _FfmpegPipe(_ffmpeg_args(path, fps, height, width, teacher_size, teacher_crop), stall_timeout)
    frame_bytes = hc * wc * 3
    n_frames = 0
    try:
        while True:
            buf = pipe.read(frame_bytes * batch_frames)
            n = len(buf) // frame_bytes
            if n:
                decoded = np.frombuffer(buf, np.uint8, n * frame_bytes).reshape(n, hc, wc, 3)
                n_frames += n
                views = split_views(decoded, height, width, teacher_size, teacher_crop, more_teachers)
                pipe.pause_watchdog()  # the consumer's time (teacher, flow, a full queue) is no stall
                yield views
                pipe.resume_watchdog()
            if len(buf) < frame_bytes * batch_frames:
                break
        returncode = pipe.wait()
    finally:
        pipe.close()
    return _finish_info(pipe.log, returncode, n_frames, pipe.timed_out.is_set(), stall_timeout, path)


def _finish_info(log, returncode, n_frames, timed_out, stall_timeout, path):
    """SourceInfo from ffmpeg's log, with warnings for a partial decode; DecodeError if nothing decoded."""
    info = _parse_log(log)
    # killed by a signal (negative code), or ffmpeg's own handler stopping it early; the watchdog's kill is a stall
    info.signalled = not timed_out and (returncode < 0 or any("received signal" in l for l in log))
    if timed_out:
        reason = f"decode stalled for {stall_timeout:.0f}s and was killed"
        if n_frames == 0:
            raise DecodeError(reason)
        info.warnings.append(reason + f"; kept {n_frames} frames")
    if info.container and _IMAGE_DEMUXER.search(info.container):
        raise DecodeError(f"still image ({info.container}), not a video")
    if n_frames == 0:
        if returncode != 0:
            reason = _failure_reason(log, returncode)
            if "moov atom" in reason and not _has_mp4_header(path):  # ffmpeg guessed mp4 from the name
                reason = "not a video file (no MP4/MOV header: random or corrupt data)"
            raise DecodeError(reason, info.signalled)
        raise DecodeError("no decodable video frames")
    if returncode != 0 and not timed_out:
        info.warnings.append(f"decoded {n_frames} frames, then: {_failure_reason(log, returncode)}")
    elif any("Error" in l or "error while decoding" in l for l in log):
        errors = [l for l in log if "rror" in l]
        info.warnings.append(f"decoder reported {len(errors)} error(s), e.g. {errors[0].strip()[:160]}")
    return info


class VideoDecode:
    """Iterate (stored, [teacher, ...]) batches of one video; `.info` holds the SourceInfo afterwards."""

    def __init__(self, path, **kwargs):
        self._gen = decode_video(path, **kwargs)
        self.info = None

    def __iter__(self):
        self.info = yield from self._gen


def write_video(path, frames, fps, codec="libx264", pix_fmt="yuv420p", crf=18, extra_args=()):
    """Encode uint8 RGB frames [T,H,W,3] to a real compressed video file with ffmpeg.

    Used by the synthetic benchmark and the tests; extra_args go before the output path
    (e.g. ["-movflags", "+faststart"]).
    """
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    t, h, w, _ = frames.shape
    args = [ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:",
            "-c:v", codec, "-pix_fmt", pix_fmt]
    if codec in ("libx264", "libx264rgb"):
        args += ["-crf", str(crf), "-preset", "veryfast"]
    else:
        args += ["-q:v", "3"]
    args += list(extra_args) + [str(path)]
    out = subprocess.run(args, input=frames.tobytes(), capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path}: {out.stderr.decode(errors='replace').strip()[-300:]}")
