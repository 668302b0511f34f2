"""`cache info`: counts per status (videos, frames, source bytes), the largest videos, failures by reason."""
from click.testing import CliRunner
from helpers import extract_config, make_video

from cache.manifest import cache_info
from cli import cli
from pipeline.extract.extract import run_extract


def test_cache_info_counts_per_status_and_lists_the_largest_and_failed_videos(tmp_path):
    videos = tmp_path / "videos"
    for i, n in enumerate((8, 20, 12)):
        make_video(str(videos / f"v{i}.mp4"), n=n, h=48, w=64, seed=i)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "also_empty.mp4").write_bytes(b"")
    (videos / "random.mp4").write_bytes(bytes(range(256)) * 40)
    cache = tmp_path / "cache"
    run_extract(extract_config(videos, cache, height=48, width=64, teacher="none", flow="none"))
    info = cache_info(str(cache))
    assert info["by_status"]["ok"]["videos"] == 3 and info["by_status"]["ok"]["frames"] == 8 + 20 + 12
    assert info["by_status"]["ok"]["source_bytes"] == sum((videos / f"v{i}.mp4").stat().st_size for i in range(3))
    assert info["by_status"]["failed"] == {"videos": 3, "frames": 0, "source_bytes": 256 * 40}
    assert [(vid, n) for vid, n, _ in info["largest_videos"]] == [("v1.mp4", 20), ("v2.mp4", 12), ("v0.mp4", 8)]
    assert info["failure_reasons"][0] == ("empty file (0 bytes)", 2)
    text = CliRunner().invoke(cli, ["cache", "info", str(cache)]).output
    assert "  ok       3 videos, 40 frames" in text and "  failed   3 videos, 0 frames" in text
    assert "largest    v1.mp4: 20 frames (2.5 s)" in text
    assert "reasons    2 x empty file (0 bytes)" in text
    assert "failed     also_empty.mp4: empty file (0 bytes)" in text
