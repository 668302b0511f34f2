"""Where a cache lives: a local folder, or a prefix in an object store (s3://, gs://, az://, ...).

Every byte the cache package reads or writes goes through `Storage`, one small set of operations that
both kinds of place have: whole-object reads and writes, range reads, listing a "folder", deleting,
and an exclusive create (S3's If-None-Match: *; O_EXCL on a local disk). There is no rename: a part is
committed by writing its commit record last (cache/writer.py), which is one commit path for both.

Object stores go through fsspec (s3fs for s3://): credentials and endpoints come from the usual
environment and config files (AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws/config). A request that fails
for a transient reason (connection reset, timeout, throttling, 5xx) is retried with exponential
backoff; one that persists raises CacheError naming the URL and the store's answer.
"""
import errno
import json
import os
import shutil
import time
import uuid

from cache.errors import CacheError

RETRIES = 5  # attempts of one request before it counts as persistent
BACKOFF_SECONDS = 0.5  # first wait; doubled at every retry (0.5, 1, 2, 4 s)
PROBE_RECORD = "locks/store-probe.json"  # whether the store honours conditional writes, as probed
TMP_SUFFIX = ".tmp"  # a local file being written; one a kill left behind is reported by `cache verify`


def is_url(path):
    """True for an object-store URL (s3://..., gs://...); plain paths and file:// are local."""
    path = str(path)
    return "://" in path and not path.startswith("file://")


def normalize(location):
    """One spelling per cache: an absolute local path, or the URL without a trailing slash."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    return location.rstrip("/") if is_url(location) else os.path.normpath(os.path.abspath(location))


def join(location, *names):
    """A path or URL below `location`, for messages and for callers that name an object."""
    return "/".join([str(location).rstrip("/"), *names]) if is_url(location) else os.path.join(location, *names)


def _transient(e):
    """Worth retrying: the network or the store's load, not the request itself."""
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    text = f"{type(e).__name__} {e}"
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        s in text for s in ("Timeout", "timed out", "Connection", "connection", "Throttl", "SlowDown",
                            "ServiceUnavailable", "InternalError", "503", "500", "RequestTimeout",
                            # S3's answer to two conditional writes racing on one key: try again
                            "ConditionalRequestConflict", "409"))


class NotImplementedByStore(CacheError):
    """The store answered 501 Not Implemented (e.g. to a conditional write it does not support)."""


