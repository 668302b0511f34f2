"""An extraction job: which shard of the videos it takes, the lock that keeps one job per shard, and
how a SIGINT or SIGTERM stops it (commit what is finished, then stop; a second signal aborts)."""
import contextlib
import os
import signal
import threading

from pipeline.common.errors import ExtractError
from pipeline.common.locks import FileLock, LockBusy, is_held, lock_holder


def shard_from_env():
    """(index, count) from torchrun (RANK/WORLD_SIZE) or a Slurm array, else (0, 1)."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1




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


class ShardLock:
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


@contextlib.contextmanager
def sigint_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
