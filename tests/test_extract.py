"""Stage one end to end: real clips + broken files -> Zarr cache; reader, resume, shards, verify,
interrupts, replaced and vanished sources."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import extract_config, make_video, small_videos

from cache.fingerprint import read_cache_json
from cache.index import committed_parts
from cache.manifest import cache_info, verify_cache
from cache.reader import CacheReader
from cli import cli
from pipeline.common.errors import ExtractError, ExtractInterrupted
from pipeline.extract.extract import run_extract

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def extracted(mixed_video_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "c"
    summary = run_extract(extract_config(mixed_video_dir, cache, part_videos=4))
    return cache, summary


def test_summary_counts_every_video(extracted):
    _, s = extracted
    assert s["videos_found"] == 10  # notes.txt is not a candidate
    assert s["done"] + s["partial"] == 5 and s["failed"] == 5 and s["skipped"] == 0
    assert s["bytes_written"] > 0 and s["frames"] > 0
    # every stage is timed: the teacher and waits in the main thread, decode and flow in theirs
    assert set(s["stage_seconds"]) == {"teacher", "wait_decode", "wait_write", "decode", "flow"}
    assert all(s["stage_seconds"][k] > 0 for k in ("teacher", "decode", "flow"))


def test_failures_are_recorded_with_specific_reasons(extracted):
    cache, _ = extracted
    info = cache_info(str(cache))
    reasons = dict(info["failed_videos"])
    assert reasons["broken/empty.mp4"] == "empty file (0 bytes)"
    assert "moov atom not found" in reasons["broken/truncated.mp4"]
    assert "no video stream" in reasons["broken/audio_only.mp4"]
    assert "still image" in reasons["broken/photo.mp4"]
    assert "broken/random.mp4" in reasons


def test_reader_shapes_and_frame_counts(extracted, mixed_video_dir):
    cache, _ = extracted
    r = CacheReader(str(cache))
    assert r.ids == ["bigbuckbunny.mp4", "gen/moving.mp4", "other/moving.mp4", "sub/bikes.mp4", "sub/carphone.mp4"]
    assert r.num_frames("bigbuckbunny.mp4") == 42  # 5.31 s x 8 fps
    assert r.num_frames("sub/bikes.mp4") == 80
    assert r.num_frames("gen/moving.mp4") == 20 and r.num_frames("other/moving.mp4") == 12
    clip = r.read("sub/bikes.mp4", 10, 26)
    assert clip["frames"].shape == (16, 128, 171, 3) and clip["frames"].dtype == np.uint8
    assert clip["flow"].shape == (16, 128, 171, 2) and clip["flow"].dtype == np.float32
    assert list(clip["teacher_frame"]) == [12, 16, 20, 24]  # every 4th frame inside [10, 26)
    assert clip["logits"].shape == (4, 1000) and clip["logits"].dtype == np.float16
    assert clip["embed"].shape == (4, 1280)
    rec = r.record("bigbuckbunny.mp4")
    assert (rec["src_width"], rec["src_height"]) == (1280, 720) and rec["status"] == "ok"
    assert rec["size"] == os.path.getsize(mixed_video_dir / "bigbuckbunny.mp4")


def test_generated_motion_shows_in_cached_flow(extracted):
    # gen/moving.mp4 moves its texture by +2 px/frame at 96x128; stored at 128x171 that is ~2.67 px.
    cache, _ = extracted
    flow = CacheReader(str(cache)).read("gen/moving.mp4", 0, 19, fields=("flow",))["flow"]
    assert abs(np.median(flow[:, 20:-20, 20:-20, 0]) - 2 * 128 / 96) < 0.4


def test_cached_teacher_outputs_match_a_fresh_teacher_run(extracted):
    from models.teacher import load_teacher
    cache, _ = extracted
    r = CacheReader(str(cache))
    rec = r.record("sub/carphone.mp4")
    from pipeline.extract.decode import VideoDecode
    teacher = load_teacher()
    # by default the teacher sees its own evaluation crop: the centre 224 of a 256 square
    assert r.fingerprint["preprocessing"]["teacher_crop"] == teacher.eval_crop == 0.875
    teacher_in = np.concatenate([t for _, (t,) in VideoDecode(rec["path"], fps=8, height=128, width=171,
                                                           teacher_size=224, teacher_crop=0.875)])
    logits, embed = teacher.predict(teacher_in[::4])
    clip = r.read("sub/carphone.mp4")
    assert np.allclose(clip["logits"].astype(np.float32), logits, atol=0.05)
    assert np.allclose(clip["embed"].astype(np.float32), embed, atol=0.05)


def test_cache_json_holds_the_fingerprint(extracted):
    cache, _ = extracted
    fp = read_cache_json(str(cache))["fingerprint"]
    assert fp["teacher"]["name"] == "efficientnet_lite0" and len(fp["teacher"]["weights_sha256"]) == 64
    assert fp["preprocessing"]["fps"] == 8.0 and fp["flow"]["method"] == "dis" and fp["flow"]["bound"] == 20.0
    assert fp["ffmpeg_version"].startswith("ffmpeg version")


def test_verify_is_clean_and_rerun_skips_everything(extracted, mixed_video_dir):
    cache, _ = extracted
    problems, _, checked = verify_cache(str(cache))
    assert problems == [] and checked["videos"] == 10
    parts = committed_parts(str(cache))
    s = run_extract(extract_config(mixed_video_dir, cache, part_videos=4))
    assert s["skipped"] == 10 and s["done"] == 0 and s["failed"] == 0
    assert committed_parts(str(cache)) == parts


def test_different_settings_are_refused(extracted, mixed_video_dir):
    cache, _ = extracted
    with pytest.raises(ExtractError, match=r"different settings \(preprocessing.fps: cache has 8.0, this run has 4.0"):
        run_extract(extract_config(mixed_video_dir, cache, fps=4.0))


def test_missing_or_empty_video_folder(tmp_path):
    with pytest.raises(ExtractError, match="video folder does not exist"):
        run_extract(extract_config(tmp_path / "nope", tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractError, match="no video files found"):
        run_extract(extract_config(tmp_path / "empty", tmp_path / "c"))


def test_shards_together_equal_one_job(tmp_path):
    videos = small_videos(tmp_path / "videos", 5)
    run_extract(extract_config(videos, tmp_path / "one"))
    run_extract(extract_config(videos, tmp_path / "two", shard=(0, 2)))
    s = run_extract(extract_config(videos, tmp_path / "two", shard=(1, 2)))
    assert s["done"] == 3  # v01, v03, v04: a video's shard is a hash of its id
    one, two = CacheReader(str(tmp_path / "one")), CacheReader(str(tmp_path / "two"))
    assert one.ids == two.ids
    for vid in one.ids:
        a, b = one.read(vid), two.read(vid)
        for key in a:
            assert np.array_equal(a[key], b[key]), (vid, key)


def test_same_shard_twice_is_refused_by_the_lock(tmp_path):
    from pipeline.extract.job import ShardLock
    videos = small_videos(tmp_path / "videos", 1)
    run_extract(extract_config(videos, tmp_path / "c"))
    held = ShardLock(str(tmp_path / "c"), 0, 1)
    try:
        with pytest.raises(ExtractError, match="shard 0/1 is being extracted by another process"):
            run_extract(extract_config(videos, tmp_path / "c"))
        # another shard count would split the videos another way and take some of the live job's
        with pytest.raises(ExtractError, match=r"a job with another shard count is running \(shard-0-of-1.lock"):
            run_extract(extract_config(videos, tmp_path / "c", shard=(1, 2)))
        with pytest.raises(ExtractError, match="refusing to --overwrite while other jobs extract into it"):
            run_extract(extract_config(videos, tmp_path / "c", fps=4.0, overwrite=True))
    finally:
        held.release()
    assert run_extract(extract_config(videos, tmp_path / "c", shard=(1, 2)))["done"] == 0  # lock released: fine


def test_overwrite_replaces_only_a_cache_with_other_settings(tmp_path):
    videos = small_videos(tmp_path / "videos", 2)
    run_extract(extract_config(videos, tmp_path / "c"))
    assert run_extract(extract_config(videos, tmp_path / "c", overwrite=True))["skipped"] == 2  # same settings: kept
    s = run_extract(extract_config(videos, tmp_path / "c", fps=4.0, overwrite=True))
    assert s["done"] == 2 and CacheReader(str(tmp_path / "c")).fingerprint["preprocessing"]["fps"] == 4.0


def test_verify_reports_a_deleted_chunk_and_repair_redoes_it(tmp_path):
    videos = small_videos(tmp_path / "videos", 3)
    cache = tmp_path / "c"
    run_extract(extract_config(videos, cache, part_videos=1))
    part = committed_parts(str(cache))[1]
    os.remove(cache / "parts" / part / "frames" / "c" / "0" / "0" / "0" / "0")
    result = CliRunner().invoke(cli, ["cache", "verify", str(cache)])
    assert result.exit_code == 1
    assert f"DAMAGED: {part}/frames: shard c/0/0/0/0 is missing (from video 'v01.mp4' frame 0)" in result.output
    result = CliRunner().invoke(cli, ["cache", "verify", "--repair", str(cache)])
    assert "quarantined" in result.output
    s = run_extract(extract_config(videos, cache, part_videos=1))
    assert s["done"] == 1 and s["skipped"] == 2
    assert verify_cache(str(cache))[0] == []
    assert len(CacheReader(str(cache)).ids) == 3


def test_cli_extract_and_info(tmp_path):
    videos = small_videos(tmp_path / "videos", 2)
    (videos / "bad.mp4").write_bytes(b"")
    cache = tmp_path / "c"
    result = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--cache", str(cache), "--teacher-every", "4"])
    assert result.exit_code == 0, result.output
    assert "extracted 2 videos" in result.output and "failed 1" in result.output
    assert "failed: bad.mp4: empty file (0 bytes)" in result.output
    strict = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--cache", str(cache),
                                      "--teacher-every", "4", "--strict", "--retry-failed"])
    assert strict.exit_code == 1
    # a resumed --strict run fails on the failures recorded by earlier runs too, not only its own
    strict = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--cache", str(cache),
                                      "--teacher-every", "4", "--strict"])
    assert strict.exit_code == 1 and "skipped 3" in strict.output
    assert "1 videos of this shard are recorded as failed" in strict.output
    bad = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--cache", str(cache), "--fps", "0"])
    assert bad.exit_code == 2 and "Invalid value for '--fps'" in bad.output  # checked by click, before torch
    info = CliRunner().invoke(cli, ["cache", "info", str(cache)])
    assert "videos     3: 2 ok, 0 partial, 1 failed" in info.output
    assert "bad.mp4: empty file (0 bytes)" in info.output
    missing = CliRunner().invoke(cli, ["cache", "info", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such cache directory" in missing.output


@pytest.mark.slow
def test_two_workers_match_one(tmp_path):
    videos = small_videos(tmp_path / "videos", 4)
    run_extract(extract_config(videos, tmp_path / "one"))
    s = run_extract(extract_config(videos, tmp_path / "two", workers=2))
    assert s["done"] == 4
    one, two = CacheReader(str(tmp_path / "one")), CacheReader(str(tmp_path / "two"))
    assert one.ids == two.ids
    for vid in one.ids:
        assert np.array_equal(one.read(vid)["frames"], two.read(vid)["frames"])
        assert np.allclose(one.read(vid)["logits"], two.read(vid)["logits"], atol=1e-2)


def test_a_sigterm_commits_the_finished_videos_of_a_part_that_is_not_full(tmp_path, monkeypatch):
    import pipeline.extract.worker as extract  # where each finished video gets its record
    videos = small_videos(tmp_path / "videos", 5)
    recorded, real = [], extract.source_record

    def record_then_signal(vid, path):  # the scheduler's SIGTERM lands right after the second video
        recorded.append(vid)
        if len(recorded) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(vid, path)
    monkeypatch.setattr(extract, "source_record", record_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ExtractInterrupted, match=r"interrupted \(SIGTERM\): the 2 videos finished in this run are "
                                                r"committed to .*, 3 are not; rerun the same command to resume") as e:
        run_extract(extract_config(videos, tmp_path / "c"))  # part_videos 64: the part is far from full
    assert e.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert CacheReader(str(tmp_path / "c")).ids == ["v00.mp4", "v01.mp4"] and verify_cache(str(tmp_path / "c"))[0] == []
    monkeypatch.setattr(extract, "source_record", real)
    s = run_extract(extract_config(videos, tmp_path / "c"))
    assert s["skipped"] == 2 and s["done"] == 3 and len(CacheReader(str(tmp_path / "c")).ids) == 5


def test_a_replaced_source_is_extracted_again_and_a_vanished_one_reported(tmp_path):
    videos = small_videos(tmp_path / "videos", 3)
    cache = tmp_path / "c"
    run_extract(extract_config(videos, cache))
    old = CacheReader(str(cache)).read("v01.mp4")["frames"]
    make_video(str(videos / "v01.mp4"), n=14, h=64, w=96, seed=42)  # another file under the same name
    os.utime(videos / "v01.mp4", (1e9, 1e9))
    os.remove(videos / "v02.mp4")
    info = cache_info(str(cache))
    assert info["changed_sources"] == ["v01.mp4"] and info["vanished_sources"] == ["v02.mp4"]
    s = run_extract(extract_config(videos, cache))
    assert s["changed"] == ["v01.mp4"] and s["done"] == 1 and s["skipped"] == 1 and s["vanished"] == ["v02.mp4"]
    r = CacheReader(str(cache))
    assert r.num_frames("v01.mp4") == 14 and not np.array_equal(r.read("v01.mp4", 0, len(old))["frames"], old)
    assert r.record("v01.mp4")["mtime"] == 1e9
    assert verify_cache(str(cache))[0] == []  # two records of v01, of two files: no damage
    assert run_extract(extract_config(videos, cache))["skipped"] == 2  # unchanged now
    shown = CliRunner().invoke(cli, ["cache", "info", str(cache)])
    assert "vanished   1 source file(s) no longer exist" in shown.output and "v02.mp4" in shown.output
    listed = json.loads(CliRunner().invoke(cli, ["cache", "info", "--json", str(cache)]).output)
    assert listed["vanished_sources"] == ["v02.mp4"] and listed["changed_sources"] == []
    assert [(v["id"], v["frames"], v["status"], v["source_now"]) for v in listed["video_list"]] == [
        ("v00.mp4", 8, "ok", "same"), ("v01.mp4", 14, "ok", "same"), ("v02.mp4", 10, "ok", "vanished")]


def _parts_committed(cache, more_than):
    """Whether more than `more_than` parts are committed (a part's finished videos are kept in memory
    until its commit, so a commit is the first sign on disk that a run is past its first videos)."""
    try:
        return len(committed_parts(str(cache))) > more_than
    except OSError:
        return False


@pytest.mark.slow
def test_sigterm_mid_extract_commits_then_a_double_ctrl_c_aborts_and_the_reruns_finish(tmp_path):
    videos = tmp_path / "v"
    for i in range(12):
        make_video(str(videos / f"v{i:02d}.mp4"), n=24, h=64, w=96, seed=i)
    cache = tmp_path / "c"
    cmd = [sys.executable, "cli.py", "extract", "--videos", str(videos), "--cache", str(cache), "--teacher-every", "8",
           "--height", "64", "--width", "80", "--part-videos", "3"]  # signalled while the second part is in flight

    def start():
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group, as a terminal's job
    proc = start()
    deadline = time.time() + 240
    while proc.poll() is None and not _parts_committed(cache, 0) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what Slurm and Kubernetes send first
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM): the ") and last.endswith("rerun the same command to resume")
    assert "Traceback" not in err
    kept = CacheReader(str(cache)).ids
    assert 1 <= len(kept) < 12 and verify_cache(str(cache))[0] == []
    assert last.split("the ")[1].split(" videos")[0] == str(len(kept))

    before = len(committed_parts(str(cache)))
    proc = start()  # the resume, stopped by a Ctrl-C twice: the second aborts at once
    while proc.poll() is None and not _parts_committed(cache, before) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process of the job, ffmpeg too
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # the second Ctrl-C aborts, or (a fast machine) finds the first one's commit done and the job leaving:
    # during Python's own shutdown SIGINT kills with its default action, which a shell also reports as 130
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err[-2000:]
    assert "SIGINT again: aborted" in err or "rerun the same command to resume" in err.strip().splitlines()[-1]

    kept = CacheReader(str(cache)).ids  # the aborted run left its part in flight as debris for the rerun
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"extracted {12 - len(kept)} videos (0 partial), skipped {len(kept)} already" in done.stdout
    assert CacheReader(str(cache)).ids == [f"v{i:02d}.mp4" for i in range(12)]
    assert verify_cache(str(cache))[0] == []


def test_a_second_signal_aborts_at_once_and_kills_the_workers():
    script = ("import os, signal, subprocess, sys, time\n"
              "from pipeline.extract.job import StopRequest\n"
              "stop = StopRequest()\n"
              "worker = subprocess.Popen(['sleep', '60'])\n"
              "print(worker.pid, flush=True)\n"
              "stop.children = [worker]\n"
              "with stop.on_signals():\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.5)\n"
              "    assert stop() and stop.signum == signal.SIGTERM\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(30)\n"
              "print('not reached')")
    t = time.time()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and time.time() - t < 25
    assert "SIGTERM: committing the videos finished so far" in result.stderr
    assert "SIGINT again: aborted; the part in flight is dropped" in result.stderr
    worker = int(result.stdout.split()[0])

    def dead(pid):  # gone, or a zombie waiting for whoever inherited it to reap it
        try:
            return open(f"/proc/{pid}/status").read().split("State:")[1].split()[0] == "Z"
        except FileNotFoundError:
            return True
    deadline = time.time() + 5
    while not dead(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert dead(worker)


def test_workers_auto_never_oversubscribes_the_cores_and_says_what_it_chose(tmp_path):
    from pipeline.extract.extract import auto_workers
    for cores in (1, 2, 3, 8, 16, 64):
        for gpus in (0, 1, 8):
            processes, threads = auto_workers(cores, gpus)
            assert processes >= 1 and threads >= 1 and processes * threads <= max(cores, 1)
    assert auto_workers(16, 1) == (8, 2) and auto_workers(2, 0) == (1, 2) and auto_workers(16, 0) == (4, 4)
    videos = small_videos(tmp_path / "videos", 2)
    result = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--cache", str(tmp_path / "c"),
                                      "--workers", "auto", "--teacher", "none", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cores = os.cpu_count()
    assert f"--workers auto: {auto_workers(cores, 0)[0]} process(es)" in result.output and f"({cores} cores, no GPUs)" in result.output
    bad = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--workers", "two"])
    assert bad.exit_code == 2 and "'two' is neither a count >= 1 nor auto" in bad.output
