"""Where a student starts: random weights ("scratch"), its image network made temporal ("inflate",
models/inflate.py), or the backbone of an earlier run's checkpoint or of an export (a PATH).

The start is recorded in the checkpoint ({"init", and the file and sha256 it came from}) and shown in
run names and eval's rows (`checkpoint ← inflate`)."""
import os
import warnings

import torch

from models.inflate import IMAGE_COUNTERPARTS, InflateError, counterpart_key, inflatable, inflate_student

INIT_WORDS = ("auto", "scratch", "inflate")  # anything else is a PATH


class StartError(ValueError):
    """A start that cannot be made (a student without an image network, a file that does not fit); one line."""


def auto_init(arch, init_weights=""):
    """What `--init auto` means for a student: its image network when its weights are at hand (shipped
    with vidistill for efficientnet3d_lite0/1/2, or given with --init-weights), else random weights. Why:
    on the demo's benchmark the inflated efficientnet3d_lite0 scored 76.6 % object linear where the same
    network from random weights scored 39.8 and distilled from them 31.2 (BENCHMARKS.md)."""
    return "inflate" if arch.startswith("efficientnet3d_") or (init_weights and inflatable(arch)) else "scratch"


def start_label(init):
    """A short name for where a run started: scratch, inflate, or from-<name of the file or run folder>."""
    if init in INIT_WORDS:
        return init
    path = os.path.normpath(init)
    name = os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "checkpoint.pt" else os.path.basename(path)
    return "from-" + os.path.splitext(name)[0]


def start_backbone(backbone, arch, init, init_weights=""):
    """Set `backbone`'s weights for `init` ("scratch": as built; "inflate"; a PATH). Returns the record
    the checkpoint keeps (the caller adds the weights file's sha256)."""
    if init == "scratch":
        return {"init": "scratch"}
    if init == "inflate":
        try:
            _, path = inflate_student(backbone, arch, init_weights or None)
        except InflateError as e:
            raise StartError(str(e)) from None
        return {"init": "inflate", "from": IMAGE_COUNTERPARTS[counterpart_key(arch)], "weights": os.path.abspath(path)}
    path = checkpoint_file(init)
    backbone.load_state_dict(backbone_state(path, arch, backbone))
    return {"init": "path", "weights": os.path.abspath(path)}


def record_label(record):
    """A checkpoint's start record (None: a checkpoint from before starts were recorded) as a short name."""
    record = record or {"init": "scratch"}
    return start_label(record["weights"]) if record["init"] == "path" else record["init"]


def checkpoint_file(path):
    """RUN/ means RUN/checkpoint.pt; a missing file is one line."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise StartError(f"--init {path}: no such file; give scratch, inflate, RUN/, RUN/checkpoint.pt or a "
                         "torchvision-format export (`cli.py export`)")
    return path


def read_start_file(path):
    """The dict inside a checkpoint or a torchvision-format export (a TorchScript or ONNX export holds
    no state dict to train from)."""
    advice = "a TorchScript or ONNX export cannot be trained on: use RUN/checkpoint.pt or `cli.py export --format torchvision`"
    try:
        with warnings.catch_warnings():  # torch.load hands a TorchScript archive to torch.jit.load, and says so
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StartError(f"--init {path}: not a checkpoint or state dict ({type(e).__name__}: {str(e)[:100]}); {advice}") from None
    if not isinstance(state, dict):
        raise StartError(f"--init {path}: holds a {type(state).__name__}, not a checkpoint or state dict; {advice}")
    return state


def checkpoint_student(path):
    """The student architecture of a vidistill checkpoint at PATH (None: not a checkpoint, e.g. an export)."""
    state = read_start_file(checkpoint_file(path))
    return state["config"].get("student") if "config" in state and "model" in state else None


def backbone_state(path, arch, backbone):
    """The backbone weights held at PATH (a vidistill checkpoint, or a torchvision-format export of
    one), checked against `backbone` (an `arch`) key by key and shape by shape."""
    state = read_start_file(path)
    if "config" in state and "model" in state:  # a vidistill checkpoint: its backbone.* weights
        was = state["config"].get("student")
        if was != arch:
            raise StartError(f"--init {path}: a {was} checkpoint; this run's student is {arch} (pass --student {was})")
        return {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    want = backbone.state_dict()
    if not set(state) & set(want):  # a stock torchvision video model's state dict: the backbone wraps it as net.*
        state = {f"net.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(set(want) - set(state))
    wrong = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != tuple(want[k].shape))
    if missing or wrong:
        what = f"no {missing[0]!r}" if missing else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {tuple(want[wrong[0]].shape)}"
        raise StartError(f"--init {path}: these weights do not fit a {arch} ({what})")
    return {k: state[k] for k in want}
