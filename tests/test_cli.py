"""The three commands of the design card, run verbatim in an empty working folder, and the CLI's
own promises (defaults read from the configs, answers before heavy imports)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import make_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = os.path.join(REPO, "tests", "data", "ucfTrainTestlist")
# three classes of the official split 1: groups 08-25 train, 01-07 test
UCF_CLASSES = {"ApplyEyeMakeup": 0, "Archery": 1, "BabyCrawling": 2}
UCF_PRESENT = [f"{c}/v_{c}_g{g:02d}_c01.avi" for c in UCF_CLASSES for g in (8, 9, 1)]


def cli(cwd, *args, env=None, timeout=900):
    return subprocess.run([sys.executable, os.path.join(REPO, "cli.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def ucf101_tree(root, layout="official"):
    """A handful of UCF101 videos of three classes, named as the official split files name them.
    layout "official": ROOT/UCF-101/<Class>/ beside ROOT/ucfTrainTestlist/ (as the archives unpack);
    "deeper": each one level deeper, as ROOT/UCF101/UCF-101 and ROOT/UCF101TrainTestSplits-RecognitionTask/."""
    videos = os.path.join(root, "UCF-101") if layout == "official" else os.path.join(root, "UCF101", "UCF-101")
    splits = os.path.join(root, "ucfTrainTestlist") if layout == "official" else \
        os.path.join(root, "UCF101TrainTestSplits-RecognitionTask", "ucfTrainTestlist")
    shutil.copytree(SPLITS, splits)
    for i, rel in enumerate(UCF_PRESENT):
        cls = UCF_CLASSES[rel.split("/")[0]]
        make_video(os.path.join(videos, rel), n=16, seed=10 * cls + i, dx=cls + 1, codec="mpeg4")
    return videos


@pytest.mark.slow
def test_the_three_card_commands_work_verbatim_in_an_empty_folder(tmp_path):
    for i in range(8):
        make_video(str(tmp_path / "dir" / f"clip{i}.mp4"), n=16, seed=i, dx=1 + i % 3)
    ucf101_tree(str(tmp_path / "data" / "ucf101"))

    extract = cli(tmp_path, "extract", "--videos", "dir/")
    assert extract.returncode == 0, extract.stderr
    assert os.path.isfile(tmp_path / "cache" / "cache.json")  # the default cache, where distill looks
    assert "extracted 8 videos" in extract.stdout

    distill = cli(tmp_path, "distill", "--cache", "cache/")
    assert distill.returncode == 0, distill.stderr
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and os.path.isfile(latest / "checkpoint.pt")
    run = os.path.realpath(latest)
    assert os.path.basename(run).startswith("distinit-") and os.path.dirname(run) == os.path.realpath(tmp_path / "runs")
    assert "checkpoint:" in distill.stdout

    again = cli(tmp_path, "distill", "--cache", "cache/")  # same settings, finished: no new folder
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stdout
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(["latest", os.path.basename(run)])

    evaluate = cli(tmp_path, "eval", "--task", "ucf101")
    assert evaluate.returncode == 0, evaluate.stderr
    assert "runs/latest/checkpoint.pt" in evaluate.stdout  # found the distill run by default
    # the listed videos that are not on disk are reported; the present ones are scored
    assert "listed but missing on disk" in evaluate.stdout
    results = json.load(open(tmp_path / "eval_out" / "results.json"))["results"]
    assert {r["init"] for r in results} == {"checkpoint", "scratch", "inflate", "teacher"}
    first = results[0]
    assert first["train_videos"] == 6 and first["test_videos"] == 3
    assert os.path.realpath(os.path.dirname(next(r for r in results if r["init"] == "checkpoint")["checkpoint"])) == run


def test_eval_without_data_says_where_it_looked_and_where_to_get_it(tmp_path):
    out = cli(tmp_path, "eval", "--task", "ucf101", env={**os.environ, "VIDISTILL_DATA": str(tmp_path / "nowhere")})
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    message = out.stderr.strip()
    assert "\n" not in message
    assert str(tmp_path / "nowhere" / "ucf101") in message  # where it looked
    assert "UCF-101" in message and "ucfTrainTestlist" in message  # the layout it expects
    assert "UCF101.rar" in message and "crcv.ucf.edu" in message  # where the official archives are
    hmdb = cli(tmp_path, "eval", "--task", "hmdb51")
    assert hmdb.returncode != 0 and "data/hmdb51" in hmdb.stderr and "hmdb51_org" in hmdb.stderr


def test_folder_task_still_needs_a_root(tmp_path):
    out = cli(tmp_path, "eval", "--task", "folder")
    assert out.returncode != 0 and "--root" in out.stderr and "Traceback" not in out.stderr


def test_a_mistyped_option_is_answered_before_torch_is_imported(tmp_path):
    t = time.perf_counter()
    out = cli(tmp_path, "distill", "--no-such-option")
    assert out.returncode == 2 and "No such option" in out.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['cli.py', 'distill', '--help']; "
                            "import cli; import contextlib, io\n"
                            "with contextlib.redirect_stdout(io.StringIO()):\n"
                            "    try: cli.cli()\n"
                            "    except SystemExit: pass\n"
                            "print('torch' in sys.modules)"], cwd=REPO, capture_output=True, text=True)
    assert probe.stdout.strip() == "False", probe.stderr
    assert time.perf_counter() - t < 30


def test_cli_defaults_are_the_config_defaults():
    import click

    import cli as cli_module
    from pipeline.common.config import (
        ConceptsConfig,
        DistillConfig,
        EvalConfig,
        ExportConfig,
        ExtractConfig,
        ShowConfig,
    )
    commands = dict(cli_module.cli.commands, show=cli_module.cli.commands["cache"].commands["show"])
    checked = 0
    for command, config in (("extract", ExtractConfig), ("distill", DistillConfig), ("eval", EvalConfig),
                            ("export", ExportConfig), ("show", ShowConfig), ("concepts", ConceptsConfig)):
        ctx = click.Context(commands[command])
        for param in commands[command].params:
            field = config.__dataclass_fields__.get(param.name)
            if field is None or field.default is dataclasses.MISSING or getattr(param, "is_flag", False):
                continue
            got = param.get_default(ctx)  # as click will pass it: "1" for a Choice, a list for multiple
            if isinstance(field.default, tuple):
                got = tuple(got)
            elif field.default is not None and got is not None:
                got = type(field.default)(got)
            assert got == field.default, f"{command} --{param.name}: CLI {got!r}, config {field.default!r}"
            checked += 1
    assert checked > 50


def _commands(group, prefix=()):
    """Every command's argv prefix, sub-commands included (cache info, cache verify, ...)."""
    import click
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,)


