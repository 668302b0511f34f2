"""Progress of long work: a live bar on a terminal, plain lines in a log file.

A job whose output goes to a file (a Slurm job, `cli.py demo > log 2>&1`) would otherwise collect every
frame of a carriage-return bar: a demo wrote 1 MB of them. There, a line every `LOG_EVERY` seconds and
one at the end (done/total, rate, ETA and the bar's own figures) say the same in a few hundred bytes.
"""
import sys
import time

LOG_EVERY = 30.0  # seconds between two lines of progress in a log file


def progress_bar(iterable=None, total=None, desc="", unit="it", initial=0, disable=False, stream=None):
    """tqdm's bar when `stream` (default stderr) is a terminal, else a LogProgress with the same calls
    (update, set_postfix, close, iteration, `n`)."""
    stream = stream or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not disable and stream.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)
    return LogProgress(iterable, total, desc, unit, initial, disable, stream)


class LogProgress:
    """A progress bar for files: `desc: done/total unit (pct), rate unit/s, ETA m:ss, postfix` every
    LOG_EVERY seconds and when it closes; nothing when disabled."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0, disable=False, stream=None,
                 every=LOG_EVERY, clock=time.monotonic):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = initial
        self.disable, self.stream, self.every, self.clock = disable, stream or sys.stderr, every, clock
        self.postfix = ""
        self.t0 = self.last = clock()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += n
        if self.clock() - self.last >= self.every:
            self._line()

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self):
        if not self.closed:
            self.closed = True
            self._line(final=True)

    def _line(self, final=False):
        self.last = now = self.clock()
        if self.disable:
            return
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f} %)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if final:
            parts.append(f"{_clock(elapsed)} elapsed")
        elif self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: " + ", ".join(parts), file=self.stream, flush=True)


def _clock(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
