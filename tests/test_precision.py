"""--precision: what auto picks on CPUs with and without native bf16, the one line that says so, the
autocast it builds, the choice a distill run saves in its checkpoint, and eval's bf16 features."""
import copy
import os

import h5py
import numpy as np
import pytest
import torch
from helpers import extract_config, make_video

from models.checkpoint import load_checkpoint
from models.students import HeadLinear, ProjectionHead
from pipeline.common.config import DistillConfig, EvalConfig
from pipeline.common.errors import DistillError
from pipeline.common.precision import (
    autocast,
    check_convolutions,
    describe_precision,
    native_bf16_flags,
    resolve_precision,
)
from pipeline.distill.augment import colour_augment
from pipeline.distill.train import run_distill
from pipeline.evaluate.evaluate import run_eval
from pipeline.extract.extract import run_extract

# capability maps as torch.cpu.get_capabilities() gives them
ZEN4 = {"avx512_f": True, "avx512_bf16": True, "amx_bf16": False, "architecture": "x86_64"}
SAPPHIRE_RAPIDS = {"avx512_f": True, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}
AMX_ONLY = {"amx_bf16": True}
SKYLAKE = {"avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
AVX2_ONLY = {"avx2": True}


@pytest.mark.parametrize("caps", [ZEN4, SAPPHIRE_RAPIDS, AMX_ONLY])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(caps):
    assert resolve_precision("auto", "cpu", caps) == "bf16"
    line = describe_precision("bf16", "cpu", caps)
    assert line.startswith("precision: bf16 autocast") and "natively" in line


@pytest.mark.parametrize("caps", [SKYLAKE, AVX2_ONLY, {}])
def test_auto_is_fp32_on_a_cpu_without_it(caps):
    assert resolve_precision("auto", "cpu", caps) == "fp32"
    assert describe_precision("fp32", "cpu", caps) == "precision: fp32"


def test_an_explicit_choice_is_kept_and_bf16_without_native_support_warns_in_one_line():
    assert resolve_precision("fp32", "cpu", ZEN4) == "fp32"
    assert resolve_precision("bf16", "cpu", SKYLAKE) == "bf16"
    warning = describe_precision("bf16", "cpu", SKYLAKE)
    assert warning.startswith("warning:") and "slower than fp32" in warning and "\n" not in warning
    assert not describe_precision("bf16", "cpu", ZEN4).startswith("warning")


def test_auto_is_bf16_on_cuda_whatever_the_cpu():
    assert resolve_precision("auto", "cuda:0", AVX2_ONLY) == "bf16"
    assert resolve_precision("fp32", "cuda", AVX2_ONLY) == "fp32"


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="--precision must be auto, fp32, bf16, not 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_this_cpus_flags_come_from_torch():
    assert native_bf16_flags() == [f for f in ("avx512_bf16", "amx_bf16") if torch.cpu.get_capabilities().get(f)]


def test_the_autocast_runs_convolutions_in_bf16_only_when_asked():
    conv, x = torch.nn.Conv3d(3, 4, 3), torch.randn(1, 3, 4, 8, 8)
    with autocast("bf16", "cpu"):
        assert conv(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert conv(x).dtype == torch.float32


@pytest.fixture(scope="module")
def two_video_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    for i in range(2):
        make_video(str(root / "videos" / f"v{i}.mp4"), n=12, h=48, w=64, seed=i, dx=i + 1)
    run_extract(extract_config(root / "videos", root / "cache", height=48, width=64))
    return str(root / "cache")


def weight_gradient(conv, x, grad_out, precision):
    conv.weight.grad = None
    with autocast(precision, "cpu"):
        out = conv(x)
    out.backward(grad_out)
    return conv.weight.grad, out.dtype


def test_checked_convolutions_train_with_fp32s_weight_gradients_where_onednn_bf16_gets_them_wrong():
    """oneDNN's bf16 weight gradient of a 3-frame kernel on a 2-frame input (a demo student's third stage) is
    NaN or off by ~1e36 on AVX512_BF16; checked, that layer trains in fp32 and the others stay in bf16."""
    torch.manual_seed(0)
    shallow, deep = torch.nn.Conv3d(64, 64, 3, padding=1), torch.nn.Conv3d(16, 16, 3, padding=1)
    model = torch.nn.ModuleList([shallow, deep])
    check_convolutions(model)
    for conv, x in ((shallow, torch.randn(8, 64, 2, 8, 8)), (deep, torch.randn(4, 16, 6, 16, 16))):
        grad_out = torch.randn(conv(x).shape)
        exact, _ = weight_gradient(conv, x, grad_out, "fp32")
        for _ in range(3):  # the wrong values change from call to call
            got, _ = weight_gradient(conv, x, grad_out, "bf16")
            assert (got - exact).norm() / exact.norm() < 0.05
    x = torch.randn(4, 16, 6, 16, 16)
    assert weight_gradient(deep, x, torch.randn(x.shape), "bf16")[1] == torch.bfloat16  # agrees: stays fast
    with torch.no_grad(), autocast("bf16", "cpu"):  # a momentum copy's forward: right in bf16, so left in bf16
        assert shallow(torch.randn(8, 64, 2, 8, 8)).dtype == torch.bfloat16
    copied = copy.deepcopy(model)  # a copy computes with its own weights
    assert copied[0].forward.__self__ is copied[0]


def test_grouped_convolutions_run_in_fp32_under_cpu_bf16_the_dense_ones_in_bf16():
    """oneDNN's bf16 depthwise 3D convolutions are slower than fp32 (an efficientnet3d step 1.5x fp32's time),
    so checked, they compute in fp32, training or not, and give fp32's values; dense ones stay bf16."""
    torch.manual_seed(0)
    depthwise, dense = torch.nn.Conv3d(16, 16, 3, padding=1, groups=16), torch.nn.Conv3d(16, 16, 1)
    check_convolutions(torch.nn.ModuleList([depthwise, dense]))
    x = torch.randn(2, 16, 4, 8, 8)
    exact = depthwise(x)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), autocast("bf16", "cpu"):
            out = depthwise(x)
            assert out.dtype == torch.float32 and torch.allclose(out, exact, atol=1e-6)
            assert dense(x).dtype == torch.bfloat16


def test_the_heads_compute_in_fp32_under_bf16_autocast_with_their_gradients():
    """A teacher head's logits (and a projection head's embedding) are what the losses compare: in bf16 a
    logit of 10 is off by up to 0.03, so the heads run in fp32 on a bf16 feature, with fp32's values."""
    torch.manual_seed(0)
    head, projection = HeadLinear(64, 1000), ProjectionHead(64, dim_out=16)
    feat = torch.randn(4, 64).bfloat16().float().requires_grad_()  # a bf16 backbone's feature, as fp32
    exact_logits, exact_embed = head(feat), projection(feat)
    exact_grad, = torch.autograd.grad(exact_logits.square().sum(), feat)
    with autocast("bf16", "cpu"):
        logits, embed = head(feat.bfloat16()), projection(feat.bfloat16())
    assert logits.dtype == embed.dtype == torch.float32
    assert torch.equal(logits, exact_logits) and torch.equal(embed, exact_embed)
    grad, = torch.autograd.grad(logits.square().sum(), feat)
    assert torch.allclose(grad, exact_grad, rtol=1e-2, atol=1e-2)  # through the bf16 cast of the feature
    with autocast("bf16", "cpu"):  # what the head replaced: nn.Linear would round its logits to bf16
        assert torch.nn.Linear.forward(head, feat).dtype == torch.bfloat16


def test_colour_augmentation_stays_fp32_under_bf16_autocast():
    video = torch.randint(0, 256, (4, 3, 2, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    exact = colour_augment(video, jitter_p=1.0, grayscale_p=0.5, blur_p=1.0)
    torch.manual_seed(0)
    with autocast("bf16", "cpu"):
        assert torch.equal(colour_augment(video, jitter_p=1.0, grayscale_p=0.5, blur_p=1.0), exact)


def tiny_run(cache, out, **kw):
    return DistillConfig(cache=cache, out=str(out), objective="modist", student="r3d_cpu", clip_len=4, stride=2,
                         crop=32, batch_size=2, workers=0, queue_size=2, log_every=1, save_every=1, progress=False,
                         **kw)


@pytest.mark.slow
def test_distill_prints_the_choice_once_saves_it_and_may_resume_with_another(two_video_cache, tmp_path, capsys):
    cache = two_video_cache
    out = tmp_path / "run"
    run_distill(tiny_run(cache, out, steps=2, precision="auto"))
    chosen = resolve_precision("auto", "cpu")  # this machine's answer
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["config"]["precision"] == chosen
    out_lines = capsys.readouterr().out.splitlines()
    printed = [line for line in out_lines if line.startswith("precision:") or "--precision" in line]
    assert printed == [describe_precision(chosen, "cpu")]
    # precision is not a resume key: the run goes on at another one, and the checkpoint says which it used last
    other = "fp32" if chosen == "bf16" else "bf16"
    s = run_distill(tiny_run(cache, out, steps=3, precision=other))
    assert (s["steps"], s["steps_this_run"]) == (3, 1)
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["config"]["precision"] == other


def test_distill_refuses_an_unknown_precision_in_one_line(tmp_path):
    with pytest.raises(DistillError, match="--precision must be"):
        run_distill(tiny_run(str(tmp_path / "no-cache"), tmp_path / "run", steps=1, precision="fp8"))


@pytest.mark.slow
def test_eval_keeps_bf16_features_apart_from_fp32_ones_and_fine_tunes_in_either(tmp_path):
    for i in range(3):
        make_video(str(tmp_path / "videos" / "left" / f"l{i}.mp4"), n=12, h=48, w=64, seed=10 + i, dx=-3)
        make_video(str(tmp_path / "videos" / "right" / f"r{i}.mp4"), n=12, h=48, w=64, seed=20 + i, dx=3)
    common = dict(task="folder", root=str(tmp_path / "videos"), work=str(tmp_path / "work"), inits=("scratch",),
                  protocols=("linear", "finetune"), clips=1, crops=1, finetune_epochs=1, batch_size=2,
                  test_fraction=0.5, progress=False)
    results = {p: run_eval(EvalConfig(out=str(tmp_path / p), precision=p, **common)) for p in ("fp32", "bf16")}
    stores = {}
    for precision, (rows, _, notes) in results.items():
        assert {r["precision"] for r in rows} == {precision}
        assert describe_precision(precision, "cpu") in notes
        assert {r["protocol"] for r in rows} == {"linear", "finetune"}
        stores[precision] = {r["features"] for r in rows if r["protocol"] == "linear"}.pop()
    assert stores["fp32"] != stores["bf16"]  # one store each: a bf16 run never reads fp32 features, nor back
    fp32, bf16 = (h5py.File(stores[p], "r")["features"][()] for p in ("fp32", "bf16"))
    assert np.abs(bf16 - fp32).max() <= 0.05 * np.abs(fp32).max()  # the same network, rounded to bf16
