"""`cache upgrade`: bring an older cache to the current format without rerunning teacher or flow.

Format 3 (sharded, committed by renaming a `.tmp-` folder) differs from format 4 only in how a part is
committed: its parts get commit records (cache/writer.py) and its debris of killed runs is removed, in
place, with no data rewritten.

Format 2 (one Zarr chunk per ~1 MB of rows, zstd) is converted part by part; each converted part keeps
its name and its video table (rows keep their offsets), so a killed upgrade resumes at the part it was
on. In place: the old part is moved aside to `.old-NAME`, the new one written as NAME and committed,
the old one deleted. To a new location (--out): the old cache is only read. Either way cache.json
turns to the new format last, so until then every other command says to finish the upgrade.
"""
import json

import numpy as np
import zarr

from cache.codecs import storage_description
from cache.fingerprint import CACHE_FORMAT_VERSION, UPGRADABLE, CacheError, fingerprint_sha256, read_cache_json
from cache.index import committed_parts, open_index
from cache.lease import Fence
from cache.storage import open_storage
from cache.writer import PARTS_DIR, PartWriter, write_commit_record

OLD_PREFIX = ".old-"
ROWS_PER_COPY = 256  # rows moved per read: bounded memory whatever the part's size


def upgrade_cache(cache_dir, codecs, out=None, progress=lambda done, total, part: None):
    """Convert `cache_dir` (format 2 or 3) in place, or (format 2) into `out`. codecs: {"frames"|"flow":
    (codec, quality)}, for format 2's data. Returns {"parts": converted this run, "skipped": already
    converted, "bytes_before", "bytes_after"}."""
    meta = read_cache_json(cache_dir, any_version=True)
    version = meta.get("format_version")
    if version == CACHE_FORMAT_VERSION and out is None:
        raise CacheError(f"{cache_dir}: already format {CACHE_FORMAT_VERSION}; nothing to upgrade")
    if version not in UPGRADABLE:
        raise CacheError(f"{cache_dir}: format {version}; `cache upgrade` converts formats "
                         f"{', '.join(map(str, UPGRADABLE))}")
    if version == 3:
        if out is not None:
            raise CacheError(f"{cache_dir}: a format-3 cache is upgraded in place (its data is kept as it is, "
                             "only commit records are added); run it without --out")
        return _commit_records_for_format3(cache_dir, meta, progress)
    source = open_storage(cache_dir)
    if source.remote and out is None:  # parking a part aside is a copy there, and a killed copy is half a part
        raise CacheError(f"{cache_dir}: a format-2 cache on an object store is upgraded into a new location: "
                         "pass --out URL")
    fingerprint = dict(meta["fingerprint"], storage=storage_description(codecs))
    target = open_storage(out or cache_dir)
    if out:
        if target.exists("cache.json"):
            have = read_cache_json(out, any_version=True)
            if have.get("fingerprint") != fingerprint:
                raise CacheError(f"{out}: holds another cache (or another upgrade's codecs); choose an empty folder")
    names = source.list(PARTS_DIR)
    old = sorted({n[len(OLD_PREFIX):] for n in names if n.startswith(OLD_PREFIX)} |
                 {n for n in names if n.startswith("part-") and n.endswith(".zarr")})
    done = set(committed_parts(target.location))
    summary = {"parts": 0, "skipped": 0, "bytes_before": 0, "bytes_after": 0}
    attrs_extra = {"fingerprint_sha256": fingerprint_sha256(fingerprint)}
    for k, name in enumerate(old):
        progress(k, len(old), name)
        src = f"{PARTS_DIR}/{name}"
        parked = f"{PARTS_DIR}/{OLD_PREFIX}{name}"
        if name in done:  # converted; in place, killed before the old copy was deleted
            if out is None:
                source.remove(parked, recursive=True)
            summary["skipped"] += 1
            continue
        if out is None:
            if OLD_PREFIX + name not in names:
                source.move(src, parked)  # the new part takes the name; the old one stays until it is committed
            target.remove(src, recursive=True)  # a half-written new part of a killed run
            src = parked
        summary["bytes_before"] += source.total_bytes(src)
        summary["bytes_after"] += _convert_part(source, src, target, name, meta["fingerprint"], codecs, attrs_extra)
        if out is None:
            source.remove(parked, recursive=True)
        summary["parts"] += 1
    progress(len(old), len(old), "")
    for name in source.list(PARTS_DIR) if out is None else ():  # format 2's debris of killed extracts
        if name.startswith(".tmp-"):
            source.remove(PARTS_DIR, name, recursive=True)
    _finish(target, dict(meta, fingerprint=fingerprint))
    return summary


def _finish(target, meta):
    """The cache turns to the current format only now, every part converted."""
    target.write("cache.json", json.dumps(dict(meta, format_version=CACHE_FORMAT_VERSION), indent=2,
                                          sort_keys=True).encode())
    open_index(target.location, warn=False)  # the old index lists the old parts


def _commit_records_for_format3(cache_dir, meta, progress):
    """Format 3 -> 4: a commit record for each committed (renamed) part; `.tmp-` debris removed."""
    storage = open_storage(cache_dir)
    names = storage.list(PARTS_DIR)
    done = set(committed_parts(cache_dir))
    size = storage.total_bytes()  # no data is rewritten
    summary = {"parts": 0, "skipped": 0, "bytes_before": size, "bytes_after": size}
    parts = [n for n in names if n.startswith("part-") and n.endswith(".zarr")]
    for k, part in enumerate(parts):
        progress(k, len(parts), part)
        if part in done:
            summary["skipped"] += 1
            continue
        group = zarr.open_group(storage.zarr_store(PARTS_DIR, part, read_only=True), mode="r")
        attrs = dict(group.attrs)
        if not attrs.get("complete"):
            raise CacheError(f"{storage.url(PARTS_DIR, part)}: not a complete part; run `cli.py cache verify`")
        write_commit_record(storage, part, {"video_count": len(attrs["videos"]),
                                            "rows": {name: a.shape[0] for name, a in group.arrays()},
                                            "fingerprint_sha256": attrs.get("fingerprint_sha256"),
                                            "bytes": storage.total_bytes(PARTS_DIR, part)})
        summary["parts"] += 1
    progress(len(parts), len(parts), "")
    for name in names:
        if name.startswith(".tmp-"):  # parts (and their locks) of killed format-3 writers
            storage.remove(PARTS_DIR, name, recursive=True)
    _finish(storage, meta)
    return summary


def _convert_part(source, src, target, name, fingerprint, codecs, attrs_extra):
    """Write part `src` of `source` (format 2) as `name` in `target`; returns the new part's bytes."""
    group = zarr.open_group(source.zarr_store(src, read_only=True), mode="r")
    attrs = dict(group.attrs)
    if not attrs.get("complete"):
        raise CacheError(f"{source.url(src)}: not a complete part")
    pre, teacher = fingerprint["preprocessing"], fingerprint["teacher"]
    writer = PartWriter(target.location, "", pre["height"], pre["width"], "flow" in group, teacher.get("num_classes"),
                        teacher.get("embed_dim"), codecs, name=name)
    for array_name, appender in writer.arrays.items():
        array = group[array_name]
        for lo in range(0, array.shape[0], ROWS_PER_COPY):
            appender.append(np.asarray(array[lo:lo + ROWS_PER_COPY]))
    for rec in attrs["videos"]:
        writer.add_record(rec)
    new_attrs = {k: v for k, v in attrs.items() if k not in ("videos", "complete")}
    new_attrs.update(attrs_extra)
    return writer.commit(new_attrs, Fence(target.location))  # run while no extract runs: plain writes
