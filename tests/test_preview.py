"""`cli.py cache show`: a contact sheet of a real extracted clip, of the size its layout says, whose
flow panel shows the motion (a rightward-moving texture is red on the colour wheel)."""
import os

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import extract_config, make_video, texture
from PIL import Image

from cli import cli
from pipeline.common.config import ShowConfig
from pipeline.common.errors import PreviewError
from pipeline.extract.decode import write_video
from pipeline.extract.extract import run_extract
from pipeline.extract.preview import GAP, LINE, Layout, colour_wheel, flow_to_rgb, pick_frames, show_video


@pytest.fixture(scope="module")
def moving_cache(tmp_path_factory):
    """A textured square moving right at 4 px/frame over a still background, and a still texture,
    extracted for real (teacher + DIS flow)."""
    root = tmp_path_factory.mktemp("show")
    background, square = texture(96, 128, seed=5), texture(40, 40, seed=6)
    frames = np.repeat(background[None], 16, axis=0)
    for i in range(16):
        frames[i, 28:68, 10 + 4 * i:50 + 4 * i] = square
    os.makedirs(root / "videos")
    write_video(str(root / "videos" / "right.mp4"), frames, 8)
    make_video(str(root / "videos" / "still.mp4"), n=16, h=96, w=128, seed=4, dx=0)
    run_extract(extract_config(root / "videos", root / "cache", height=64, width=80, teacher_every=4))
    return root / "cache"


def flow_panel(png, layout, k):
    x, y = layout.origin(k)
    y += LINE + layout.tile_h + GAP
    return np.asarray(Image.open(png).convert("RGB"))[y:y + layout.tile_h, x:x + layout.tile_w].astype(float)


def test_cache_show_draws_frames_flow_and_teacher_classes(moving_cache, tmp_path):
    out = tmp_path / "sheet.png"
    s = show_video(ShowConfig(cache=str(moving_cache), video_id="right.mp4", out=str(out), frames=3, scale=2))
    assert s["frames"] == [0, 8, 12]  # teacher frames (every 4th), spread over the video
    layout = Layout(columns=3, tile_h=128, tile_w=160, flow=True, top=5)
    assert Image.open(out).size == layout.size == s["size"]
    panel = flow_panel(out, layout, 0)
    assert panel.std() > 20 and len(np.unique(panel.reshape(-1, 3), axis=0)) > 10  # not constant
    bright = panel.reshape(-1, 3)[panel.reshape(-1, 3).max(1) > 128]  # the moving square
    assert 0.05 < len(bright) / (panel.size / 3) < 0.6  # ... and not the still background
    colour = bright.mean(0)
    assert colour[0] > 2 * max(colour[1], colour[2]), colour  # rightward = red on the wheel
    # the still clip's flow panel is dark: brightness is speed
    still = tmp_path / "still.png"
    show_video(ShowConfig(cache=str(moving_cache), video_id="still.mp4", out=str(still), frames=3))
    assert flow_panel(still, layout, 0).mean() < 0.3 * panel.mean()


def test_cli_cache_show_and_an_unknown_video(moving_cache, tmp_path):
    out = tmp_path / "p.png"
    r = CliRunner().invoke(cli, ["cache", "show", str(moving_cache), "right.mp4", "--out", str(out), "--frames", "8"])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == Layout(4, 128, 160, True, 5).size  # 4 teacher frames: 4 columns
    assert "frames 0, 4, 8, 12 of 16" in r.output
    bad = CliRunner().invoke(cli, ["cache", "show", str(moving_cache), "right"])
    assert bad.exit_code == 2 and "did you mean 'right.mp4'" in bad.output
    with pytest.raises(PreviewError, match="not in"):
        show_video(ShowConfig(cache=str(moving_cache), video_id="zzz", out=str(out)))


def test_colour_wheel_rendering():
    flow = np.zeros((2, 4, 2), np.float32)
    flow[0, 0] = (5, 0)  # right: red
    flow[0, 1] = (0, 5)  # down (image y grows downwards): hue 90 degrees, yellow-green
    flow[0, 2] = (-5, 0)  # left: cyan
    flow[0, 3] = (2.5, 0)  # half the full speed: half as bright
    rgb = flow_to_rgb(flow, 5.0).astype(int)
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[0, 2]) == (0, 255, 255)
    assert rgb[0, 1, 1] == 255 and rgb[0, 1, 2] == 0 and 100 < rgb[0, 1, 0] < 160
    assert abs(rgb[0, 3, 0] - 128) <= 1
    assert (rgb[1] == 0).all()  # no motion: black
    wheel = colour_wheel(21)
    assert tuple(wheel[10, 20]) == (255, 0, 0) and tuple(wheel[0, 0]) == (255, 255, 255)


def test_pick_frames_prefers_teacher_frames():
    assert pick_frames(100, [], 4) == [0, 33, 66, 99]
    assert pick_frames(100, np.arange(0, 100, 10), 3) == [0, 40, 90]
    assert pick_frames(3, [], 8) == [0, 1, 2]


@pytest.mark.slow
def test_cache_show_names_every_teachers_classes(tmp_path):
    # an ImageNet teacher, a scene teacher with its class file, a 7-class teacher without one
    import timm
    import torch
    import torchvision

    from cache.fingerprint import cache_teachers
    from cache.reader import CacheReader
    from pipeline.extract.preview import teacher_class_names
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=5).state_dict(),
               tmp_path / "places.pth")
    (tmp_path / "places.txt").write_text("beach\nforest\nkitchen\nstreet\nstadium\n")
    torch.save(timm.create_model("test_efficientnet", pretrained=False, num_classes=7).state_dict(), tmp_path / "tiny.pth")
    make_video(str(tmp_path / "videos" / "v.mp4"), n=16, h=64, w=96, seed=1)
    places = f"torchvision:mobilenet_v3_small,weights={tmp_path / 'places.pth'},classes={tmp_path / 'places.txt'}"
    run_extract(extract_config(tmp_path / "videos", tmp_path / "cache", height=48, width=64, teacher_every=8,
                               more_teachers=(places, f"timm:test_efficientnet,weights={tmp_path / 'tiny.pth'}")))
    s = show_video(ShowConfig(cache=str(tmp_path / "cache"), video_id="v.mp4", out=str(tmp_path / "p.png"), frames=2))
    assert s["teachers"] == ["efficientnet_lite0", "torchvision:mobilenet_v3_small", "timm:test_efficientnet"]
    assert Image.open(tmp_path / "p.png").size == Layout(2, 96, 128, True, 5, teachers=3).size
    assert Layout(2, 96, 128, True, 5, teachers=3).cell_h == Layout(2, 96, 128, True, 5).cell_h + (3 * 6 - 5) * LINE
    reader = CacheReader(str(tmp_path / "cache"))
    imagenet, scenes, tiny = teacher_class_names(reader.meta["config"], cache_teachers(reader.fingerprint))
    assert len(imagenet) == 1000 and imagenet[0] == "tench"
    assert scenes == ["beach", "forest", "kitchen", "street", "stadium"]
    assert tiny == [f"class {i}" for i in range(7)]  # no names given: numbered
    os.remove(tmp_path / "places.txt")  # gone since extraction: numbered too, never a wrong name
    assert teacher_class_names(reader.meta["config"], cache_teachers(reader.fingerprint))[1][0] == "class 0"
