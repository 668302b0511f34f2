"""Caches on object storage, against a real S3 protocol server on loopback (moto's, on 127.0.0.1): the
card's commands with s3:// in place of the cache folder, kills and resumption, one writer per shard,
damage reported with its video, and the store's refusals in one line."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import boto3
import numpy as np
import pytest
from helpers import make_video

from cache.fingerprint import CacheError
from cache.lease import LeaseLost, ObjectLease
from cache.manifest import verify_cache
from cache.reader import CacheReader
from cache.storage import open_storage
from pipeline.common.config import ExtractConfig
from pipeline.common.errors import ExtractError
from pipeline.extract.extract import run_extract

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(height=48, width=64, teacher_every=4, progress=False)


def _start_server(port=0):
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in a failure's output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 for this module; the environment a client (or a CLI subprocess)
    needs to reach it, as a user's AWS_ENDPOINT_URL and keys would."""
    server = _start_server()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket(s3_env):
    """A fresh bucket's URL."""
    name = f"vd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def cli(cwd, env, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, "cli.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **env))


def videos(root, n, frames=8):
    for i in range(n):
        make_video(str(root / f"v{i}.mp4"), n=frames + i % 3, h=64, w=96, seed=i)
    return root


def same_content(a, b):
    """Two caches hold the same videos with the same values in every array."""
    ra, rb = CacheReader(a), CacheReader(b)
    assert ra.ids == rb.ids
    for vid in ra.ids:
        x, y = ra.read(vid), rb.read(vid)
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{vid} {key}")


def test_extract_to_s3_equals_a_local_extract_and_reads_one_request_per_array(tmp_path, bucket):
    src = videos(tmp_path / "v", 3)
    url = f"{bucket}/caches/c1"
    run_extract(ExtractConfig(videos=str(src), cache=url, **FAST))
    run_extract(ExtractConfig(videos=str(src), cache=str(tmp_path / "local"), **FAST))
    same_content(url, str(tmp_path / "local"))
    assert verify_cache(url)[0] == []
    # a clip read costs at most one request per array, once the shard indexes are known
    reader = CacheReader(url, chunk_cache_mb=0)
    reader.read(reader.ids[0], 0, 4)  # opens the part: array metadata and shard indexes
    storage = open_storage(url)
    before = storage.requests
    got = reader.read(reader.ids[1], 1, 7)
    assert storage.requests - before == len(got) == 5  # frames, flow, teacher_frame, logits, embed: one each


@pytest.mark.slow
def test_the_card_commands_run_with_an_s3_cache_and_two_loader_workers(tmp_path, bucket, s3_env):
    from test_cli import ucf101_tree
    videos(tmp_path / "dir", 8, frames=16)
    ucf101_tree(str(tmp_path / "data" / "ucf101"))
    url = f"{bucket}/cache"
    extract = cli(tmp_path, s3_env, "extract", "--videos", "dir/", "--cache", url)
    assert extract.returncode == 0, extract.stderr
    assert "extracted 8 videos" in extract.stdout and url in extract.stdout
    distill = cli(tmp_path, s3_env, "distill", "--cache", url, "--steps", "4", "--workers", "2")
    assert distill.returncode == 0, distill.stderr
    assert os.path.isfile(tmp_path / "runs" / "latest" / "checkpoint.pt")
    evaluate = cli(tmp_path, s3_env, "eval", "--task", "ucf101")
    assert evaluate.returncode == 0, evaluate.stderr
    results = json.load(open(tmp_path / "eval_out" / "results.json"))["results"]
    assert {r["init"] for r in results} == {"checkpoint", "scratch", "inflate", "teacher"}
    for args in (("info",), ("verify",), ("show", "v0.mp4", "--out", "v0.png")):
        got = cli(tmp_path, s3_env, "cache", args[0], url, *args[1:])
        assert got.returncode == 0, (args, got.stderr)
    assert os.path.isfile(tmp_path / "v0.png")


