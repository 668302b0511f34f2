"""One writer per shard on an object store: a lease object, and every commit conditioned on it.

An flock (pipeline/common/locks.py) keeps two jobs apart on a local disk: it is released by the kernel
when its holder dies, and a stopped holder keeps it. An object store has no locks, and a process can
stall (SIGSTOP, a long GC, a hung request) for any time, so a flag saying "I hold the lease" proves
nothing at the moment of a commit. Leases here are fencing tokens, as in Delta Lake's and Iceberg's
commits:

- CACHE/locks/NAME.lock is created with If-None-Match: * (exactly one creator wins), or taken over
  once it expired (or its holder, on this machine, is gone) with If-Match on the version read, so of
  two takers one wins. Each holder writes a fresh random `token` and the next `generation`.
- A commit is a compare-and-swap on that object: the writer reads it, checks that the token is its
  own, and writes it back with If-Match on the version read, adding the objects it commits (a part's
  commit record) to the lease's `commits` log; only then does it write them. A writer whose lease was
  taken over fails the check or the If-Match, whatever it believes and however long it stalled, so it
  commits nothing. Every process of a job (`--workers`) does this itself against the shared object.
- A writer can stall between its compare-and-swap and its writes: the next holder, right after taking
  the lease over, writes whatever of the previous holder's `commits` log is missing (a roll-forward),
  before it lists what is committed. So a commit that won its swap always becomes visible, and the
  new holder sees it before choosing what to redo or delete.
- The lease is renewed every LEASE_SECONDS / 3 (the same compare-and-swap, giving up at the lease's
  expiry); a job that cannot renew it for 2/3 of its life stops, since another job will take over.
  Renewal keeps jobs efficient; it is not what keeps them correct.
- At the end a job marks its lease released (the same compare-and-swap) instead of deleting it: a
  delete has no If-Match on every S3-compatible store, and would drop a successor's log.

A store that ignores the conditions would let two jobs hold one lease: Storage.probe_conditional_writes
checks them once per cache, and extract refuses such a store unless told that only one job writes.
Expiry compares the holder's clock with the reader's: keep machines' clocks synchronised (NTP).
"""
import datetime
import json
import os
import socket
import threading
import time
import uuid

from cache.errors import CacheError
from cache.storage import open_storage

# seconds a lease binds without renewal; VIDISTILL_LEASE_SECONDS shortens it (tests run in seconds)
LEASE_SECONDS = float(os.environ.get("VIDISTILL_LEASE_SECONDS", 60))
LOCKS_DIR = "locks"
_released = set()  # tokens this process released: never live, even if the store refused the release


class LeaseBusy(Exception):
    """Another live job holds the lease; `holder` says who (pid, host, until when)."""

    def __init__(self, where, holder):
        super().__init__(f"{where} is held by {holder}")
        self.holder = holder


class LeaseLost(CacheError):
    """This job's lease is another job's now: it committed nothing more."""


