"""One writer per shard on an object store: a lease object, taken with a conditional write.

An flock (pipeline/common/locks.py) keeps two jobs apart on a local disk and is released by the
kernel when its holder dies. An object store has no locks, so a job takes CACHE/locks/NAME.lease by
creating it with S3's If-None-Match: * (exactly one creator wins), renews it every LEASE_SECONDS / 3
with If-Match on its own version, and deletes it when done. A lease left by a killed job is taken
over with If-Match on the version read (two takers: one wins) once it has expired, or at once when
its holder ran on this machine (the same host, boot and pid namespace) and its process is gone. A
job that cannot renew its lease in time, or finds it taken over, commits nothing more
(`ensure_held`). Expiry compares the holder's clock with the reader's: machines whose clocks differ by
tens of seconds could take a live lease over. A store without conditional writes cannot keep two jobs
apart: extract refuses to start there unless told that only one job writes.
"""
import datetime
import json
import os
import socket
import threading
import time

from cache.errors import CacheError

LEASE_SECONDS = 60  # a lease not renewed for this long belongs to a dead job
LOCKS_DIR = "locks"
_held = set()  # (location, key) of the leases this process holds now
_lost = threading.Event()  # set when a lease of this process was taken over or could not be renewed in time


class LeaseBusy(Exception):
    """Another live job holds the lease; `holder` says who (pid, host, until when)."""

    def __init__(self, where, holder):
        super().__init__(f"{where} is held by {holder}")
        self.holder = holder


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


def lease_live(record, now=None, key=None):
    """Whether a lease record (the object's JSON) still binds: not expired, and not held by a process
    of this machine that is gone, nor by this process when it no longer holds `key` (a release the
    store refused)."""
    if record.get("machine") == _machine():
        if not _alive(record.get("pid", -1)):
            return False
        if record.get("pid") == os.getpid() and key is not None and key not in _held:
            return False
    return record.get("expires", 0) > (now or time.time())


def describe(record):
    until = datetime.datetime.fromtimestamp(record.get("expires", 0)).isoformat(timespec="seconds")
    return f"pid {record.get('pid')} on {record.get('host')} (lease until {until}, renewed while it runs)"


def read_lease(storage, name):
    """(record, etag) of a lease object, or (None, None) when there is none (or it is unreadable)."""
    try:
        etag = storage.etag(f"{LOCKS_DIR}/{name}")
        return json.loads(storage.read(LOCKS_DIR, name)), etag
    except (OSError, ValueError):
        return None, None


class ObjectLease:
    """Holds CACHE/locks/NAME on an object store until release(); raises LeaseBusy when a live job has it."""

    def __init__(self, storage, name):
        if not storage.conditional_writes:
            raise CacheError(f"{storage.location}: {storage.protocol}:// offers no conditional write here, so two "
                             "jobs on one shard could not be kept apart; pass --single-writer if only one job "
                             "writes this cache")
        self.storage, self.key, self.lost = storage, f"{LOCKS_DIR}/{name}", False
        self.renewed = time.monotonic()
        self.etag = storage.create(self.key, self._body())
        if not self.etag:
            record, etag = read_lease(storage, name)
            if record is not None and lease_live(record, key=(storage.location, self.key)):
                raise LeaseBusy(storage.url(self.key), describe(record))
            self.etag = storage.replace_if(self.key, self._body(), etag) if etag else False
            if not self.etag:
                raise LeaseBusy(storage.url(self.key), "another job that took it over just now")
        _held.add((storage.location, self.key))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._thread.start()

    def _body(self):
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "machine": _machine(),
                           "expires": time.time() + LEASE_SECONDS}).encode()

    def _renew(self):
        while not self._stop.wait(LEASE_SECONDS / 6):
            if time.monotonic() - self.renewed < LEASE_SECONDS / 3:
                continue
            try:
                etag = self.storage.replace_if(self.key, self._body(), self.etag)
            except (OSError, CacheError):
                etag = None  # retried at the next beat, while the lease is surely still ours
            if etag:
                self.etag, self.renewed = etag, time.monotonic()
            elif etag is False or time.monotonic() - self.renewed > LEASE_SECONDS * 2 / 3:
                # taken over, or too close to its expiry for another job not to take it: commit nothing more
                self.lost = True
                _lost.set()
                return

    def release(self):
        """Stop renewing and delete the lease (unconditionally: S3 deletes have no If-Match everywhere; a
        lease lost meanwhile is left to its new holder)."""
        self._stop.set()
        self._thread.join()
        _held.discard((self.storage.location, self.key))
        _lost.clear()  # the job that lost it is over: the next one in this process starts clean
        if not self.lost:
            try:
                self.storage.remove(self.key)
            except (OSError, CacheError):  # the store is failing: the lease expires on its own
                pass


def ensure_held():
    """Raise CacheError when a lease of this process was taken over or could not be renewed in time:
    another job may own its shard now, so nothing more may be committed."""
    if _lost.is_set():
        raise CacheError("this job's lease on its shard was lost (taken over, or not renewed for "
                         f"{LEASE_SECONDS * 2 // 3} s: a long outage of the store); stopped before committing more, "
                         "rerun the same command to resume")
