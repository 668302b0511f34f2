"""An extraction job: which shard of the videos it takes (a hash of each id), the lock that keeps one
job per shard (and what a job or `cache verify --repair` may delete under it), and how a SIGINT or
SIGTERM stops it (commit what is finished, then stop; a second signal aborts)."""
import contextlib
import hashlib
import os
import signal
import threading

from cache.errors import CacheError
from cache.lease import LOCKS_DIR, Fence, LeaseBusy, ObjectLease, describe, lease_live, read_lease
from cache.manifest import INDEX_PROBLEM, quarantine_damaged, rebuild_index, remove_leftover_tmp_files
from cache.storage import TMP_SUFFIX, open_storage
from cache.writer import part_shard, remove_uncommitted_parts, uncommitted_parts
from pipeline.common.errors import ExtractError
from pipeline.common.locks import FileLock, LockBusy, LockError, is_held, lock_holder


def shard_from_env():
    """(index, count) from torchrun (RANK/WORLD_SIZE) or a Slurm array, else (0, 1)."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def shard_of(video_id, count):
    """The shard a video belongs to: a stable hash of its id, so jobs whose listings differ (a video
    added or removed between their starts) still split every video the same way."""
    return int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:8], "big") % count


def shard_videos(videos, index, count):
    """The (id, path) pairs of shard `index` of `count`."""
    return [v for v in videos if shard_of(v[0], count) == index]


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
    object on an object store (cache/lease.py), whose `fence` every commit of the job goes through.
    single_writer on an object store: the user vouches that one job writes (nothing is taken)."""

    def __init__(self, cache_dir, index, count, single_writer=False):
        storage = open_storage(cache_dir)
        name = shard_lock_name(index, count)
        self.lease = self.lock = None
        self.fence = Fence(storage.location)  # plain writes: the flock, or the user's word, keeps others out
        try:
            if not storage.remote:
                self.lock = FileLock(storage.path(LOCKS_DIR, name))
            elif not single_writer:
                self.lease = ObjectLease(storage, name)
                self.fence = self.lease.fence
        except (LockBusy, LeaseBusy) as e:
            raise ExtractError(f"{cache_dir}: shard {index}/{count} is being extracted by another process "
                               f"({e.holder}); wait for it to finish or pick another --shard") from None
        except (CacheError, LockError) as e:
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


def held_locks(cache_dir):
    """{shard lock name ("shard-I-of-N.lock"): who holds it} for the locks some live job holds. A lock
    file alone means nothing: flock is released when its holder dies, however it dies, and a lease
    binds only until it expires, is released, or its process is gone."""
    storage = open_storage(cache_dir)
    held = {}
    for name in storage.list(LOCKS_DIR):
        if not (name.startswith("shard-") and name.endswith(".lock")):  # not the store's probe record
            continue
        if not storage.remote:
            if is_held(storage.path(LOCKS_DIR, name)):
                held[name] = lock_holder(storage.path(LOCKS_DIR, name))
        else:
            record, _ = read_lease(storage, f"{LOCKS_DIR}/{name}")
            if record is not None and lease_live(record):
                held[name] = describe(record)
    return held


def remove_abandoned_parts(cache_dir):
    """`cache verify --repair`: delete the uncommitted parts of every shard no job runs on now. Each
    shard's lock is taken first (on an object store: its lease, taken over, which fences out a stalled
    writer and rolls its logged commits forward), so no clean-up deletes a part that a live writer may
    still commit. Returns (parts removed, shards skipped because a job holds them)."""
    removed, busy = 0, []
    for shard in sorted({part_shard(p) for p in uncommitted_parts(cache_dir)} - {None}):
        try:
            lock = ShardLock(cache_dir, *shard)
        except ExtractError:
            busy.append(shard)
            continue
        try:
            removed += remove_uncommitted_parts(cache_dir, shard)
        finally:
            lock.release()
    return removed, busy


def repair_cache(cache_dir, problems, notes):
    """`cache verify --repair`: remove what killed runs left (uncommitted parts of shards no job runs on,
    temporary files), rebuild a damaged index.bin, quarantine damaged parts. Returns (notes, quarantined
    [(part, ids)])."""
    removed, busy = remove_abandoned_parts(cache_dir)
    tmp = remove_leftover_tmp_files(cache_dir)
    if any(p.startswith(INDEX_PROBLEM) for p in problems):
        rebuild_index(cache_dir)
        problems[:] = [p for p in problems if not p.startswith(INDEX_PROBLEM)]
        notes = notes + ["rebuilt index.bin from the parts"]
    if removed or tmp:
        notes = [n for n in notes if "uncommitted part" not in n and TMP_SUFFIX not in n]
        notes.append(f"removed {removed} uncommitted part(s) and {tmp} temporary file(s) of killed runs")
    if busy:
        notes.append(f"kept the uncommitted parts of shard(s) {', '.join(f'{i}/{n}' for i, n in busy)}: a job is "
                     "extracting them now")
    return notes, quarantine_damaged(cache_dir, problems) if problems else []


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