def answer(e):
    """The store's answer, one line: what a user needs to see (no traceback)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


class Storage:
    """A cache root: `location` is a local folder or an object-store URL (see the module docstring)."""

    def __init__(self, location):
        self.location = normalize(location)
        self.remote = is_url(self.location)
        if self.remote:
            import fsspec
            self.protocol = self.location.split("://", 1)[0]
            # one layer of retries, ours (s3fs and botocore would each retry too: 5 x 5 x 5 attempts), and
            # timeouts short enough that a lease is renewed well inside its 60 s even after retries
            options = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 20}} \
                if self.protocol == "s3" else {}
            try:
                # our own instance: fsspec's shared ones outlive a fork, with a dead event loop inside
                self.fs, self.root = fsspec.url_to_fs(self.location, skip_instance_cache=True, **options)
            except (ImportError, ValueError) as e:
                raise CacheError(f"{self.location}: no storage layer for this URL ({answer(e)}); "
                                 "s3:// needs s3fs (in requirements.txt), gs:// gcsfs, az:// adlfs") from None
            if self.protocol == "s3":
                self.fs.retries = 1
        else:
            self.fs, self.root, self.protocol = None, self.location, "file"
        self.requests = 0  # requests sent (reads, writes, listings, deletes): what bench/bench_s3.py counts
        self.bytes_read = 0

    # -- paths -------------------------------------------------------------------------------------
    def path(self, *names):
        """The store's own path of an object below the root (no protocol)."""
        return "/".join([self.root, *names]) if self.remote else os.path.join(self.root, *names)

    def url(self, *names):
        return join(self.location, *names)

    @property
    def conditional_writes(self):
        """Whether an exclusive create is atomic here: local disks (O_EXCL) and S3 (If-None-Match)."""
        return self.protocol in ("file", "s3")

    # -- requests ----------------------------------------------------------------------------------
    def _call(self, what, fn, *args, deadline=None, **kwargs):
        """fn(*args), retried with backoff while it fails for a transient reason. deadline: a
        time.monotonic() after which no attempt starts (a lease's renewal is worth nothing past the
        lease's expiry)."""
        for attempt in range(RETRIES):
            self.requests += 1
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not self.remote:
                    raise
                if not _transient(e):
                    if _not_implemented(e):
                        raise NotImplementedByStore(f"{self.url(what)}: the store does not implement this request "
                                         f"(501 Not Implemented; {answer(e)})") from None
                    if isinstance(e, OSError) and not isinstance(e, PermissionError):
                        raise  # missing, a failed condition...: the caller decides what that means
                    # refused (access denied), or the client's own refusal (no credentials, a bad
                    # endpoint): one line, no traceback
                    refused = "refused with 403 Forbidden, " if isinstance(e, PermissionError) else ""
                    raise CacheError(f"{self.url(what)}: {refused}{answer(e)}") from None
                wait = BACKOFF_SECONDS * 2 ** attempt
                if attempt == RETRIES - 1 or (deadline is not None and time.monotonic() + wait > deadline):
                    tries = f"after {attempt + 1} attempt{'s' if attempt else ''}"
                    raise CacheError(f"{self.url(what)}: {answer(e)} ({tries})") from None
                time.sleep(wait)

    def read(self, *names):
        """An object's bytes (FileNotFoundError when it does not exist)."""
        if not self.remote:
            with open(self.path(*names), "rb") as f:
                data = f.read()
        else:
            data = self._call("/".join(names), self.fs.cat_file, self.path(*names))
        self.bytes_read += len(data)
        return data

    def read_range(self, name, start, end):
        """Bytes [start, end) of an object: one ranged request."""
        if not self.remote:
            with open(self.path(name), "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            self.requests += 1
        else:
            data = self._call(name, self.fs.cat_file, self.path(name), start=start, end=end)
        self.bytes_read += len(data)
        return data

    def read_many(self, names):
        """{name: bytes or the exception} for many objects, fetched concurrently on an object store."""
        if not self.remote:
            out = {}
            for n in names:
                try:
                    out[n] = self.read(n)
                except OSError as e:
                    out[n] = e
            return out
        paths = [self.path(n) for n in names]
        got = self._call("", self.fs.cat, paths, on_error="return") if paths else {}
        self.requests += max(0, len(paths) - 1)
        out = {}
        for n, p in zip(names, paths):
            value = got.get(p, FileNotFoundError(p))
            if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
                value = self.read(n)  # a transient failure of one object: retried alone (raises if it persists)
            elif isinstance(value, bytes):
                self.bytes_read += len(value)
            out[n] = value
        return out

    def size(self, name):
        if not self.remote:
            return os.path.getsize(self.path(name))
        return self._call(name, self.fs.size, self.path(name))

    def exists(self, *names):
        """Whether an object (or a folder) is there now: asked of the store, never of a listing cached
        earlier (another job may have written it since; a roll-forward depends on it)."""
        if not self.remote:
            return os.path.exists(self.path(*names))
        try:
            self._call("/".join(names), self.fs.info, self.path(*names), refresh=True)
            return True
        except FileNotFoundError:
            return False

    def list(self, *names):
        """Names directly below a folder (objects and sub-folders), sorted; [] when there is none."""
        if not self.remote:
            folder = self.path(*names)
            return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        try:
            entries = self._call("/".join(names), self.fs.ls, self.path(*names), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def _local_put(self, name, data, publish):
        """Write a local file under a temporary name, then publish(tmp, path) it (replace or link). A
        folder that refuses writes (read-only, another owner) is one line naming it."""
        path = self.path(name)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
        except (PermissionError, OSError) as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise CacheError(f"{os.path.dirname(path)}: cannot write here ({e.strerror})") from None
        self.requests += 1
        try:
            publish(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write(self, name, data):
        """Write a whole object at once: readers see the old one or the new one, never a part of it."""
        if not self.remote:
            return self._local_put(name, data, os.replace)
        self._call(name, self.fs.pipe_file, self.path(name), data)

    def create(self, name, data):
        """Write an object only if none exists there: its version tag (S3's ETag; True on a local disk)
        if this call created it, False if one was there. Atomic against any other writer (O_EXCL, S3's
        If-None-Match: *)."""
        if not self.conditional_writes:
            raise CacheError(f"{self.url(name)}: {self.protocol}:// has no conditional write here")
        if not self.remote:
            try:  # a link fails if another writer created the file first; it is never half-written
                self._local_put(name, data, os.link)
                return True
            except FileExistsError:
                return False
        try:
            return self._call(name, self.fs.pipe_file, self.path(name), data, mode="create")["ETag"]
        except (FileExistsError, OSError) as e:
            if _precondition_failed(e):
                return False
            raise

    def read_versioned(self, name):
        """(bytes, version tag) of an object on S3, for a read-modify-write with replace_if. The tag is
        read first (never from a listing's cache): should the object change between the two requests, the
        bytes are newer than the tag and the replace_if fails, as it must."""
        etag = self._call(name, self.fs.info, self.path(name), refresh=True).get("ETag")
        return self.read(name), etag

    def replace_if(self, name, data, etag, deadline=None):
        """Overwrite an object only if it is still the version `etag` (S3's If-Match): the new version's
        tag if done, False if the object changed meanwhile (or is gone)."""
        try:
            return self._call(name, self.fs.pipe_file, self.path(name), data, IfMatch=etag,
                              deadline=deadline)["ETag"]
        except OSError as e:
            if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                return False
            raise

    def probe_conditional_writes(self):
        """(True, None) when this store honours If-None-Match and If-Match, else (False, why). Probed once
        per cache and client (s3fs and botocore versions: an old botocore drops IfMatch silently) and
        recorded in CACHE/locks/store-probe.json: a second exclusive create of one object must fail, a
        replace_if on a version the object never had must fail, one on its own version must succeed."""
        if not self.conditional_writes:
            return False, f"{self.protocol}:// offers no conditional write here"
        if not self.remote:
            return True, None  # O_EXCL, and flocks instead of leases
        import botocore
        import s3fs
        client = f"s3fs {s3fs.__version__}, botocore {botocore.__version__}"
        try:
            record = json.loads(self.read(PROBE_RECORD))
            if record.get("client") == client:
                return record["honoured"], record["why"]
        except (OSError, ValueError, KeyError):
            pass
        probe = f"locks/probe-{uuid.uuid4().hex[:12]}"
        try:
            first = self.create(probe, b"probe 1")
            why = None
            if self.create(probe, b"probe 2") is not False:
                why = "the store ignores If-None-Match (a second exclusive create of one object succeeded)"
            elif self.replace_if(probe, b"probe 3", '"0123456789abcdef0123456789abcdef"') is not False:
                why = "the store ignores If-Match (a write conditioned on a version the object never had succeeded)"
            elif not self.replace_if(probe, b"probe 4", first):
                why = "the store refuses If-Match on an object's own version"
        except NotImplementedByStore as e:
            why = str(e)
        finally:
            self.remove(probe)
        record = {"honoured": why is None, "why": why, "client": client,
                  "probed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.write(PROBE_RECORD, json.dumps(record).encode())
        return why is None, why

    def remove(self, *names, recursive=False):
        """Delete an object (or a folder and everything below it, with recursive); missing is fine."""
        path = self.path(*names)
        if not self.remote:
            if os.path.isdir(path):
                if recursive:
                    shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
            return
        try:
            self._call("/".join(names), self.fs.rm, path, recursive=recursive)
        except FileNotFoundError:
            pass

    def move(self, src, dst):
        """Move a folder (a rename on a local disk; copies then deletes on an object store)."""
        if not self.remote:
            os.makedirs(os.path.dirname(self.path(dst)), exist_ok=True)
            if os.path.isdir(self.path(src)):
                os.rename(self.path(src), self.path(dst))
            return
        top = self.path(src)
        for key in self._call(src, self.fs.find, top):  # object by object: a "folder" is only a prefix
            self._call(src, self.fs.copy, key, self.path(dst) + key[len(top):])
        self.remove(src, recursive=True)

    def total_bytes(self, *names):
        """Bytes stored below a folder (every object)."""
        if not self.remote:
            root = self.path(*names)
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
        try:
            return sum(self._call("/".join(names), self.fs.du, self.path(*names), total=False).values())
        except FileNotFoundError:
            return 0

    def zarr_store(self, *names, read_only=False):
        """A Zarr store at a folder below the root (Zarr's own event loop talks to the object store)."""
        if not self.remote:
            from zarr.storage import LocalStore
            return LocalStore(self.path(*names), read_only=read_only)
        from zarr.storage import FsspecStore
        return FsspecStore.from_url(self.url(*names), read_only=read_only, storage_options=dict(self.fs.storage_options))

    def check_access(self):
        """Raise CacheError with the store's answer when the location cannot be listed (a bucket that
        does not exist, no credentials, a refused request): before any work starts."""
        if not self.remote:
            return
        bucket = self.root.split("/", 1)[0]
        try:  # _call already turns refusals and persistent failures into CacheError
            self._call("", self.fs.ls, bucket, detail=False, refresh=True)
        except OSError as e:
            what = "no such bucket" if isinstance(e, FileNotFoundError) else "unreachable"
            raise CacheError(f"{self.location}: {what} ({answer(e)})") from None


def _not_implemented(e):
    # s3fs turns S3's 501 NotImplemented into OSError(ENOSYS)
    return getattr(e, "errno", None) == errno.ENOSYS or "NotImplemented" in str(e)


def _precondition_failed(e):
    # s3fs turns S3's 412 PreconditionFailed into an OSError whose text is the store's message
    text = str(e).lower().replace("-", "")
    return isinstance(e, FileExistsError) or "precondition" in text or "412" in text


_opened = {}  # (location, pid) -> Storage: one per cache per process (a forked child opens its own)


def open_storage(location):
    """The Storage of a cache location (a path or URL), shared within this process."""
    key = (normalize(location), os.getpid())
    if key not in _opened:
        _opened[key] = Storage(location)
    return _opened[key]
