"""An extraction job: which shard of the videos it takes, the lock that keeps one job per shard, and
how a SIGINT or SIGTERM stops it (commit what is finished, then stop; a second signal aborts)."""
import contextlib
import os
import signal
import threading

from cache.errors import CacheError
from cache.lease import LOCKS_DIR, LeaseBusy, ObjectLease, describe, lease_live, read_lease
from cache.storage import open_storage
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
        self.conditions = []  # other reasons to stop, asked at every check (a shard lease lost)

    def __call__(self):
        return self.signum is not None or (self.forwarded is not None and self.forwarded.is_set()) or \
            any(lost() for lost in self.conditions)

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


def shard_lock_name(index, count):
    return f"shard-{index}-of-{count}.lock"


class ShardLock:
    """Two jobs on the same shard of a cache never run at once: an flock on a local disk, a lease
    object on an object store (cache/lease.py). single_writer: the store has no conditional write and
    the user vouches that one job writes (then nothing is taken)."""

    def __init__(self, cache_dir, index, count, single_writer=False):
        storage = open_storage(cache_dir)
        name = shard_lock_name(index, count)
        self.lease = self.lock = None
        try:
            if not storage.remote:
                self.lock = FileLock(storage.path(LOCKS_DIR, name))
            elif not (single_writer and not storage.conditional_writes):
                self.lease = ObjectLease(storage, name)
        except (LockBusy, LeaseBusy) as e:
            raise ExtractError(f"{cache_dir}: shard {index}/{count} is being extracted by another process "
                               f"({e.holder}); wait for it to finish or pick another --shard") from None
        except CacheError as e:
            raise ExtractError(str(e)) from None
        # jobs that split the videos another way would take some of ours too
        for other, holder in held_locks(cache_dir).items():
            if not other.endswith(f"-of-{count}.lock"):
                self.release()
                raise ExtractError(f"{cache_dir}: a job with another shard count is running ({other}, {holder}); "
                                   "every job on one cache must use the same --shard I/N") from None

    @property
    def lost(self):
        """True once another job took the lease over (this one was silent past its expiry)."""
        return self.lease is not None and self.lease.lost

    def release(self):
        if self.lock is not None:
            self.lock.release()
        if self.lease is not None:
            self.lease.release()


def held_locks(cache_dir, exclude=None):
    """{shard lock name ("shard-I-of-N.lock"): who holds it} for the locks some live job holds. A lock
    file alone means nothing: flock is released when its holder dies, however it dies, and a lease
    binds only until it expires or its process is gone. exclude: a name to skip."""
    storage = open_storage(cache_dir)
    held = {}
    for name in storage.list(LOCKS_DIR):
        if name == exclude:
            continue
        if not storage.remote:
            if is_held(storage.path(LOCKS_DIR, name)):
                held[name] = lock_holder(storage.path(LOCKS_DIR, name))
        else:
            record, _ = read_lease(storage, name)
            if record is not None and lease_live(record):
                held[name] = describe(record)
    return held


def free_shards(cache_dir, mine=None):
    """For remove_uncommitted_parts: a function that, called, reads the locks held now and returns
    is_free(shard): our own shard `mine` (we hold its lock) and any shard no live job holds may have
    its uncommitted parts deleted; a part whose name names no shard is kept."""
    def is_free_now():
        busy = held_locks(cache_dir, exclude=shard_lock_name(*mine) if mine else None)
        return lambda shard: shard is not None and (shard == tuple(mine or ()) or shard_lock_name(*shard) not in busy)
    return is_free_now


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