@pytest.mark.slow
def test_a_killed_extract_on_s3_shows_nothing_half_written_and_resumes_to_an_identical_cache(tmp_path, bucket, s3_env):
    src = videos(tmp_path / "v", 8)
    url = f"{bucket}/killed"
    storage = open_storage(url)
    cmd = [sys.executable, "cli.py", "extract", "--videos", str(src), "--cache", url, "--part-videos", "2",
           "--height", "48", "--width", "64", "--teacher-every", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, **s3_env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # killed while a part is being written after another was committed
    while proc.poll() is None and not (storage.list("commits") and
                                       set(storage.list("parts")) - {n[:-5] for n in storage.list("commits")}):
        time.sleep(0.02)
    assert proc.poll() is None, "the extract finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader = CacheReader(url)  # the part in flight (if the kill landed before its commit) is not seen
    assert 0 < len(reader.ids) < 8 and verify_cache(url)[0] == []
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **s3_env), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not set(storage.list("parts")) - {n[:-5] for n in storage.list("commits")}  # the debris is gone
    run_extract(ExtractConfig(videos=str(src), cache=f"{bucket}/clean", part_videos=2, **FAST))
    same_content(url, f"{bucket}/clean")


def test_a_second_writer_on_a_shard_is_refused_and_a_dead_ones_lease_is_taken_over(tmp_path, bucket):
    src = videos(tmp_path / "v", 2)
    url = f"{bucket}/leased"
    storage = open_storage(url)
    held = ObjectLease(storage, "shard-0-of-1.lock")  # a live job (this process) holds the shard
    with pytest.raises(ExtractError, match=r"shard 0/1 is being extracted by another process \(pid \d+ on "):
        run_extract(ExtractConfig(videos=str(src), cache=url, **FAST))
    record = json.loads(storage.read("locks", "shard-0-of-1.lock"))
    held.release()
    # a lease left by a process of this machine that is gone binds nobody: taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage.write("locks/shard-0-of-1.lock", json.dumps(dict(record, pid=dead.pid, token="dead")).encode())
    summary = run_extract(ExtractConfig(videos=str(src), cache=url, **FAST))
    assert summary["done"] == 2
    after = json.loads(storage.read("locks", "shard-0-of-1.lock"))
    assert after["released"] and after["generation"] == record["generation"] + 1  # released when done


def test_a_writer_whose_lease_was_taken_over_commits_nothing(bucket):
    storage = open_storage(f"{bucket}/lost")
    lease = ObjectLease(storage, "shard-0-of-1.lock")
    lease.fence.commit([("commits/a.json", b"{}")])  # held: committed
    assert storage.exists("commits/a.json")
    # another job took it over (this one was silent past the expiry, say)
    record = json.loads(storage.read("locks", "shard-0-of-1.lock"))
    storage.write("locks/shard-0-of-1.lock", json.dumps(dict(record, token="theirs", pid=1, host="elsewhere",
                                                             machine="elsewhere", commits=[])).encode())
    with pytest.raises(LeaseLost, match="taken over by pid 1 on elsewhere .* stopped without committing more"):
        lease.fence.commit([("commits/b.json", b"{}")])
    assert not storage.exists("commits/b.json")
    lease.release()
    assert json.loads(storage.read("locks", "shard-0-of-1.lock"))["token"] == "theirs"  # the new holder's stays


def test_a_commit_that_won_its_swap_is_rolled_forward_by_the_next_holder(bucket):
    storage = open_storage(f"{bucket}/rolled")
    lease = ObjectLease(storage, "shard-0-of-1.lock")
    storage.write("parts/p.zarr/zarr.json", b"{}")
    real_write = storage.write
    storage.write = lambda *a: None  # the writer stalls after its swap, before its commit record is written
    try:
        lease.fence.commit([("commits/p.zarr.json", b'{"part": "p.zarr"}')], requires="parts/p.zarr/zarr.json")
    finally:
        storage.write = real_write
    assert not storage.exists("commits/p.zarr.json")
    record = json.loads(storage.read("locks", "shard-0-of-1.lock"))  # expired: the next job takes it over
    storage.write("locks/shard-0-of-1.lock", json.dumps(dict(record, expires=0)).encode())
    lease._stop.set()
    successor = ObjectLease(storage, "shard-0-of-1.lock")
    assert storage.read("commits/p.zarr.json") == b'{"part": "p.zarr"}'  # before it lists what is committed
    successor.release()


