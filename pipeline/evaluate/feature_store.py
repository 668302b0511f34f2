"""The feature store: features of every video over a row's views, computed once per backbone and view
protocol and stored per video in WORK/features/<init>-<digest>.h5; WORK/features/index.json says which
init, checkpoint, views and data root each store holds. Every protocol, split and label set over those
videos shares them."""
import datetime
import json
import os

import h5py
import numpy as np

from pipeline.common.locks import FileLock

FEATURES_DIR = "features"  # WORK/features/: the feature stores and their index.json
INDEX = "index.json"


def stored_features(path, ids, compute, attrs):
    """[len(ids), V, D] features of these videos, computing only the ones the HDF5 store lacks.

    The store holds one row per video (ids, features) for one backbone and view protocol (attrs), so
    every task, split and label set over the same videos shares it: UCF101's three splits, or the
    object and motion labels of one folder, compute each video's features once. The folder's
    index.json lists every store with what it holds.
    """
    have = {}
    if os.path.exists(path):
        with h5py.File(path, "r") as f:
            if json.loads(f.attrs.get("config", "{}")) == attrs:
                feats = f["features"][()]
                have = {i.decode(): feats[k] for k, i in enumerate(f["ids"][()])}
    todo = [i for i in ids if i not in have]
    if todo:
        have.update(zip(todo, compute(todo)))
        keys = sorted(have)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # two evals sharing a work folder never write one file
        with h5py.File(tmp, "w") as f:
            f.attrs["config"] = json.dumps(attrs, sort_keys=True)
            f.create_dataset("ids", data=np.array([i.encode() for i in keys], dtype=h5py.string_dtype()))
            f.create_dataset("features", data=np.stack([have[i] for i in keys]), compression="gzip")
        os.replace(tmp, path)  # atomic: a killed eval leaves the old store or the new one
        index_store(path, attrs, len(keys), np.shape(have[keys[0]]))
    return np.stack([have[i] for i in ids])


def index_store(path, attrs, videos, shape):
    """Record in the store's folder's index.json what `path` holds (under a lock: evals sharing a
    work folder update it at once); entries of stores that are gone are dropped."""
    folder, name = os.path.split(os.path.abspath(path))
    with FileLock(os.path.join(folder, ".index.lock"), blocking=True):
        index = read_index(folder)
        index[name] = {"init": attrs.get("init"), "checkpoint": attrs.get("checkpoint"), "views": attrs.get("views"),
                       "root": attrs.get("root"), "videos": videos, "views_per_video": int(shape[0]),
                       "dim": int(shape[-1]),
                       "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "config": attrs}
        index = {k: v for k, v in sorted(index.items()) if os.path.exists(os.path.join(folder, k))}
        tmp = os.path.join(folder, f"{INDEX}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"stores": index}, f, indent=1)
        os.replace(tmp, os.path.join(folder, INDEX))


def read_index(folder):
    """{store file name: what it holds} from folder/index.json ({} when there is none)."""
    try:
        with open(os.path.join(folder, INDEX)) as f:
            return json.load(f)["stores"]
    except (OSError, ValueError, KeyError):
        return {}
