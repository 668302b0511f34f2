"""flock-based locks on files, for jobs that must not run twice on one folder (extract shards, a
distill run folder) and for short read-modify-write sections (eval's results.json, the feature index).

flock is released by the kernel when its holder dies, however it dies, so a lock file left on disk
means nothing by itself: only a held lock refuses. The holder writes who it is into the file, so a
refusal can name it. Torch-free.
"""
import datetime
import fcntl
import os
import socket


class LockBusy(Exception):
    """Another live process holds the lock; `holder` says who (pid, host, since when)."""

    def __init__(self, path, holder):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class LockError(Exception):
    """The lock file cannot be made or opened (a read-only folder, another owner's): one line naming it."""


class FileLock:
    """An exclusive flock on `path` (created if needed), held until release() or process exit.

    blocking=False raises LockBusy at once when another process holds it; blocking=True waits (for
    short critical sections). Two FileLocks on one path conflict even inside one process.
    """

    def __init__(self, path, blocking=False):
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a+")
        except OSError as e:
            raise LockError(f"{path}: cannot create a lock file here ({e.strerror or e})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            self.file.close()
            raise LockBusy(path, lock_holder(path)) from None
        since = datetime.datetime.now().isoformat(timespec="seconds")
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}")
        self.file.flush()

    def release(self):
        if not self.file.closed:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_holder(path):
    """What the holder of a lock file wrote about itself ("pid N on HOST since T"), or "unknown"."""
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def is_held(path):
    """True while some live process holds an flock on path (testing takes and drops it at once)."""
    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released again on close
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
