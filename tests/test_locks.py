"""flock locks: refused while another live process holds them, naming it; free when it dies."""
import os
import subprocess
import sys

import pytest

from pipeline.common.locks import FileLock, LockBusy, is_held, lock_holder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time; sys.path.insert(0, '.'); from pipeline.common.locks import FileLock; "
        "lock = FileLock(sys.argv[1]); print('held', flush=True); time.sleep(60)")


def test_a_lock_held_by_another_process_is_refused_naming_it_and_freed_when_it_dies(tmp_path):
    path = str(tmp_path / "sub" / ".lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held(path)
        with pytest.raises(LockBusy) as refused:
            FileLock(path)
        assert refused.value.holder.startswith(f"pid {holder.pid} on ") and " since " in refused.value.holder
    finally:
        holder.kill()
        holder.wait()
    assert not is_held(path)  # the kernel dropped the flock with its holder; the file alone means nothing
    with FileLock(path):
        assert lock_holder(path).startswith(f"pid {os.getpid()} ")
        with pytest.raises(LockBusy):  # one process, two opens: flock still refuses the second
            FileLock(path)
    assert not is_held(path)
