"""Exactly once on shared storage: jobs that stall, race, or list different videos store every video once,
and every committed part reads; the store's and the file system's refusals are one line. Real components:
moto's S3 server on 127.0.0.1, a proxy in front of it that the tests control (tests/s3proxy.py), real
processes, real SIGSTOP/SIGKILL; leases of a few seconds (VIDISTILL_LEASE_SECONDS)."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from s3proxy import S3Proxy, is_conditional_write, is_lease_write, is_write
from test_s3 import FAST, REPO, bucket, s3_env, videos  # noqa: F401 (fixtures)

from cache.fingerprint import CacheError
from cache.index import INDEX_FILE, READABLE, committed_parts, read_part_tables
from cache.manifest import verify_cache
from cache.reader import CacheReader
from cache.storage import open_storage
from cli import cli as vidistill
from pipeline.common.config import ExtractConfig
from pipeline.common.errors import ExtractError
from pipeline.extract.extract import run_extract

LEASE = 3.0  # seconds: renewed every second


def copies(url):
    """{video id: how many committed parts hold a readable record of it}."""
    counts = {}
    for table in read_part_tables(url, committed_parts(url)).values():
        for rec in table:
            if rec["status"] in READABLE:
                counts[rec["id"]] = counts.get(rec["id"], 0) + 1
    return counts


def assert_exactly_once(url, ids):
    """Every video committed once, nothing damaged, every committed video readable."""
    assert copies(url) == {i: 1 for i in ids}
    assert verify_cache(url)[0] == []
    reader = CacheReader(url)
    for vid in ids:
        assert len(reader.read(vid, fields=("frames",))["frames"]) == reader.num_frames(vid)


def start_job(url, src, env, *more):
    cmd = [sys.executable, "cli.py", "extract", "--videos", str(src), "--cache", url, "--part-videos", "1",
           "--height", "48", "--width", "64", "--teacher-every", "4", *more]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, **env, VIDISTILL_LEASE_SECONDS=str(LEASE)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.strip()


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def lease_token(storage):
    try:
        return json.loads(storage.read("locks", "shard-0-of-1.lock")).get("token")
    except (OSError, ValueError):
        return None


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def group_but(leader):
    """The processes of `leader`'s process group but the leader: its workers, their ffmpegs."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[2]) == leader and int(entry) != leader:
            pids.append(int(entry))
    return pids


def assert_lost_in_one_line(rc, err):
    """Exit 2 with one error line last (progress lines, plain in a log, may come before it)."""
    last = err.splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and "Traceback" not in err and err.count("error") == 1, err
    assert "taken over" in last or "could not be renewed" in last, err


@pytest.fixture
def proxy(s3_env):
    p = S3Proxy(s3_env["AWS_ENDPOINT_URL"].split("://", 1)[1])
    yield p
    p.stop()


def _takeover(url, src, s3_env, storage):
    """Start job B straight at the store once job A's lease (token read now) has expired; returns B once it
    holds the shard."""
    token_a = lease_token(storage)
    time.sleep(LEASE + 0.5)
    b = start_job(url, src, s3_env)
    wait_for(lambda: lease_token(storage) not in (None, token_a) or b.poll() is not None)
    return b


