"""`pip install .` gives a `vidistill` command: the same click group as cli.py, with every package and
data file the commands need (the class lists of `cli.py concepts` among them)."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_wheel_installs_a_vidistill_command(tmp_path):
    # the dependencies are this environment's; the wheel itself is built and installed for real
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 "demo_out", "runs", "caches"))
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("vidistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("cli.py", "pipeline/common/config.py", "pipeline/extract/extract.py", "pipeline/demo/demo.py",
                   "cache/reader.py", "models/students.py", "pipeline/distill/classlists/ucf101.txt"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([str(target / "bin" / "vidistill"), "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for command in ("extract", "distill", "eval", "demo", "concepts", "export", "cache"):
        assert command in out.stdout
    # the installed copy, not the checkout, answers (run from elsewhere)
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path).stdout
    assert where.startswith(str(target))
