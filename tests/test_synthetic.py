"""The generated benchmark: rendered motions move the labelled way, and the generator writes labels,
layout and real videos, reproducibly."""
import csv
import os

import cv2
import numpy as np
import pytest

from pipeline.demo.synthetic import MOTIONS, OBJECTS, default_photos, default_textures, generate_benchmark, render_clip
from pipeline.extract.decode import VideoDecode


def object_mask(frames):
    """Where the frame differs from the per-pixel median over time (the static background)."""
    bg = np.median(frames.astype(np.float32), axis=0)
    return np.abs(frames.astype(np.float32) - bg).sum(-1) > 40


@pytest.fixture(scope="module")
def assets():
    return default_photos(), list(default_textures().values())


@pytest.mark.parametrize("motion, axis, sign", [("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)])
def test_translations_move_the_object_centroid_the_labelled_way(assets, motion, axis, sign):
    photos, textures = assets
    frames, path, rate = render_clip(photos["coffee"], motion, np.random.default_rng(3), textures, 24)
    mask = object_mask(frames)
    centroid = [np.argwhere(m).mean(0)[axis] for m in (mask[0], mask[-1])]
    # moved the labelled way, by tens of pixels (the median background is smeared along the path,
    # so the measured shift underestimates the true rate * 23 frames)
    assert sign * (centroid[1] - centroid[0]) > max(20, 0.4 * rate * 23)


@pytest.mark.parametrize("motion", ["zoom_in", "zoom_out"])
def test_zoom_changes_the_object_area(assets, motion):
    photos, textures = assets
    frames, _, _ = render_clip(photos["cat"], motion, np.random.default_rng(4), textures, 24)
    mask = object_mask(frames)
    grows = mask[-1].sum() > 1.5 * mask[0].sum()
    shrinks = mask[0].sum() > 1.5 * mask[-1].sum()
    assert grows if motion == "zoom_in" else shrinks


@pytest.mark.parametrize("motion, sign", [("rotate_cw", -1), ("rotate_ccw", 1)])
def test_rotation_direction_shows_in_the_flow(assets, motion, sign):
    # angular velocity of the flow around the object's centre (image coordinates: y points down)
    photos, textures = assets
    frames, path, _ = render_clip(photos["astronaut"], motion, np.random.default_rng(5), textures, 6)
    g0, g1 = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames[2:4])
    flow = cv2.calcOpticalFlowFarneback(g0, g1, None, 0.5, 3, 9, 3, 5, 1.1, 0)
    cx, cy = path[2, 0], path[2, 1]
    yy, xx = np.mgrid[:flow.shape[0], :flow.shape[1]]
    rx, ry = xx - cx, yy - cy
    near = (rx ** 2 + ry ** 2 < 15 ** 2) & (rx ** 2 + ry ** 2 > 4 ** 2)
    omega = (rx * flow[..., 1] - ry * flow[..., 0])[near].mean()  # >0: clockwise on screen (y points down)
    assert -sign * omega > 0


def test_generator_writes_labels_layout_and_real_videos(tmp_path):
    params = generate_benchmark(str(tmp_path), n_pool=3, n_labelled=16, n_frames=8, seed=1)
    rows = list(csv.DictReader(open(tmp_path / "labelled" / "labels.csv")))
    assert len(rows) == 16 and {r["object"] for r in rows} <= set(OBJECTS) and {r["motion"] for r in rows} <= set(MOTIONS)
    for r in rows:
        assert (tmp_path / "labelled" / "object" / r["object"] / r["id"]).exists()
        assert (tmp_path / "labelled" / "motion" / r["motion"] / r["id"]).exists()
    assert len(os.listdir(tmp_path / "pool")) == 3
    frames = np.concatenate([s for s, _ in VideoDecode(str(tmp_path / "pool" / "clip_00000.mp4"), fps=8, height=96,
                                                        width=128, teacher_size=96)])
    assert len(frames) == 8  # a real H.264 file at 8 fps
    before = os.path.getmtime(tmp_path / "pool" / "clip_00000.mp4")
    assert generate_benchmark(str(tmp_path), n_pool=3, n_labelled=16, n_frames=8, seed=1) == params
    assert os.path.getmtime(tmp_path / "pool" / "clip_00000.mp4") == before  # same parameters: nothing redone
    other = tmp_path / "again"
    generate_benchmark(str(other), n_pool=3, n_labelled=16, n_frames=8, seed=1)
    assert list(csv.DictReader(open(other / "labelled" / "labels.csv"))) == rows  # seeded: reproducible


def test_clips_rendered_side_by_side_are_the_files_one_at_a_time_writes(tmp_path, monkeypatch):
    files = {}
    for cores in (1, 4):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        root = tmp_path / f"cores{cores}"
        generate_benchmark(str(root), n_pool=2, n_labelled=4, n_frames=4, seed=2)
        files[cores] = {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes()
                        for p in sorted(root.rglob("*")) if p.is_file()}
    # videos, labels.csv, benchmark.json and a link per labelled clip and label set
    assert len(files[1]) == 2 + 4 + 2 + 2 * 4 and files[4] == files[1]


def test_other_pictures_make_another_benchmark_in_the_same_folder(tmp_path):
    from skimage import data
    params = generate_benchmark(str(tmp_path), n_pool=2, n_labelled=12, n_frames=4, seed=1)
    # grayscale pictures are accepted (as RGB objects / grey textures); labels are the given names
    other = generate_benchmark(str(tmp_path), n_pool=2, n_labelled=12, n_frames=4, seed=1,
                               photos={"clock": data.clock(), "coins": data.coins()},
                               textures={"moon": data.moon()})
    assert other["objects"] == ["clock", "coins"] and other["photos"] != params["photos"]
    rows = list(csv.DictReader(open(tmp_path / "labelled" / "labels.csv")))
    assert {r["object"] for r in rows} <= {"clock", "coins"}
    # the first benchmark's label folders are gone, not mixed with the new ones
    assert sorted(os.listdir(tmp_path / "labelled" / "object")) == sorted({r["object"] for r in rows})