def _machine():
    """Where a pid means one process, as a lease records it: host name, boot id (two containers may share
    a name) and pid namespace (containers on one host, even sharing its network, each have their own)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = "", ""
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_live(record, now=None):
    """Whether a lease record (the object's JSON) still binds: not released, not expired, and not held
    by a process of this machine that is gone."""
    if record.get("released") or record.get("token") in _released:
        return False
    if record.get("machine") == _machine() and not _alive(record.get("pid", -1)):
        return False
    return record.get("expires", 0) > (now or time.time())


def describe(record):
    until = datetime.datetime.fromtimestamp(record.get("expires", 0)).isoformat(timespec="seconds")
    return f"pid {record.get('pid')} on {record.get('host')} (lease until {until}, renewed while it runs)"


def read_lease(storage, key):
    """(record, etag) of the lease object at `key`, or (None, None) when there is none (or it is
    unreadable)."""
    try:
        data, etag = storage.read_versioned(key)
        return json.loads(data), etag
    except (OSError, ValueError):
        return None, None


def _swap(storage, key, token, change, deadline=None):
    """Read-modify-write of a lease held by `token`: change(record) -> the new record, written with
    If-Match on the version read. Another process of the same job (a worker's commit, the renewal)
    changing it meanwhile is retried; returns (new etag, record written), or (False, record found) once
    the lease is not `token`'s any more."""
    while True:
        record, etag = read_lease(storage, key)
        if record is None or record.get("token") != token or record.get("released"):
            return False, record
        new = change(dict(record))
        done = storage.replace_if(key, json.dumps(new).encode(), etag, deadline=deadline)
        if done:
            return done, new
        if deadline is not None and time.monotonic() > deadline:
            return False, None


class Fence:
    """What a process needs to commit into a shard: the lease's key and the holder's token (picklable:
    a --workers process gets its own copy and checks the shared object itself). key None: a local
    folder (the job's flock keeps others out) or a single writer vouched for: commits are plain writes."""

    def __init__(self, location, key=None, token=None):
        self.location, self.key, self.token = location, key, token
        self.owner = os.getpid()  # the process holding the job's flock (key None), or the lease
        self.written = set()  # logged objects this process has written: dropped from the log at its next swap

    def _lost(self, record):
        who = describe(record) if record else "nobody (the lease object is gone)"
        return LeaseLost(f"{open_storage(self.location).url(self.key)}: this job's lease was taken over by {who}; "
                         "it stopped without committing more - rerun the same command to resume")

    def check(self):
        """Raise LeaseLost unless the lease is still this job's (for writes that are not logged)."""
        if self.key is not None:
            record, _ = read_lease(open_storage(self.location), self.key)
            if record is None or record.get("token") != self.token or record.get("released"):
                raise self._lost(record)

    def commit(self, objects, requires=None):
        """Write `objects` [(name, bytes)] as one commit: logged in the lease by a compare-and-swap that
        fails unless the lease is still this job's (LeaseLost), then written. requires: an object that
        must exist for a successor's roll-forward to write them (the part they commit)."""
        storage = open_storage(self.location)
        if self.key is None and self.owner not in (os.getpid(), os.getppid()):
            # a --workers process whose job's main process died: its flock is free for another job now
            raise LeaseLost(f"{self.location}: this job's main process (pid {self.owner}) is gone, and with it the "
                            "shard's lock; this worker commits nothing more - rerun the same command to resume")
        if self.key is not None:
            names = {name for name, _ in objects}
            entries = [{"name": name, "data": data.decode(), "requires": requires} for name, data in objects]

            def log(record):
                keep = [e for e in record.get("commits", []) if e["name"] not in self.written | names]
                return dict(record, commits=keep + entries)
            done, record = _swap(storage, self.key, self.token, log)
            if not done:
                raise self._lost(record)
            self.written.clear()  # what it held is out of the log now
        for name, data in objects:
            storage.write(name, data)
            self.written.add(name)


def roll_forward(storage, commits):
    """Write what a previous holder logged as committed but may not have written (it stalled or died
    between its compare-and-swap and its writes). Returns how many objects were missing."""
    missing = 0
    for entry in commits:
        if storage.exists(entry["name"]) or (entry.get("requires") and not storage.exists(entry["requires"])):
            continue  # written already; or its part was taken out since (quarantined)
        storage.write(entry["name"], entry["data"].encode())
        missing += 1
    return missing


class ObjectLease:
    """Holds CACHE/locks/NAME on an object store until release(); raises LeaseBusy when a live job has
    it. `fence` is what this job's processes commit with."""

    def __init__(self, storage, name):
        self.storage, self.key, self.lost = storage, f"{LOCKS_DIR}/{name}", False
        self.token = uuid.uuid4().hex
        self.renewed = time.monotonic()
        previous = None
        if not storage.create(self.key, self._body(1)):
            for _ in range(3):  # the previous holder may still be swapping (a worker's commit): read again
                record, etag = read_lease(storage, self.key)
                if record is not None and lease_live(record):
                    raise LeaseBusy(storage.url(self.key), describe(record))
                self.renewed = time.monotonic()
                if record is None:  # gone meanwhile
                    if storage.create(self.key, self._body(1)):
                        break
                elif storage.replace_if(self.key, self._body(record.get("generation", 0) + 1), etag):
                    previous = record
                    break
            else:
                raise LeaseBusy(storage.url(self.key), "another job that took it over just now")
        if previous:
            roll_forward(storage, previous.get("commits", []))
        self.fence = Fence(storage.location, self.key, self.token)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._thread.start()

    def _body(self, generation):
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "machine": _machine(),
                           "token": self.token, "generation": generation, "commits": [],
                           "expires": time.time() + LEASE_SECONDS}).encode()

    def _renew(self):
        while not self._stop.wait(LEASE_SECONDS / 6):
            if time.monotonic() - self.renewed < LEASE_SECONDS / 3:
                continue
            started = time.monotonic()
            try:  # no attempt after the lease's expiry: it would be worth nothing
                done, _ = _swap(self.storage, self.key, self.token,
                                lambda r: dict(r, expires=time.time() + LEASE_SECONDS),
                                deadline=self.renewed + LEASE_SECONDS)
            except (OSError, CacheError):
                done = None  # retried at the next beat, while the lease is surely still ours
            if done:
                self.renewed = started
            elif done is False or time.monotonic() - self.renewed > LEASE_SECONDS * 2 / 3:
                # taken over, or so close to its expiry that another job may take it: stop working
                self.lost = True
                return

    def release(self):
        """Stop renewing and mark the lease released (a compare-and-swap: a lease lost meanwhile is left
        to its new holder, with its log)."""
        self._stop.set()
        self._thread.join(timeout=1.0)  # a renewal stuck in a request must not hold the job's exit
        _released.add(self.token)
        try:
            _swap(self.storage, self.key, self.token, lambda r: dict(r, released=True, expires=0),
                  deadline=time.monotonic() + LEASE_SECONDS / 3)
        except (OSError, CacheError):  # the store is failing: the lease expires on its own
            pass