def test_verify_names_the_video_of_a_missing_or_corrupt_object(tmp_path, bucket):
    src = videos(tmp_path / "v", 2)
    url = f"{bucket}/damaged"
    run_extract(ExtractConfig(videos=str(src), cache=url, **FAST))
    storage = open_storage(url)
    part = storage.list("commits")[0][:-len(".json")]
    key = f"parts/{part}/flow/c/0/0/0/0"
    intact = storage.read(key)
    storage.write(key, b"\xff" * 64 + intact[64:])  # the first chunk garbled, the shard's index intact
    problems, _, _ = verify_cache(url)
    assert any(p.startswith(f"{part}/flow: video 'v0.mp4' frame 0 is unreadable") for p in problems), problems
    storage.remove(key)
    problems, _, _ = verify_cache(url, quick=True)
    assert f"{part}/flow: shard c/0/0/0/0 is missing (from video 'v0.mp4' frame 0)" in problems, problems
    # --repair takes the part out (commit record first); a rerun of extract redoes its videos
    from click.testing import CliRunner

    from cli import cli as vidistill
    result = CliRunner().invoke(vidistill, ["cache", "verify", url, "--repair"])
    assert result.exit_code == 1 and f"quarantined {part} (2 videos)" in result.output
    assert CacheReader(url).ids == [] and storage.list("quarantine") == [part]
    run_extract(ExtractConfig(videos=str(src), cache=url, **FAST))
    assert verify_cache(url)[0] == [] and CacheReader(url).ids == ["v0.mp4", "v1.mp4"]


def test_a_missing_bucket_or_no_credentials_is_one_line_before_any_decoding(tmp_path, s3_env):
    src = videos(tmp_path / "v", 1)
    got = cli(tmp_path, s3_env, "extract", "--videos", str(src), "--cache", "s3://no-such-bucket-here/c")
    assert got.returncode == 2
    assert got.stderr.strip() == ("error: s3://no-such-bucket-here/c: no such bucket (FileNotFoundError: "
                                  "The specified bucket does not exist)"), got.stderr
    no_keys = dict(s3_env, AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                   AWS_CONFIG_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true")
    got = cli(tmp_path, no_keys, "distill", "--cache", "s3://some-bucket/c")
    assert got.returncode == 2 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert got.stderr.startswith("error: s3://some-bucket/c") and "NoCredentialsError" in got.stderr, got.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_outage_is_retried_with_backoff_and_a_persistent_one_stops_in_one_line(monkeypatch, s3_env):
    import cache.storage
    port = _free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(cache.storage, "BACKOFF_SECONDS", 0.05)
    down = cache.storage.Storage("s3://anybucket/c")
    with pytest.raises(CacheError, match=r"^s3://anybucket/c/cache.json: .*\(after 5 attempts\)$"):
        down.read("cache.json")
    # the server comes up while the requests are being retried (during the first backoff): answered
    servers, real_sleep = [], time.sleep

    def backoff(seconds):
        if not servers:
            servers.append(_start_server(port))
        real_sleep(seconds)
    monkeypatch.setattr(time, "sleep", backoff)
    flaky = cache.storage.Storage("s3://anybucket/c")
    try:
        with pytest.raises(CacheError, match="no such bucket"):
            flaky.check_access()  # answered by the server, not by the outage
        assert flaky.requests == 2 and servers  # one refused, one answered
    finally:
        for s in servers:
            s.stop()


def test_a_store_that_goes_down_mid_extract_stops_it_in_one_line_and_keeps_what_was_committed(tmp_path, monkeypatch,
                                                                                               s3_env):
    import cache.storage
    src = videos(tmp_path / "v", 6)
    port = _free_port()
    server = _start_server(port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(cache.storage, "BACKOFF_SECONDS", 0.05)
    name = f"vd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=name)
    url = f"s3://{name}/down"
    watcher = cache.storage.Storage(url)

    def stop_after_first_commit():
        while not watcher.list("commits"):
            time.sleep(0.02)
        server.stop()
    threading.Thread(target=stop_after_first_commit, daemon=True).start()
    # (an ExtractError while extracting; a CacheError when the outage hits the index update at the end)
    with pytest.raises((ExtractError, CacheError), match=rf"^s3://{name}/down/.*\(after 5 attempts\)"):
        run_extract(ExtractConfig(videos=str(src), cache=url, part_videos=1, **FAST))
    server = _start_server(port)  # the store is back (moto keeps its buckets in this process)
    try:
        kept = CacheReader(url).ids
        assert 1 <= len(kept) < 6
        summary = run_extract(ExtractConfig(videos=str(src), cache=url, part_videos=1, **FAST))
        assert summary["skipped"] == len(kept) and CacheReader(url).ids == [f"v{i}.mp4" for i in range(6)]
        assert verify_cache(url)[0] == []
    finally:
        server.stop()