@pytest.mark.slow
def test_a_writer_whose_lease_writes_hang_commits_nothing_after_a_takeover(tmp_path, bucket, s3_env, proxy):
    src = videos(tmp_path / "v", 10, frames=16)
    url = f"{bucket}/stalled"
    storage = open_storage(url)
    a = start_job(url, src, dict(s3_env, AWS_ENDPOINT_URL=proxy.url))
    wait_for(lambda: storage.list("commits"))
    proxy.hold(is_lease_write)  # A's renewals and commits hang (B goes to the store directly)
    b = _takeover(url, src, s3_env, storage)
    proxy.release()  # A's held writes reach the store now, after the takeover
    assert_lost_in_one_line(*finish(a))
    rc, err = finish(b)
    assert rc == 0, err
    assert_exactly_once(url, [f"v{i}.mp4" for i in range(10)])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_writer_stopped_past_its_lease_commits_nothing_when_it_continues(tmp_path, bucket, s3_env, workers):
    src = videos(tmp_path / "v", 8, frames=16)
    url = f"{bucket}/stopped{workers}"
    storage = open_storage(url)
    a = start_job(url, src, s3_env, "--workers", str(workers))
    wait_for(lambda: storage.list("commits"))
    os.killpg(a.pid, signal.SIGSTOP)  # the job and its workers
    b = _takeover(url, src, s3_env, storage)
    if workers > 1:
        # the workers go on while the job's main process (its renewal, its stop request) stays stopped:
        # each must find out for itself, at its next commit, that the shard is B's now
        workers = [pid for pid in children(a.pid) if "spawn_main" in open(f"/proc/{pid}/cmdline").read()]
        for pid in group_but(a.pid):
            with contextlib.suppress(ProcessLookupError):  # one that ended as it was stopped (an ffmpeg) is gone
                os.kill(pid, signal.SIGCONT)
        rc, err = finish(b)
        assert rc == 0, err
        for pid in workers:  # each found at its next commit that the shard is B's, and ended
            wait_for(lambda: open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z")
    os.killpg(a.pid, signal.SIGCONT)
    assert_lost_in_one_line(*finish(a))
    if workers == 1:
        rc, err = finish(b)
        assert rc == 0, err
    assert_exactly_once(url, [f"v{i}.mp4" for i in range(8)])


@pytest.mark.slow
def test_the_workers_of_a_killed_local_job_commit_nothing_once_the_next_job_holds_the_shard(tmp_path):
    src = videos(tmp_path / "v", 8, frames=16)
    cache = tmp_path / "c"
    a = start_job(str(cache), src, {}, "--workers", "2")
    wait_for(lambda: os.path.isdir(cache / "commits") and os.listdir(cache / "commits"))
    workers = children(a.pid)
    os.killpg(a.pid, signal.SIGSTOP)
    a.kill()  # the job's main process alone: the kernel frees its flock, its workers live on
    a.wait()
    b = start_job(str(cache), src, {})
    wait_for(lambda: "pid" in open(cache / "locks" / "shard-0-of-1.lock").read() and
             f"pid {a.pid} " not in open(cache / "locks" / "shard-0-of-1.lock").read())
    os.killpg(a.pid, signal.SIGCONT)  # its workers and their ffmpegs (the job's main process is gone)
    rc, err = finish(b)
    assert rc == 0, err
    for pid in workers:  # each found at its next commit that its job is gone
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z")
    assert_exactly_once(str(cache), [f"v{i}.mp4" for i in range(8)])


@pytest.mark.slow
def test_two_jobs_racing_for_one_shard_store_every_video_once(tmp_path, bucket, s3_env):
    src = videos(tmp_path / "v", 6)
    url = f"{bucket}/race"
    jobs = [start_job(url, src, s3_env) for _ in range(2)]
    results = [finish(j) for j in jobs]
    for rc, err in results:  # one did the work; the other was refused, or found nothing left to do
        assert rc == 0 or (rc == 2 and "Traceback" not in err and
                           "is being extracted by another process" in err.splitlines()[-1]), err
    assert_exactly_once(url, [f"v{i}.mp4" for i in range(6)])


@pytest.mark.slow
def test_a_store_that_ignores_conditional_writes_is_refused_unless_single_writer(tmp_path, bucket, proxy, monkeypatch):
    src = videos(tmp_path / "v", 2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.drop_conditions = True
    url = f"{bucket}/ignores"
    with pytest.raises(ExtractError, match=rf"^{url}: the store ignores If-None-Match .* pass --single-writer"):
        run_extract(ExtractConfig(videos=str(src), cache=url, **FAST))
    assert json.loads(open_storage(url).read("locks/store-probe.json"))["honoured"] is False  # probed once, recorded
    assert run_extract(ExtractConfig(videos=str(src), cache=url, single_writer=True, **FAST))["done"] == 2
    assert_exactly_once(url, ["v0.mp4", "v1.mp4"])


@pytest.mark.slow
def test_shard_jobs_over_listings_that_differ_split_every_video_the_same_way(tmp_path):
    """Job 0 lists one video fewer than job 1 (added between their starts), then the other way round (one
    removed): every video lands in exactly one shard, whichever listing a job saw."""
    full = videos(tmp_path / "all", 8)
    for missing, shard in (("v7.mp4", 0), ("v3.mp4", 1)):
        cache = tmp_path / f"c-{missing}"
        fewer = tmp_path / f"without-{missing}"
        fewer.mkdir()
        for name in os.listdir(full):
            if name != missing:
                os.link(full / name, fewer / name)  # the same files (size, mtime): the same sources
        for listing, index in ((fewer, shard), (full, 1 - shard)):
            run_extract(ExtractConfig(videos=str(listing), cache=str(cache), shard=(index, 2), **FAST))
        for index in (0, 1):  # both rerun over the full listing: the missing video is extracted, nothing twice
            run_extract(ExtractConfig(videos=str(full), cache=str(cache), shard=(index, 2), **FAST))
        assert_exactly_once(str(cache), [f"v{i}.mp4" for i in range(8)])


@contextlib.contextmanager
def read_only(folder):
    """`folder` read-only for this process: a read-only bind mount as root (who ignores permissions),
    else the permissions."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        yield
        os.chmod(folder, 0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)])


def one_line_error(*args):
    result = CliRunner().invoke(vidistill, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr.strip()


def extract_args(src, cache, *more):
    return ["extract", "--videos", str(src), "--cache", str(cache), "--height", "48", "--width", "64",
            "--teacher-every", "4", *more]


def test_a_read_only_folder_is_one_line_for_a_new_and_an_existing_cache(tmp_path):
    src = videos(tmp_path / "v", 1)
    place = tmp_path / "ro"
    (place / "old").mkdir(parents=True)
    run_extract(ExtractConfig(videos=str(src), cache=str(place / "old"), **FAST))
    with read_only(place):
        err = one_line_error(*extract_args(src, place / "new"))
        assert str(place) in err and ("Read-only file system" in err or "Permission denied" in err), err
        err = one_line_error(*extract_args(src, place / "old"))
        assert str(place / "old") in err and "cannot create a lock file" in err, err


def test_a_store_that_denies_writes_or_conditional_writes_is_one_line(tmp_path, bucket, proxy, monkeypatch):
    src = videos(tmp_path / "v", 1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.answer = (is_write, 403, "AccessDenied")
    err = one_line_error(*extract_args(src, f"{bucket}/denied"))
    assert f"{bucket}/denied/" in err and "403 Forbidden" in err and "AccessDenied" in err, err
    err = one_line_error(*extract_args(src, f"{bucket}/denied", "--single-writer"))  # no probe: cache.json is first
    assert err.startswith(f"error: {bucket}/denied/cache.json: refused with 403 Forbidden"), err
    proxy.answer = (is_conditional_write, 403, "AccessDenied")
    err = one_line_error(*extract_args(src, f"{bucket}/denied-conditional"))
    assert f"{bucket}/denied-conditional/" in err and "403 Forbidden" in err, err
    proxy.answer = (is_conditional_write, 501, "NotImplemented")
    err = one_line_error(*extract_args(src, f"{bucket}/no-conditions"))
    assert "501 Not Implemented" in err and "--single-writer" in err, err
    # vouched for: no conditional write is sent, and the cache is written
    result = CliRunner().invoke(vidistill, extract_args(src, f"{bucket}/no-conditions", "--single-writer"))
    assert result.exit_code == 0, result.output
    proxy.answer = None
    assert_exactly_once(f"{bucket}/no-conditions", ["v0.mp4"])


def test_a_corrupted_index_byte_is_reported_by_verify_and_rebuilt_by_readers(tmp_path):
    src = videos(tmp_path / "v", 3)
    cache = tmp_path / "c"
    run_extract(ExtractConfig(videos=str(src), cache=str(cache), **FAST))
    before = CacheReader(str(cache))
    intact = {vid: before.read(vid, fields=("frames",))["frames"] for vid in before.ids}
    data = bytearray((cache / INDEX_FILE).read_bytes())
    n = int.from_bytes(data[8:16], "little")
    header = json.loads(bytes(data[16:16 + n]))
    base = 16 + n + (-(16 + n) % 64)
    second = base + header["columns"]["frame_offset"]["offset"] + 8  # the second video's frame_offset
    data[second:second + 8] = (0).to_bytes(8, "little")  # now the first video's frames
    (cache / INDEX_FILE).write_bytes(bytes(data))
    leftover = cache / "commits" / "part-x.zarr.json.0123abcd.tmp"  # what a kill mid-write leaves
    leftover.write_bytes(b"{")
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    result = CliRunner().invoke(vidistill, ["cache", "verify", str(cache)])
    assert result.exit_code == 1, result.output
    assert f"DAMAGED: the consolidated index {cache / INDEX_FILE} is damaged (it fails its checksum)" in result.output
    assert "1 temporary file(s) (*.tmp) left by killed writes" in result.output
    info = subprocess.run([sys.executable, "cli.py", "cache", "info", str(cache)], cwd=REPO, capture_output=True,
                          text=True)
    assert info.returncode == 0 and info.stderr == (f"warning: {cache / INDEX_FILE} is damaged (it fails its checksum); "
                                                    "rebuilt from the parts\n"), info.stderr
    reader = CacheReader(str(cache))
    for vid, frames in intact.items():
        np.testing.assert_array_equal(reader.read(vid, fields=("frames",))["frames"], frames)
    result = CliRunner().invoke(vidistill, ["cache", "verify", str(cache), "--repair"])
    assert "removed 0 uncommitted part(s) and 1 temporary file(s)" in result.output and not leftover.exists()
    assert CliRunner().invoke(vidistill, ["cache", "verify", str(cache)]).exit_code == 0


@pytest.mark.slow
def test_the_reader_refuses_a_part_of_another_fingerprint(tmp_path):
    src = videos(tmp_path / "v", 2)
    ours, other = tmp_path / "ours", tmp_path / "other"
    run_extract(ExtractConfig(videos=str(videos(tmp_path / "one", 1)), cache=str(ours), **FAST))
    run_extract(ExtractConfig(videos=str(src), cache=str(other), **dict(FAST, height=40, width=56)))
    part = next(p for p, t in read_part_tables(str(other), committed_parts(str(other))).items()
                if any(r["id"] == "v1.mp4" for r in t))
    os.rename(other / "parts" / part, ours / "parts" / part)  # a part of another cache mixed in
    os.rename(other / "commits" / f"{part}.json", ours / "commits" / f"{part}.json")
    reader = CacheReader(str(ours))
    with pytest.raises(CacheError, match=f"{part}: written with other settings than .*cache.json records"):
        reader.read("v1.mp4")
