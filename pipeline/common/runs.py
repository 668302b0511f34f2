"""Where runs live when the user names none: runs/<objective>-<date-time>/, with runs/latest pointing
at the newest, so `distill` then `eval` find each other's output without a path being typed.

Torch-free: `cli.py eval` resolves its default checkpoint through here before any heavy import.
"""
import datetime
import os

RUNS_DIR = "runs"
LATEST = "latest"
RUN_LOCK = ".lock"  # RUN/.lock: held (flock) by the distill training into RUN


def new_run_dir(objective, runs_dir=RUNS_DIR):
    """A fresh runs/<objective>-<YYYYmmdd-HHMMSS>[-N] folder name (not yet created)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(runs_dir, f"{objective}-{stamp}"), 1
    while os.path.exists(path):  # two runs started within one second
        n += 1
        path = os.path.join(runs_dir, f"{objective}-{stamp}-{n}")
    return path


def point_latest(run_dir, runs_dir=RUNS_DIR):
    """Make runs/latest name run_dir: a relative symlink, or a one-line file where links are not
    possible (some network and Windows file systems)."""
    os.makedirs(runs_dir, exist_ok=True)
    link = os.path.join(runs_dir, LATEST)
    tmp = f"{link}.{os.getpid()}.tmp"
    target = os.path.relpath(run_dir, runs_dir)
    try:
        os.symlink(target, tmp)
    except OSError:
        with open(tmp, "w") as f:
            f.write(target + "\n")
    if os.path.isdir(link) and not os.path.islink(link):
        raise OSError(f"{link} is a folder, not a pointer to the latest run; rename it")
    os.replace(tmp, link)  # atomic: a reader sees the old run or the new one


def latest_run(runs_dir=RUNS_DIR):
    """The folder runs/latest names, or None when there is no latest run."""
    link = os.path.join(runs_dir, LATEST)
    if os.path.islink(link) or os.path.isdir(link):
        return link if os.path.isdir(link) else None
    if os.path.isfile(link):
        with open(link) as f:
            path = os.path.join(runs_dir, f.read().strip())
        return path if os.path.isdir(path) else None
    return None


def checkpoint_path(path):
    """A checkpoint given as a file or as its run folder (RUN/ means RUN/checkpoint.pt)."""
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
