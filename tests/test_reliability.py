"""Fault injection: bad inputs, kills, damage, concurrency and safety, with real files and processes."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import extract_config, ffmpeg, make_video, texture

from cache.index import committed_parts
from cache.manifest import verify_cache
from cache.reader import CacheReader
from cache.writer import uncommitted_parts
from pipeline.common.config import DistillConfig
from pipeline.common.errors import DistillError, ExtractError
from pipeline.distill.train import run_distill
from pipeline.extract.decode import VideoDecode
from pipeline.extract.extract import run_extract

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = os.geteuid() == 0


def drop_root_file_override():
    """In a child process: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the
    program it executes cannot read a file its permission bits forbid, even as root."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


# this suite's extract settings: small frames and a sparse teacher keep the many runs fast
SMALL = dict(teacher_every=8, height=64, width=80)


def remove_moov(src, dst):
    """Drop the moov box (at the end of a non-faststart mp4). Renaming it is not enough: ffmpeg
    finds a moov hidden in a free atom and plays the file."""
    data = open(src, "rb").read()
    i = data.rfind(b"moov") - 4  # the box starts with its 4-byte size
    open(dst, "wb").write(data[:i] + data[i + int.from_bytes(data[i:i + 4], "big"):])


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory):
    """Good videos mixed with every kind of bad input a crawl produces. Returns (root, good, bad)."""
    root = tmp_path_factory.mktemp("hostile")
    good = {}

    def add(rel, **kw):
        path = make_video(str(root / rel), **kw)
        good[rel] = path

    add("good/plain.mp4", n=16)
    add("names/my video (1) $HOME;echo pwned.mp4", n=8)
    add("names/vidéo_日本語.mp4", n=8)
    add("names/quote's \"double\".mp4", n=8)
    add("x.mp4/inside_a_dir_named_like_a_video.mp4", n=8)
    add("short/one_frame.mp4", n=1)
    add("short/three_frames.mp4", n=3)
    add("odd/321x241.mp4", n=8, h=241, w=321, pix_fmt="yuv444p")
    add("odd/10bit.mp4", n=8, pix_fmt="yuv420p10le")
    full = make_video(str(root / "tmp" / "full.mp4"), n=48)
    faststart = make_video(str(root / "tmp" / "faststart.mp4"), n=48, extra_args=["-movflags", "+faststart"])
    rotated = root / "phone" / "portrait_rotated.mp4"
    rotated.parent.mkdir()
    ffmpeg("-display_rotation:v:0", "90", "-i", full, "-c", "copy", rotated)
    good["phone/portrait_rotated.mp4"] = str(rotated)
    vfr = root / "vfr" / "variable_rate.mp4"
    vfr.parent.mkdir()
    ffmpeg("-i", full, "-vf", "setpts='if(lt(N,16),N*0.125,2+(N-16)*0.04)/TB'", "-fps_mode", "vfr", vfr)
    good["vfr/variable_rate.mp4"] = str(vfr)
    big = root / "big" / "uhd_3840x2160.mp4"
    big.parent.mkdir()
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=3840x2160:rate=8:duration=1.5", "-c:v", "libx264", "-preset",
           "ultrafast", "-pix_fmt", "yuv420p", big)
    good["big/uhd_3840x2160.mp4"] = str(big)

    bad = {}
    (root / "bad").mkdir()
    data = open(full, "rb").read()
    for pct in (10, 60):
        (root / "bad" / f"truncated_{pct}.mp4").write_bytes(data[: len(data) * pct // 100])
        bad[f"bad/truncated_{pct}.mp4"] = "moov atom not found"
    remove_moov(full, root / "bad" / "no_moov.mp4")
    bad["bad/no_moov.mp4"] = "moov atom not found"
    (root / "bad" / "empty.mp4").write_bytes(b"")
    bad["bad/empty.mp4"] = r"empty file \(0 bytes\)"
    (root / "bad" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50000))
    bad["bad/random.mp4"] = r"not a video file \(no MP4/MOV header"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", root / "bad" / "audio.m4a")
    os.rename(root / "bad" / "audio.m4a", root / "bad" / "audio_only.mp4")
    bad["bad/audio_only.mp4"] = "no video stream"
    import cv2
    cv2.imwrite(str(root / "bad" / "photo.jpg"), texture(64, 64))
    os.rename(root / "bad" / "photo.jpg", root / "bad" / "still_image.mp4")
    bad["bad/still_image.mp4"] = "still image"
    os.symlink("does_not_exist.mp4", root / "bad" / "broken_link.mp4")
    bad["bad/broken_link.mp4"] = "broken symbolic link"
    os.symlink("..", root / "bad" / "loop")  # a directory symlink loop: the walk must terminate
    fs = open(faststart, "rb").read()
    (root / "bad" / "faststart_truncated_60.mp4").write_bytes(fs[: len(fs) * 6 // 10])
    bad["bad/faststart_truncated_60.mp4"] = None  # decoded as far as possible (partial) or failed: both honest
    (root / "bad" / "no_permission.mp4").write_bytes(data)
    os.chmod(root / "bad" / "no_permission.mp4", 0)  # unreadable for the extract run (see below)
    bad["bad/no_permission.mp4"] = "permission denied"
    make_video(str(root / "locked" / "inside.mp4"), n=8)
    os.chmod(root / "locked", 0)  # a folder that cannot be listed: reported, not silently skipped
    shutil.rmtree(root / "tmp")
    return root, good, bad


@pytest.mark.slow
def test_every_bad_input_is_recorded_and_every_good_one_extracted_as_alone(hostile_tree, tmp_path):
    root, good, bad = hostile_tree
    cache = tmp_path / "cache"
    cmd = [sys.executable, "cli.py", "extract", "--videos", str(root), "--cache", str(cache), "--teacher-every", "8",
           "--height", "64", "--width", "80", "--stall-timeout", "20", "--frame-codec", "zstd"]  # lossless: exact frames
    # root reads any file; drop the two capabilities that let it, so it meets the mode-000 file as a
    # normal user would
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,  # nothing hangs
                         preexec_fn=drop_root_file_override if IS_ROOT else None)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"could not list folder {root / 'locked'}: Permission denied; its videos were not extracted" in res.stdout
    reader = CacheReader(str(cache))
    records = {rec["id"]: rec for rec in reader.index.records()}
    assert not any("loop" in vid for vid in records), "the symlink loop was walked into"
    for vid, reason in bad.items():
        rec = records[vid]
        if reason is None:
            assert rec["status"] in ("partial", "failed") and rec["error"], rec
        else:
            assert rec["status"] == "failed", (vid, rec)
            import re
            assert re.search(reason, rec["error"]), (vid, rec["error"])
    for vid, path in good.items():
        assert records[vid]["status"] == "ok", (vid, records[vid])
        alone = np.concatenate([s for s, _ in VideoDecode(path, fps=8, height=64, width=80, teacher_size=224,
                                                          teacher_crop=reader.fingerprint["preprocessing"]["teacher_crop"])])
        assert np.array_equal(reader.read(vid, fields=("frames",))["frames"], alone), vid
    assert reader.num_frames("short/one_frame.mp4") == 1
    vfr = records["vfr/variable_rate.mp4"]  # 16 frames at 8 fps, then 32 at 25 fps: resampled to 8 fps
    assert 3.2 < vfr["src_duration"] <= 3.6 and abs(vfr["frame_count"] - 8 * vfr["src_duration"]) <= 2
    assert records["odd/10bit.mp4"]["src_width"] == 128
    assert abs(records["phone/portrait_rotated.mp4"]["rotation"]) == 90  # the metadata was seen (and applied:
    # test_decode checks the pixels)
    assert verify_cache(str(cache))[0] == []


@pytest.mark.slow
def test_memory_stays_bounded_on_a_4k_video(hostile_tree, tmp_path):
    root, good, _ = hostile_tree

    def peak_rss_mb(video):
        d = tmp_path / os.path.basename(video)
        d.mkdir()
        os.symlink(video, d / "v.mp4")
        code = ("import resource, sys; from pipeline.common.config import ExtractConfig; "
                "from pipeline.extract.extract import run_extract; "
                "run_extract(ExtractConfig(videos=sys.argv[1], cache=sys.argv[2], progress=False)); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        out = subprocess.run([sys.executable, "-c", code, str(d), str(d / "cache")], cwd=REPO, capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    small, uhd = peak_rss_mb(good["good/plain.mp4"]), peak_rss_mb(good["big/uhd_3840x2160.mp4"])
    # the 4K frames are scaled inside ffmpeg: the Python process never holds full-size frames
    assert uhd < small + 200, (small, uhd)


def extract_small_cache(tmp_path, n=2, **kw):
    """n short generated videos in tmp_path/v, extracted into tmp_path/c. Returns (videos, cache)."""
    videos = tmp_path / "v"
    for i in range(n):
        make_video(str(videos / f"v{i}.mp4"), n=8, h=64, w=96, seed=i)
    cache = tmp_path / "c"
    run_extract(extract_config(videos, cache, **SMALL, **kw))
    return videos, cache


def test_truncated_and_corrupted_chunks_are_reported(tmp_path):
    _, cache = extract_small_cache(tmp_path)
    part = committed_parts(str(cache))[0]
    shard = cache / "parts" / part / "flow" / "c" / "0" / "0" / "0" / "0"
    intact = shard.read_bytes()
    shard.write_bytes(b"\xff" * 64 + intact[64:])  # the first chunk's bytes garbled, the shard's index intact
    problems, _, _ = verify_cache(str(cache))
    assert any(p.startswith(f"{part}/flow: video 'v0.mp4' frame 0 is unreadable") for p in problems), problems
    # distill's start-up check is structural (cheap on any cache); the corrupt chunk stops it with a
    # one-line error naming the part when a clip reads it, never a codec traceback or garbage training
    cfg = DistillConfig(cache=str(cache), out=str(tmp_path / "run"), objective="modist", student="r3d_cpu", clip_len=2,
                        crop=32, batch_size=2, steps=3, progress=False, workers=0)
    with pytest.raises(DistillError, match=f"{part}: unreadable data for video .*cache verify --repair"):
        run_distill(cfg)
    shard.write_bytes(intact[:100])  # truncated: the shard's index is gone; the start-up check sees it
    with pytest.raises(DistillError, match=f"is damaged .*{part}/flow: shard c/0/0/0/0 is damaged: its chunk index fails its checksum"):
        run_distill(cfg)
    shutil.rmtree(cache / "parts" / part / "frames" / "c")  # chunk files gone: zarr would read zeros
    with pytest.raises(DistillError, match=f"is damaged .*{part}/frames: shard c/0/0/0/0 is missing"):
        run_distill(cfg)


def test_an_edited_fingerprint_is_caught_by_verify_and_refused_by_distill(tmp_path):
    _, cache = extract_small_cache(tmp_path)
    meta = json.load(open(cache / "cache.json"))
    meta["fingerprint"]["preprocessing"]["fps"] = 25.0
    json.dump(meta, open(cache / "cache.json", "w"))
    problems, _, _ = verify_cache(str(cache))
    assert any("written with other settings than cache.json records" in p for p in problems)
    with pytest.raises(DistillError, match="written with other settings than cache.json records"):
        run_distill(DistillConfig(cache=str(cache), out=str(tmp_path / "run"), progress=False, workers=0))
    (cache / "cache.json").write_text("{ not json")
    with pytest.raises(DistillError, match="not valid JSON"):
        run_distill(DistillConfig(cache=str(cache), out=str(tmp_path / "run"), progress=False, workers=0))


def parts_on_disk(cache):
    """(committed, in-flight) part folders of a cache right now."""
    if not (cache / "parts").is_dir():
        return [], []
    try:
        return committed_parts(str(cache)), uncommitted_parts(str(cache))
    except OSError:  # the cache being created meanwhile
        return [], []


@pytest.mark.slow
def test_sigkills_mid_write_and_at_random_then_rerun_equal_an_uninterrupted_run(tmp_path):
    videos = tmp_path / "v"
    for i in range(10):
        make_video(str(videos / f"v{i}.mp4"), n=6 + i, h=64, w=96, seed=i)
    cache = tmp_path / "killed"
    cmd = [sys.executable, "cli.py", "extract", "--videos", str(videos), "--cache", str(cache), "--part-videos", "2",
           "--teacher-every", "3", "--height", "64", "--width", "80"]
    rng = random.Random(0)
    # kill 1: while the first part is being written; kill 2: while a part is in flight after another
    # was committed; kills 3-4: at random moments (imports, decode, teacher, commit, ...)
    moments = [lambda c, t: t, lambda c, t: c and t, None, None]
    mid_write, done_after_targeted_kills = 0, None
    for k, moment in enumerate(moments):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if moment is None:
            time.sleep(rng.uniform(1.5, 6.0))
        else:
            while proc.poll() is None and not moment(*parts_on_disk(cache)):
                time.sleep(0.005)
        in_flight = bool(parts_on_disk(cache)[1])
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            mid_write += in_flight
        proc.wait()
        if k == 1:
            done_after_targeted_kills = len(CacheReader(str(cache)).ids)
    assert mid_write >= 2, "no kill landed while a part was being written"
    assert done_after_targeted_kills < 10  # the kills really left work undone
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert verify_cache(str(cache))[0] == []
    run_extract(extract_config(videos, tmp_path / "clean", teacher_every=3, height=64, width=80, part_videos=2))
    a, b = CacheReader(str(cache)), CacheReader(str(tmp_path / "clean"))
    assert a.ids == b.ids == [f"v{i}.mp4" for i in range(10)]  # none lost, none twice
    for vid in a.ids:
        x, y = a.read(vid), b.read(vid)
        for key in x:
            assert np.array_equal(x[key], y[key]), (vid, key)


@pytest.mark.slow
def test_concurrent_jobs_same_shard_refused_different_shards_both_succeed(tmp_path):
    videos = tmp_path / "v"
    for i in range(6):
        make_video(str(videos / f"v{i}.mp4"), n=8, h=64, w=96, seed=i)
    base = [sys.executable, "cli.py", "extract", "--videos", str(videos), "--teacher-every", "4",
            "--height", "64", "--width", "80"]
    same = [subprocess.Popen(base + ["--cache", str(tmp_path / "same"), "--shard", "0/1"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) + (p.returncode,) for p in same]
    codes = sorted(o[2] for o in outs)
    if codes == [0, 0]:  # the second started after the first finished: then it skipped everything
        assert any("skipped 6" in o[0] for o in outs)
    else:
        assert codes == [0, 2]
        assert any("is being extracted by another process" in o[1] for o in outs)
    assert verify_cache(str(tmp_path / "same"))[0] == []
    assert len(CacheReader(str(tmp_path / "same")).ids) == 6
    two = [subprocess.Popen(base + ["--cache", str(tmp_path / "two"), "--shard", f"{i}/2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    assert [p.wait(timeout=300) for p in two] == [0, 0]
    assert CacheReader(str(tmp_path / "two")).ids == [f"v{i}.mp4" for i in range(6)]
    assert verify_cache(str(tmp_path / "two"))[0] == []


def test_a_full_disk_is_a_clear_error_and_committed_work_survives(tmp_path):
    videos = tmp_path / "v"
    for i in range(4):
        make_video(str(videos / f"v{i}.mp4"), n=24, h=96, w=128, seed=i)
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the write-error path is covered by injection below")
    try:
        with pytest.raises(ExtractError, match=r"cannot write \(No space left on device\).*free space and rerun"):
            run_extract(extract_config(videos, mnt / "cache", part_videos=1, teacher_every=8, height=96, width=128,
                                       frame_codec="zstd", flow_codec="zstd"))  # lossless: parts big enough to fill it
        assert verify_cache(str(mnt / "cache"))[0] == []  # what was committed is intact
        assert uncommitted_parts(str(mnt / "cache")) == []  # the part in flight was dropped
    finally:
        subprocess.run(["umount", str(mnt)])


def test_a_write_error_mid_part_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    from cache.shards import ShardAppender
    videos, cache = extract_small_cache(tmp_path, n=3, part_videos=1, shard=(1, 2))  # v0 committed (its hash)
    calls = {"n": 0}
    real = ShardAppender.close

    def failing_close(self):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ShardAppender, "close", failing_close)
    with pytest.raises(ExtractError, match=r"cannot write \(No space left on device\)"):
        run_extract(extract_config(videos, cache, **SMALL, part_videos=1))
    monkeypatch.setattr(ShardAppender, "close", real)
    assert calls["n"] >= 1
    # the repaired disk: the rerun finishes the job
    s = run_extract(extract_config(videos, cache, **SMALL, part_videos=1))
    assert s["done"] == 2 and s["skipped"] == 1
    problems = verify_cache(str(cache))[0]
    assert problems == [], problems


def test_paths_from_the_video_tree_never_escape_the_cache(tmp_path):
    videos, outside = tmp_path / "v", tmp_path / "outside"
    make_video(str(outside / "elsewhere.mp4"), n=4, h=64, w=96)
    make_video(str(videos / "..x.mp4"), n=4, h=64, w=96)
    make_video(str(videos / "-rf --cache=..mp4"), n=4, h=64, w=96, seed=1)
    os.symlink(outside, videos / "link_out")  # a folder link leading out of the tree
    before = sorted(p for p in tmp_path.rglob("*"))
    cache = tmp_path / "cache"
    run_extract(extract_config(videos, cache, **SMALL))
    ids = CacheReader(str(cache)).ids
    assert ids == sorted(["..x.mp4", "-rf --cache=..mp4", "link_out/elsewhere.mp4"])
    assert not any(i.startswith("/") or ".." in i.split("/") for i in ids)  # ids are tree-relative
    # video ids are data inside the cache, never file names: nothing was written outside it
    after = sorted(p for p in tmp_path.rglob("*") if cache not in p.parents and p != cache)
    assert after == before
