"""Settings shared by the CLI and every stage: the evaluation table's default rows, and a torch-free import."""
import os
import subprocess
import sys

from pipeline.common.config import EvalConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_rows_default_to_the_checkpoint_against_every_baseline():
    assert EvalConfig(task="folder", root="x").rows() == ("scratch", "inflate", "teacher")
    with_ckpt = EvalConfig(task="folder", root="x", checkpoint="run/checkpoint.pt")
    assert with_ckpt.rows() == ("checkpoint", "scratch", "inflate", "teacher")
    assert EvalConfig(task="folder", root="x", checkpoint="c.pt", inits=("teacher",)).rows() == ("teacher",)
    assert EvalConfig(task="folder", root="x").protocols == ("linear", "knn", "retrieval")  # finetune: opt in


def test_config_imports_nothing_heavy():
    code = "import sys, pipeline.common.config; bad = {'torch', 'cv2'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
