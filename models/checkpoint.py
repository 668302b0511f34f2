"""Student checkpoints: one format, written by distill and read by eval, embed and resume.

A checkpoint is a plain dict of tensors and JSON-like values (model, optimizer, scheduler, step,
rng, the full config and the cache fingerprint), so it loads with `weights_only=True`: opening one
never executes code.
"""
import os

import torch

from models.students import build_student


class CheckpointError(Exception):
    """A file that is not a readable vidistill checkpoint; one-line message."""


def save_checkpoint(path, state):
    """Atomic: a kill during the write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable vidistill checkpoint "
                              f"({type(e).__name__}: {str(e)[:200]})") from None


def load_student(path):
    """The distilled backbone from a checkpoint, in eval mode, plus the checkpoint itself."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a vidistill checkpoint (no config/model)")
    backbone = build_student(ckpt["config"]["student"])
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)})
    return backbone.eval(), ckpt
