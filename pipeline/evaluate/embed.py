"""`cli.py embed`: per-video student features for downstream users, in HDF5."""
import json
import os

import h5py
import numpy as np
import torch

from pipeline.common.config import EvalConfig, resolve_device
from pipeline.common.errors import EvalError
from pipeline.common.runs import checkpoint_path
from pipeline.evaluate.backbones import view_times
from pipeline.evaluate.frames import frames_source, preprocessing_of
from pipeline.evaluate.rows import row_features
from pipeline.extract.videolist import find_videos


def run_embed(videos, checkpoint, out, clips, crops, per_clip, device, work=None, batch_size=EvalConfig.batch_size,
              progress=True):
    """Per-video student features for downstream users: HDF5 with ids, features and the config.

    The frames come from the distillation cache when it holds the videos, else from a frames-only
    cache in `work` (default: the folder of `out`), shared with `eval --work` over the same folder;
    the features are the checkpoint row's feature store there, so eval and embed compute them once.
    """
    checkpoint = checkpoint_path(checkpoint)
    if not os.path.isfile(checkpoint):
        raise EvalError(f"{checkpoint}: checkpoint not found")
    pre = preprocessing_of(checkpoint)
    work = work or os.path.dirname(os.path.abspath(out))
    found = find_videos(videos)
    reader, note = frames_source(videos, found, work, pre, progress)
    usable = set(reader.ids)
    ids = [vid for vid, _ in found if vid in usable]
    if not ids:
        raise EvalError(f"{videos}: no video could be decoded (see `cli.py cache info {reader.cache_dir}`)")
    cfg = EvalConfig(task="embed", checkpoint=checkpoint, clips=clips, crops=crops, batch_size=batch_size,
                     device=device, progress=progress)
    feats, _, store = row_features("checkpoint", cfg, reader, ids, videos, pre, torch.device(resolve_device(device)),
                                   work)
    failed = [(vid, reader.record(vid)["error"]) for vid, _ in found
              if vid in reader.index and vid not in usable]
    frames = np.array([reader.num_frames(v) for v in ids], np.int32)
    tmp = f"{out}.{os.getpid()}.tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=np.array([i.encode() for i in ids], dtype=h5py.string_dtype()))
        f.create_dataset("features", data=feats.mean(1), compression="gzip")
        f.create_dataset("num_frames", data=frames)
        if per_clip:
            f.create_dataset("clip_features", data=feats, compression="gzip")
            f.create_dataset("clip_times", data=np.stack([view_times(n, pre, clips, crops) for n in frames]))
        f.attrs["config"] = json.dumps({
            "checkpoint": os.path.abspath(checkpoint), "clips": clips, "crops": crops,
            "pooling": "backbone output (global average over time and space) of each of clips x crops views; "
                       "features = their mean, not L2-normalised",
            "preprocessing": pre.key(), "cache_fingerprint": pre.fingerprint, "frames_from": reader.cache_dir,
            "feature_store": os.path.abspath(store), "failed": failed}, sort_keys=True)
    os.replace(tmp, out)
    return {"videos": len(ids), "dim": feats.shape[-1], "out": out, "failed": failed, "frames_from": reader.cache_dir,
            "note": note}
