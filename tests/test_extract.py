"""Stage one end to end: real clips + broken files -> Zarr cache; reader, resume, shards, verify."""
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cache.fingerprint import read_cache_json
from cache.manifest import cache_info, verify_cache
from cache.reader import CacheReader, committed_parts
from cli import cli
from helpers import extract_config, make_video
from pipeline.extract import ExtractError, run_extract


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
    from pipeline.decode import VideoDecode
    teacher_in = np.concatenate([t for _, t in VideoDecode(rec["path"], fps=8, height=128, width=171,
                                                           teacher_size=224)])
    logits, embed = load_teacher().predict(teacher_in[::4])
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


def small_videos(root, n):
    for i in range(n):
        make_video(str(root / f"v{i:02d}.mp4"), n=8 + i % 3, h=64, w=96, seed=i)
    return root


def test_shards_together_equal_one_job(tmp_path):
    videos = small_videos(tmp_path / "videos", 5)
    run_extract(extract_config(videos, tmp_path / "one"))
    run_extract(extract_config(videos, tmp_path / "two", shard=(0, 2)))
    s = run_extract(extract_config(videos, tmp_path / "two", shard=(1, 2)))
    assert s["done"] == 2  # v01, v03
    one, two = CacheReader(str(tmp_path / "one")), CacheReader(str(tmp_path / "two"))
    assert one.ids == two.ids
    for vid in one.ids:
        a, b = one.read(vid), two.read(vid)
        for key in a:
            assert np.array_equal(a[key], b[key]), (vid, key)


def test_same_shard_twice_is_refused_by_the_lock(tmp_path):
    from pipeline.extract import _ShardLock
    videos = small_videos(tmp_path / "videos", 1)
    run_extract(extract_config(videos, tmp_path / "c"))
    held = _ShardLock(str(tmp_path / "c"), 0, 1)
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
    assert f"DAMAGED: {part}/frames: 1 chunk file(s) missing" in result.output
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
    assert bad.exit_code == 2 and "--fps must be > 0" in bad.output
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
