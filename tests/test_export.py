"""`cli.py export`: every format is reloaded the way a user would load it and compared numerically
with the checkpoint's backbone on the same clips; the torchvision format loads into the stock
torchvision constructor with strict=True."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from helpers import hand_made_cache, tiny_checkpoint

from cli import cli
from models.checkpoint import load_student
from models.students import normalize_video
from pipeline.common.config import ExportConfig
from pipeline.common.errors import ExportError
from pipeline.evaluate.export import relative_error, run_export

# max |export - original| / max |original|, as the export checks it. Measured: 0 (state dict, TorchScript),
# <= 5e-7 (ONNX, ResNets), 1.3e-4 (ONNX, EfficientNet3d, whose float32 PyTorch output is 8e-5 from float64)
TOL = 1e-3


def clip(b=2, t=4, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return normalize_video(torch.from_numpy(rng.integers(0, 256, (b, 3, t, size, size), dtype=np.uint8)))


def reload(fmt, path, student, num_classes=None):
    """The export as a user loads it, without vidistill's export code: a callable on a float clip."""
    if fmt == "torchscript":
        net = torch.jit.load(path)
        return lambda x: net(x).detach().numpy()
    if fmt == "onnx":
        import onnxruntime
        sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"video": x.numpy()})[0]
    state = torch.load(path, weights_only=True)
    if student in ("r2plus1d_18", "r3d_18", "mc3_18"):
        net = getattr(torchvision.models.video, student)(**({"num_classes": num_classes} if num_classes else {}))
        net.load_state_dict(state, strict=True)
        net.fc = torch.nn.Identity()  # compare the features; the fc is checked separately
    else:
        from models.students import build_student
        net = build_student(student)
        net.load_state_dict(state, strict=True)
    net.eval()
    return lambda x: net(x).detach().numpy()


def export_and_compare(tmp_path, student, fmt, objective="distinit", t=4, size=48):
    ckpt = tiny_checkpoint(tmp_path / f"{student}.pt", student, objective, clip_len=t, crop=size)
    out = str(tmp_path / f"{student}.{fmt}")
    s = run_export(ExportConfig(checkpoint=ckpt, format=fmt, out=out))
    assert os.path.isfile(out) and s["out"] == out
    assert max(s["check"].values()) <= TOL, s["check"]
    original = load_student(ckpt)[0]
    exported = reload(fmt, out, student, 1000 if objective != "modist" else None)
    with torch.no_grad():
        for x in (clip(t=t, size=size), clip(b=1, t=2 * t, size=size, seed=1)):  # other batch, length than traced
            err = relative_error(exported(x), original(x).numpy())
            assert err <= TOL, (fmt, student, err)
    return s


@pytest.mark.parametrize("fmt", ["torchvision", "torchscript", "onnx"])
def test_the_cpu_student_exports_in_every_format(tmp_path, fmt):
    s = export_and_compare(tmp_path, "r3d_cpu", fmt)
    saved = json.load(open(s["out"] + ".json"))
    assert saved["contract"]["mean"] == [0.43216, 0.394666, 0.37645] and saved["contract"]["fps"] == 8.0
    if fmt == "torchvision":  # the printed build lines are what the check ran
        assert "net = build_student('r3d_cpu')" in s["build"]


@pytest.mark.slow  # a 31 M-parameter network built four times: ~6 s on an idle 2-core machine
def test_torchvision_format_loads_into_the_stock_constructor_with_the_head_as_fc(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c.pt", "r2plus1d_18", "distinit", clip_len=2, crop=32)  # small: quick
    out = str(tmp_path / "r2plus1d_18.pt")
    s = run_export(ExportConfig(checkpoint=ckpt, format="torchvision", out=out))
    net = torchvision.models.video.r2plus1d_18(num_classes=1000)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    net.eval()
    backbone, raw = load_student(ckpt)
    head = torch.nn.Linear(512, 1000)
    head.load_state_dict({k.split(".", 1)[1]: v for k, v in raw["model"].items() if k.startswith("distill_head.")})
    x = clip(t=2, size=32)
    with torch.no_grad():
        assert relative_error(net(x).numpy(), head(backbone(x)).numpy()) <= TOL
    assert "net = torchvision.models.video.r2plus1d_18(num_classes=1000)" in s["build"]
    assert any("distillation head" in n for n in s["notes"])


@pytest.mark.slow  # a 31 M-parameter network built four times: ~6 s on an idle 2-core machine
def test_a_run_without_a_head_exports_the_stock_400_way_fc_and_says_it_is_untrained(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c.pt", "r2plus1d_18", "modist", clip_len=2, crop=32)
    out = str(tmp_path / "r2plus1d_18.pt")
    s = run_export(ExportConfig(checkpoint=ckpt, format="torchvision", out=out))
    net = torchvision.models.video.r2plus1d_18()  # the constructor's defaults, strict
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert any("UNTRAINED" in n for n in s["notes"])
    with pytest.raises(ExportError, match="no distillation head"):
        run_export(ExportConfig(checkpoint=ckpt, format="torchvision", out=out, fc="head"))


def test_an_export_outside_the_tolerance_is_refused_and_not_written(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "x.onnx"
    with pytest.raises(ExportError, match="does not reproduce the checkpoint"):  # ONNX differs by ~1e-7, not 0
        run_export(ExportConfig(checkpoint=ckpt, format="onnx", out=str(out), tolerance=0.0))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_cli_export_checks_on_the_runs_own_cache_and_prints_the_input_contract(tmp_path):
    cache = hand_made_cache(tmp_path / "cache", lengths=(20, 12))
    run = tmp_path / "run"
    run.mkdir()
    tiny_checkpoint(run / "checkpoint.pt", cache=cache)
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(run), "--format", "torchscript"])
    assert r.exit_code == 0, r.output
    assert os.path.isfile(run / "r3d_cpu-torchscript.pt")  # default: beside the checkpoint
    assert "checked on clips of 'v0' and 'v1'" in r.output
    for needle in ("[B, 3, T, H, W]", "trained at T=4, H=W=48", "0.43216", "0.22803", "decoded at 8 fps",
                   "every 2nd stored frame", "torch.jit.load("):
        assert needle in r.output, needle
    missing = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.output


@pytest.mark.slow
@pytest.mark.parametrize("student,fmt", [(s, f) for s in ("r2plus1d_18", "r3d_18", "mc3_18")
                                         for f in ("torchscript", "onnx")]
                         + [("r3d_18", "torchvision"), ("mc3_18", "torchvision")]
                         + [(s, f) for s in ("r3d_10_half", "efficientnet3d_lite0")
                            for f in ("torchvision", "torchscript", "onnx")]
                         + [("vit3d:vit_tiny_patch16_224", f) for f in ("torchvision", "torchscript")])
def test_every_student_exports_in_every_format(tmp_path, student, fmt):
    export_and_compare(tmp_path, student, fmt, t=2, size=32)  # small clips: the networks are large


def test_a_vit_student_refuses_onnx_in_one_line(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "vit.pt", "vit3d:vit_tiny_patch16_224", clip_len=2, crop=32)
    with pytest.raises(ExportError, match="vit3d:vit_tiny_patch16_224 student does not export to ONNX") as e:
        run_export(ExportConfig(checkpoint=ckpt, format="onnx", out=str(tmp_path / "vit.onnx")))
    assert "\n" not in str(e.value) and not (tmp_path / "vit.onnx").exists()
