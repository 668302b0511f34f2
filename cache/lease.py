"""One writer per shard on an object store: a lease object, taken with a conditional write.

An flock (pipeline/common/locks.py) keeps two jobs apart on a local disk and is released by the
kernel when its holder dies. An object store has no locks, so a job takes CACHE/locks/NAME.lease by
creating it with S3's If-None-Match: * (exactly one creator wins), renews it every LEASE_SECONDS / 3
with If-Match on its own version, and deletes it when done. A lease left by a killed job is taken
over with If-Match on the version read (two takers: one wins) once it has expired, or at once when
its holder ran on this machine and its process is gone. A store without conditional writes cannot
keep two jobs apart: extract refuses to start there unless told that only one job writes.
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


class LeaseBusy(Exception):
    """Another live job holds the lease; `holder` says who (pid, host, until when)."""

    def __init__(self, where, holder):
        super().__init__(f"{where} is held by {holder}")
        self.holder = holder


def _machine():
    """This machine, as a lease records it: host name and boot id (two containers may share a name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


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
        if not storage.create(self.key, self._body()):
            record, etag = read_lease(storage, name)
            if record is not None and lease_live(record, key=(storage.location, self.key)):
                raise LeaseBusy(storage.url(self.key), describe(record))
            if etag is None or not storage.replace_if(self.key, self._body(), etag):
                raise LeaseBusy(storage.url(self.key), "another job that took it over just now")
        self.etag = storage.etag(self.key)
        _held.add((storage.location, self.key))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._thread.start()

    def _body(self):
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "machine": _machine(),
                           "expires": time.time() + LEASE_SECONDS}).encode()

    def _renew(self):
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                if not self.storage.replace_if(self.key, self._body(), self.etag):
                    self.lost = True  # taken over: we were silent past the expiry (a long network outage)
                    return
                self.etag = self.storage.etag(self.key)
            except (OSError, CacheError):
                continue  # retried at the next beat; the lease stays ours until it expires

    def release(self):
        self._stop.set()
        self._thread.join()
        _held.discard((self.storage.location, self.key))
        if not self.lost:
            try:
                self.storage.remove(self.key)
            except (OSError, CacheError):  # the store is failing: the lease expires on its own
                pass
