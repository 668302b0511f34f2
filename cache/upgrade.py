"""`cache upgrade`: convert a format-2 cache (one Zarr chunk per ~1 MB of rows, zstd) to format 3
(sharded, frames and flow in their codec, the consolidated index) without rerunning teacher or flow.

Part by part, each converted part keeps its name and its video table (rows keep their offsets), so
a killed upgrade resumes at the part it was on. In place: the new part is written as `.tmp-NAME`, the
old one renamed `.old-NAME`, the new one committed, the old one deleted; cache.json turns to format 3
last, so until then every other command says to finish the upgrade. To a new folder: the old cache
is only read.
"""
import json
import os
import shutil

import numpy as np
import zarr

from cache.codecs import storage_description
from cache.fingerprint import CACHE_FORMAT_VERSION, CacheError, cache_json_path, fingerprint_sha256, read_cache_json
from cache.index import committed_parts, open_index
from cache.writer import PARTS_DIR, PartWriter, directory_bytes, remove_stale_parts

OLD_PREFIX = ".old-"
ROWS_PER_COPY = 256  # rows moved per read: bounded memory whatever the part's size


def upgrade_cache(cache_dir, codecs, out=None, progress=lambda done, total, part: None):
    """Convert `cache_dir` (format 2) in place, or into `out`. codecs: {"frames"|"flow": (codec, quality)}.
    Returns {"parts": converted this run, "skipped": already converted, "bytes_before", "bytes_after"}."""
    meta = read_cache_json(cache_dir, any_version=True)
    if meta.get("format_version") == CACHE_FORMAT_VERSION and out is None:
        raise CacheError(f"{cache_dir}: already format {CACHE_FORMAT_VERSION}; nothing to upgrade")
    if meta.get("format_version") != 2:
        raise CacheError(f"{cache_dir}: format {meta.get('format_version')}; `cache upgrade` converts format 2")
    fingerprint = dict(meta["fingerprint"], storage=storage_description(codecs))
    target = out or cache_dir
    if out:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(cache_json_path(out)):
            have = read_cache_json(out, any_version=True)
            if have.get("fingerprint") != fingerprint:
                raise CacheError(f"{out}: holds another cache (or another upgrade's codecs); choose an empty folder")
    remove_stale_parts(target)
    parts_dir = os.path.join(cache_dir, PARTS_DIR)
    old = sorted({n[len(OLD_PREFIX):] for n in os.listdir(parts_dir) if n.startswith(OLD_PREFIX)} |
                 set(committed_parts(cache_dir)))
    done = set(committed_parts(out)) if out else set()
    summary = {"parts": 0, "skipped": 0, "bytes_before": 0, "bytes_after": 0}
    attrs_extra = {"fingerprint_sha256": fingerprint_sha256(fingerprint)}
    for k, name in enumerate(old):
        progress(k, len(old), name)
        src = os.path.join(parts_dir, name)
        if out is None and os.path.isdir(os.path.join(parts_dir, OLD_PREFIX + name)):
            if os.path.isdir(src):  # killed after the new part was committed: only the old one's removal is left
                shutil.rmtree(os.path.join(parts_dir, OLD_PREFIX + name))
                summary["skipped"] += 1
                continue
            src = os.path.join(parts_dir, OLD_PREFIX + name)  # killed between the two renames
        if name in done or (out is None and _is_upgraded(src)):
            summary["skipped"] += 1
            continue
        summary["bytes_before"] += directory_bytes(src)
        summary["bytes_after"] += _convert_part(src, target, name, meta["fingerprint"], codecs, attrs_extra,
                                                in_place=out is None)
        summary["parts"] += 1
    progress(len(old), len(old), "")
    new_meta = dict(meta, format_version=CACHE_FORMAT_VERSION, fingerprint=fingerprint)
    tmp = cache_json_path(target) + ".upgrade.tmp"
    with open(tmp, "w") as f:
        json.dump(new_meta, f, indent=2, sort_keys=True)
    os.replace(tmp, cache_json_path(target))  # the cache turns format 3 only now, every part converted
    open_index(target)
    return summary


def _is_upgraded(path):
    with open(os.path.join(path, "zarr.json")) as f:
        return json.load(f)["attributes"].get("format_version") == CACHE_FORMAT_VERSION


def _convert_part(src, target, name, fingerprint, codecs, attrs_extra, in_place):
    """Write part `src` (format 2) as `name` in `target` (format 3); returns the new part's bytes."""
    group = zarr.open_group(src, mode="r")
    attrs = dict(group.attrs)
    pre, teacher = fingerprint["preprocessing"], fingerprint["teacher"]
    writer = PartWriter(target, "", pre["height"], pre["width"], "flow" in group, teacher.get("num_classes"),
                        teacher.get("embed_dim"), codecs, name=name)
    if not group.attrs.get("complete"):
        raise CacheError(f"{src}: not a complete part")
    for array_name, appender in writer.arrays.items():
        array = group[array_name]
        for lo in range(0, array.shape[0], ROWS_PER_COPY):
            appender.append(np.asarray(array[lo:lo + ROWS_PER_COPY]))
    for rec in attrs["videos"]:
        writer.add_record(rec)
    new_attrs = {k: v for k, v in attrs.items() if k not in ("videos", "complete")}
    new_attrs.update(attrs_extra, format_version=CACHE_FORMAT_VERSION)
    if in_place and not os.path.basename(src).startswith(OLD_PREFIX):
        parked = os.path.join(os.path.dirname(src), OLD_PREFIX + name)
        os.rename(src, parked)  # the new part takes the name; the old one stays until it is committed
        src = parked
    size = writer.commit(new_attrs)
    if in_place:
        shutil.rmtree(src)
    return size
