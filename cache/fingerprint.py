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

from cache.errors import CacheError
from cache.storage import open_storage

VIDISTILL_VERSION = "0.1.0"
CACHE_FORMAT = "vidistill-cache"
# 2: zero-centred flow code (cache/flow_codec.py); 3: sharded arrays, frames/flow in an image codec
# (cache/codecs.py), the consolidated index (cache/index.py); 4: parts committed by a record in
# commits/ instead of a rename (cache/writer.py), so a cache can live on an object store
CACHE_FORMAT_VERSION = 4
UPGRADABLE = (2, 3)  # `cache upgrade` converts these
CACHE_JSON = "cache.json"


def read_cache_json(cache_dir, any_version=False):
    storage = open_storage(cache_dir)
    path = storage.url(CACHE_JSON)
    try:
        meta = json.loads(storage.read(CACHE_JSON))
    except FileNotFoundError:
        if not storage.remote and not os.path.isdir(storage.location):
            raise CacheError(f"{cache_dir}: no such cache directory") from None
        if storage.remote:
            storage.check_access()  # a missing bucket or a refused request says so, not "not a cache"
        raise CacheError(f"{path}: missing; {cache_dir} is not a vidistill cache (run `cli.py extract`)") from None
    except NotADirectoryError:
        raise CacheError(f"{cache_dir}: no such cache directory") from None
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the cache is damaged") from None
    except OSError as e:
        raise CacheError(f"{path}: cannot read ({e})") from None
    if meta.get("format") != CACHE_FORMAT or "fingerprint" not in meta:
        raise CacheError(f"{path}: not a vidistill cache description")
    if any_version:
        return meta
    if meta.get("format_version") in UPGRADABLE:
        raise CacheError(f"{cache_dir}: a format-{meta['format_version']} cache; convert it once with "
                         f"`cli.py cache upgrade {cache_dir}` (no teacher or flow is rerun)")
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
    """Every part records this; a part whose value differs from cache.json's was written otherwise.
    Teachers after the first are left out: `extract --add-teacher` adds one to cache.json while the
    parts stay as they are, and a part holds a later teacher's outputs when it holds its arrays."""
    base = {k: v for k, v in fingerprint.items() if k != "more_teachers"}
    return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()


def cache_teachers(fingerprint):
    """The identities of a cache's teachers, in slot order ([] for a frames-only cache)."""
    first = fingerprint["teacher"]
    return [] if first.get("name") == "none" else [first, *fingerprint.get("more_teachers", [])]


def teacher_array(name, slot):
    """The array (or batch key, or head) of output `name` ("logits", "embed") of the slot-th teacher:
    the first teacher's keep the plain names, so a cache of one teacher reads as it always did."""
    return name if slot == 0 else f"{name}_{slot}"


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

    Several shard jobs may start at once: the file is created with an exclusive create, so exactly one
    wins and the others compare against it (a store without one: the last writer wins, and every
    writer's description is the same).
    """
    storage = open_storage(cache_dir)
    if not storage.exists(CACHE_JSON):
        meta = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "fingerprint": fingerprint, "config": config}
        data = json.dumps(meta, indent=2, sort_keys=True).encode()
        if storage.conditional_writes and not config.get("single_writer"):
            storage.create(CACHE_JSON, data)  # False: another job created it first
        else:
            storage.write(CACHE_JSON, data)
    meta = read_cache_json(cache_dir)
    diffs = fingerprint_diff(fingerprint, meta["fingerprint"])
    if diffs:
        raise CacheError(f"{cache_dir} was extracted with different settings ({'; '.join(diffs)}); "
                         "use another --cache directory, or --overwrite to replace this cache")
    return meta