def test_every_command_answers_a_bad_option_or_value_before_importing_torch():
    import cli as cli_module
    commands = list(_commands(cli_module.cli))
    assert {("extract",), ("distill",), ("eval",), ("embed",), ("cache", "info")} <= set(commands)
    probes = [c + ("--no-such-option",) for c in commands] + [
        ("extract", "--videos", "v", "--fps", "0"), ("extract", "--videos", "v", "--workers", "0"),
        ("eval", "--task", "folder", "--test-fraction", "1.5"), ("eval", "--task", "nope"),
        ("eval", "--task", "ucf101", "--split", "4"), ("embed", "--videos", "v", "--checkpoint", "c", "--out", "o",
                                                      "--clips", "0")]
    script = ("import json, sys; sys.argv = ['cli.py']; import cli, contextlib, io\n"
              "out = []\n"
              "for argv in json.loads(sys.argv_probes):\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
              "        try: cli.cli(argv, prog_name='cli.py')\n"
              "        except SystemExit as e: code = e.code\n"
              "    out.append([argv, code, err.getvalue(), 'torch' in sys.modules])\n"
              "print(json.dumps(out))").replace("sys.argv_probes", repr(json.dumps(probes)))
    t = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for argv, code, err, torch_loaded in json.loads(result.stdout):
        assert code == 2 and ("No such option" in err or "Invalid value" in err), (argv, err)
        assert not torch_loaded, f"{' '.join(argv)}: torch was imported before the arguments were checked"
    assert time.perf_counter() - t < 30


def test_an_interrupt_that_python_can_only_print_still_ends_the_command_non_zero(tmp_path):
    # A Ctrl-C landing in a DataLoader's worker shutdown (a __del__) is "ignored" by Python, which prints
    # a traceback and carries on to exit 0; distill's guard makes it one line and exit 130.
    script = ("import os, signal, sys, time; sys.argv = ['cli.py']; import cli\n"
              "class ShutsWorkersDown:\n"
              "    def __del__(self):\n"
              "        os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5)\n"
              "with cli._exit_on_interrupt('interrupted: one line'):\n"
              "    ShutsWorkersDown()\n"
              "print('finished as if nothing happened')")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and result.stdout == ""
    assert result.stderr == "interrupted: one line\n"
