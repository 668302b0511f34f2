"""cache.json: what produced a cache, so nothing ever mixes or consumes incompatible targets.

The fingerprint holds everything that changes the stored values (teacher weights, preprocessing,
flow method and parameters, ffmpeg and vidistill versions). extract refuses to add to a cache with a
different fingerprint; distill refuses a cache it cannot use. Job-level settings (shard, workers)
are not part of it: any mix of jobs with one fingerprint writes one consistent cache.
"""
import datetime
import hashlib
import json
import os
import uuid

VIDISTILL_VERSION = "0.1.0"
CACHE_FORMAT = "vidistill-cache"
# 2: zero-centred flow code (cache/flow_codec.py); 3: sharded arrays, frames/flow in an image codec
# (cache/codecs.py), the consolidated index (cache/index.py)
CACHE_FORMAT_VERSION = 3
CACHE_JSON = "cache.json"


class CacheError(Exception):
    """A cache that is missing, damaged or incompatible; the message says which and what to do."""


def cache_json_path(cache_dir):
    return os.path.join(cache_dir, CACHE_JSON)


def read_cache_json(cache_dir, any_version=False):
    path = cache_json_path(cache_dir)
    if not os.path.isdir(cache_dir):
        raise CacheError(f"{cache_dir}: no such cache directory")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CacheError(f"{path}: missing; {cache_dir} is not a vidistill cache (run `cli.py extract`)") from None
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the cache is damaged") from None
    if meta.get("format") != CACHE_FORMAT or "fingerprint" not in meta:
        raise CacheError(f"{path}: not a vidistill cache description")
    if any_version:
        return meta
    if meta.get("format_version") == 2:
        raise CacheError(f"{cache_dir}: a format-2 cache; convert it once with `cli.py cache upgrade {cache_dir}` "
                         "(no teacher or flow is rerun)")
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {meta.get('format_version')} "
                         f"but this vidistill reads version {CACHE_FORMAT_VERSION}; re-extract")
    return meta


_hashed = {}  # (real path, inode, size, mtime) -> sha256, per process


def sha256_file(path):
    """Content hash of a file (teacher weights, checkpoints): a renamed or copied file hashes the same,
    a retrained one does not. A file is read once per process however often its hash is asked for (an
    evaluation checks a CLIP teacher's weights, hundreds of MB, in several places); a replaced or
    rewritten file has another inode or mtime and is read again."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashed:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _hashed[key] = h.hexdigest()
    return _hashed[key]


def fingerprint_sha256(fingerprint):
    """Every part records this; a part whose value differs from cache.json's was written otherwise."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def fingerprint_diff(expected, found, prefix=""):
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted(set(expected) | set(found))
    diffs = []
    for k in keys:
        a, b = expected.get(k), found.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: cache has {b!r}, this run has {a!r}")
    return diffs


def create_or_check(cache_dir, fingerprint, config):
    """Create cache.json for a new cache, or check an existing one has this exact fingerprint.

    Several shard jobs may start at once: the file is created with an atomic link, so exactly one
    wins and the others compare against it.
    """
    os.makedirs(cache_dir, exist_ok=True)
    path = cache_json_path(cache_dir)
    if not os.path.exists(path):
        meta = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "fingerprint": fingerprint, "config": config}
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        try:
            os.link(tmp, path)  # fails if another job created it first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    meta = read_cache_json(cache_dir)
    diffs = fingerprint_diff(fingerprint, meta["fingerprint"])
    if diffs:
        raise CacheError(f"{cache_dir} was extracted with different settings ({'; '.join(diffs)}); "
                         "use another --cache directory, or --overwrite to replace this cache")
    return meta
