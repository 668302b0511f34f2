"""Progress in a log file is a few plain lines, not carriage-return frames; a terminal keeps its bar."""
import io

from click.testing import CliRunner

from cli import cli
from pipeline.common.progress import LogProgress, progress_bar
from tests.helpers import make_video


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_every_interval_and_one_at_the_end():
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=100, desc="distill modist", unit="step", stream=out, every=30, clock=clock)
    for _ in range(100):
        clock.now += 1.0  # one step a second: 100 s in all
        bar.update(1)
        bar.set_postfix(loss="1.234")
    bar.close()
    bar.close()  # closing twice prints nothing more
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4  # at 30, 60 and 90 s, then the end
    assert lines[0] == "distill modist: 30/100 step (30 %), 1 step/s, ETA 1:10, loss 1.234"
    assert lines[-1] == "distill modist: 100/100 step (100 %), 1 step/s, 1:40 elapsed, loss 1.234"


def test_iteration_and_unknown_totals():
    out, clock = io.StringIO(), FakeClock()
    items = list(LogProgress(iter(range(3)), desc="videos", unit="video", stream=out, clock=clock))
    assert items == [0, 1, 2] and out.getvalue() == "videos: 3 video, 0 video/s, 0:00 elapsed\n"
    quiet = io.StringIO()
    list(LogProgress(range(5), total=5, disable=True, stream=quiet))
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_live_bar_and_a_file_the_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    assert type(progress_bar(total=3, stream=Terminal())).__name__ == "tqdm"
    assert isinstance(progress_bar(total=3, stream=io.StringIO()), LogProgress)
    assert isinstance(progress_bar([1, 2], stream=io.StringIO()), LogProgress)


def test_extract_into_a_log_file_writes_plain_lines(tmp_path):
    videos = tmp_path / "videos"
    for i in range(2):
        make_video(str(videos / f"v{i}.mp4"), n=8, h=64, w=96, seed=i)
    result = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--cache", str(tmp_path / "cache"),
                                      "--flow", "none", "--teacher", "none"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    assert "extract: 2/2 video (100 %)" in result.output
