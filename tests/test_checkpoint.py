"""Checkpoints: loading one never executes code, and a write that dies midway leaves the previous one."""
import os

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_checkpoints_never_execute_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable vidistill checkpoint"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_a_checkpoint_write_that_dies_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(3)}})
    real_save = torch.save

    def dies_midway(obj, f):  # write part of the file, then the process "dies"
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "model": {"w": torch.zeros(3)}})
    assert load_checkpoint(path)["step"] == 1  # the checkpoint on disk is still whole
