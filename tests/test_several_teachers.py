"""Several teachers in one cache: labelled from one decode, a teacher added to a finished cache (frames
and flow untouched, resumable after a kill), one distillation head per teacher, and the refusals."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from helpers import make_video

from cache.fingerprint import read_cache_json
from cache.manifest import verify_cache
from cache.reader import CacheReader
from models.teacher import load_teacher
from pipeline.common.config import DistillConfig, EvalConfig, ExtractConfig
from pipeline.common.errors import DistillError, ExportError, ExtractError
from pipeline.distill.train import run_distill
from pipeline.evaluate.evaluate import run_eval
from pipeline.evaluate.export import distillation_head
from pipeline.extract.add_teacher import run_add_teacher
from pipeline.extract.decode import VideoDecode
from pipeline.extract.extract import run_extract

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM = "timm:test_efficientnet"
PLACES = "torchvision:mobilenet_v3_small"
LITE = "efficientnet_lite0"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """(root, {spec: inline spec}) of two tiny random classifiers saved to files, as a user would have them."""
    import timm
    import torchvision
    root = tmp_path_factory.mktemp("several")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", pretrained=False, num_classes=7).state_dict(), root / "tiny.pth")
    places = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=5)
    torch.save(places.state_dict(), root / "places.pth")
    (root / "places.txt").write_text("\n".join(["beach", "forest", "kitchen", "street", "stadium"]))
    for i in range(3):
        make_video(str(root / "videos" / f"v{i}.mp4"), n=24, h=64, w=96, seed=i, dx=2 + i)
    for i in range(4):  # labelled clips for eval
        make_video(str(root / "labelled" / "ab"[i % 2] / f"l{i}.mp4"), n=16, h=64, w=96, seed=10 + i, dx=1 + i % 2)
    return root, {TIMM: f"{TIMM},weights={root / 'tiny.pth'}",
                  PLACES: f"{PLACES},weights={root / 'places.pth'},classes={root / 'places.txt'}", LITE: LITE}


def extract(root, cache, specs, **kw):
    first, *more = specs
    spec, _, rest = first.partition(",")
    weights = rest.removeprefix("weights=") or None
    return run_extract(ExtractConfig(videos=str(root / "videos"), cache=str(cache), teacher=spec, teacher_weights=weights,
                                     more_teachers=tuple(more), height=48, width=64, teacher_every=4, progress=False,
                                     **kw))


def part_bytes(cache, names=("frames", "flow", "teacher_frame", "logits", "embed")):
    """{relative path: bytes} of every object of these arrays in every part."""
    out = {}
    for dirpath, _, files in os.walk(cache / "parts"):
        rel = os.path.relpath(dirpath, cache / "parts")
        if rel.split(os.sep)[1:2] and rel.split(os.sep)[1] in names:
            out.update({os.path.join(rel, f): open(os.path.join(dirpath, f), "rb").read() for f in files})
    return out


def test_two_teachers_from_one_decode_each_at_its_own_size(teachers, tmp_path):
    root, spec = teachers
    s = extract(root, tmp_path / "ab", [spec[TIMM], spec[PLACES]])
    assert s["done"] == 3
    reader = CacheReader(str(tmp_path / "ab"))
    assert reader.teachers == [TIMM, PLACES]
    more = reader.fingerprint["more_teachers"][0]
    assert (more["name"], more["num_classes"], more["input_size"], more["crop"]) == (PLACES, 5, 224, 0.875)
    got = reader.read("v1.mp4", fields=("logits", "embed", "logits_1", "embed_1"))
    assert got["logits"].shape == (6, 7) and got["logits_1"].shape == (6, 5) and got["embed_1"].shape == (6, 1024)
    # the second teacher saw its own crop of the same decode, at its own size
    places = load_teacher(PLACES, str(root / "places.pth"), classes=str(root / "places.txt"))
    pre = reader.fingerprint["preprocessing"]
    views = np.concatenate([t[1] for _, t in VideoDecode(str(root / "videos" / "v1.mp4"), fps=8, height=48, width=64,
                                                         teacher_size=pre["teacher_size"], teacher_crop=pre["teacher_crop"],
                                                         more_teachers=[(224, 0.875)])])
    np.testing.assert_allclose(got["logits_1"], places.predict(views[::4])[0], atol=2e-2)
    # the first teacher's arrays, the frames and the flow are those of a cache of the first teacher alone
    extract(root, tmp_path / "a", [spec[TIMM]])
    alone = CacheReader(str(tmp_path / "a")).read("v1.mp4", fields=("frames", "flow", "logits"))
    both = reader.read("v1.mp4", fields=("frames", "flow", "logits"))
    for name in ("frames", "flow", "logits"):
        np.testing.assert_array_equal(both[name], alone[name])
    # a rerun must name every teacher: the cache says which
    with pytest.raises(ExtractError, match=f"has teachers {TIMM}, {PLACES}; extract into it with all of them"):
        extract(root, tmp_path / "ab", [spec[TIMM]])
    with pytest.raises(ExtractError, match="each teacher once"):
        extract(root, tmp_path / "x", [spec[TIMM], spec[TIMM]])


def distill(cache, out, **kw):
    return run_distill(DistillConfig(**{"cache": str(cache), "out": str(out), "objective": "distinit", "student": "r3d_cpu",
                                        "clip_len": 4, "crop": 48, "batch_size": 3, "steps": 4, "workers": 0,
                                        "device": "cpu", "progress": False, **kw}))


def test_one_head_per_teacher_then_a_third_added_and_the_run_refuses_to_resume(teachers, tmp_path):
    root, spec = teachers
    cache = tmp_path / "c"
    extract(root, cache, [spec[TIMM], spec[PLACES]], part_videos=1)
    distill(cache, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert [(t["name"], t["weight"]) for t in ckpt["teachers"]] == [(TIMM, 0.5), (PLACES, 0.5)]
    assert ckpt["model"]["distill_head.weight"].shape[0] == 7 and ckpt["model"]["distill_head_1.weight"].shape[0] == 5
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert {f"distinit/{TIMM}", f"distinit/{PLACES}"} <= set(log[-1])
    # --teacher-weight: one teacher alone is the plain distinit term; a name the cache lacks is refused
    distill(cache, tmp_path / "one", teacher_weight=f"{PLACES}=1")
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert [t["name"] for t in one["teachers"]] == [PLACES] and "distill_head.weight" not in one["model"]
    assert "distinit" in json.loads(open(tmp_path / "one" / "log.jsonl").readline())
    with pytest.raises(DistillError, match=rf"'places=1' is not NAME=WEIGHT \(>= 0\) of a teacher of .* \({TIMM}, {PLACES}\)$"):
        distill(cache, tmp_path / "bad", teacher_weight="places=1")
    # export --fc names the head; eval shows a teacher row per teacher, each at its own input
    assert distillation_head(ckpt, "head")[1]["weight"].shape[0] == 7
    name, head = distillation_head(ckpt, f"head:{PLACES}")
    assert name == PLACES and torch.equal(head["weight"], ckpt["model"]["distill_head_1.weight"])
    with pytest.raises(ExportError, match=f"--fc head:nope: this run distilled from {TIMM}, {PLACES}$"):
        distillation_head(ckpt, "head:nope")
    rows, _, _ = run_eval(EvalConfig(task="folder", root=str(root / "labelled"), out=str(tmp_path / "eval"),
                                     checkpoint=str(tmp_path / "run" / "checkpoint.pt"), inits=("teacher",),
                                     protocols=("knn",), test_fraction=0.5, group_pattern="", progress=False))
    stores = {r["init"]: r["features"] for r in rows}
    assert set(stores) == {"teacher", f"teacher:{PLACES}"}
    with h5py.File(stores[f"teacher:{PLACES}"]) as f:
        assert json.loads(f.attrs["config"])["teacher"]["name"] == PLACES and f["features"].shape[-1] == 1024

    frames_and_flow = part_bytes(cache, ("frames", "flow", "teacher_frame", "logits", "embed", "logits_1"))
    s = run_add_teacher(str(cache), LITE, device="cpu", progress=False)
    assert (s["slot"], s["parts"], s["videos"], s["frames"]) == (2, 3, 3, 18)
    assert part_bytes(cache, ("frames", "flow", "teacher_frame", "logits", "embed", "logits_1")) == frames_and_flow
    reader = CacheReader(str(cache))
    assert reader.teachers == [TIMM, PLACES, LITE]
    # the same outputs as a cache extracted with the three at once (one decode, the same crops)
    extract(root, tmp_path / "abc", [spec[TIMM], spec[PLACES], LITE])
    at_once = CacheReader(str(tmp_path / "abc"))
    for vid in ("v0.mp4", "v2.mp4"):
        np.testing.assert_array_equal(reader.read(vid, fields=("logits_2",))["logits_2"],
                                      at_once.read(vid, fields=("logits_2",))["logits_2"])
    assert run_add_teacher(str(cache), LITE, device="cpu", progress=False)["parts"] == 0  # nothing left to do
    with pytest.raises(ExtractError, match=f"already has teacher {TIMM} \\(its first\\)"):
        run_add_teacher(str(cache), spec[TIMM], device="cpu", progress=False)
    # the run distilled from two teachers; the cache now gives three: resuming it is refused, naming them
    with pytest.raises(DistillError, match=f"other teachers \\(the run distilled from {TIMM}=0.5, {PLACES}=0.5; "
                                           f"the cache now gives {TIMM}=0.333, {PLACES}=0.333, {LITE}=0.333\\)"):
        distill(cache, tmp_path / "run", steps=8)
    distill(cache, tmp_path / "run", steps=8, teacher_weight=f"{TIMM}=1,{PLACES}=1")  # the same two: resumes


def test_a_killed_add_teacher_is_finished_by_its_rerun(teachers, tmp_path):
    root, spec = teachers
    cache = tmp_path / "c"
    extract(root, cache, [spec[TIMM]], part_videos=1)
    before = part_bytes(cache)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "cli.py"), "extract", "--cache", str(cache),
                             "--add-teacher", LITE, "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    first = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in os.listdir(cache / "parts") if (cache / "parts" / p / "logits_1" / "zarr.json").exists()]
        if done:
            first = done
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert first, "the add-teacher run finished before it could be killed"
    problems, notes, checked = verify_cache(str(cache))
    if checked["lacking_teachers"]:  # the kill landed before the last part: distill says what to do
        assert not problems and any("do not hold teacher efficientnet_lite0 yet" in n for n in notes)
        with pytest.raises(DistillError, match="do not hold teacher efficientnet_lite0 yet: rerun its `extract --add-teacher`"):
            distill(cache, tmp_path / "run")
    s = run_add_teacher(str(cache), LITE, device="cpu", progress=False)
    assert s["parts_held"] >= len(first) and s["parts"] + s["parts_held"] == 3
    assert not verify_cache(str(cache))[0] and not verify_cache(str(cache))[2]["lacking_teachers"]
    assert part_bytes(cache) == before  # frames, flow and the first teacher untouched
    # the same outputs as an uninterrupted addition
    extract(root, tmp_path / "ref", [spec[TIMM]], part_videos=1)
    run_add_teacher(str(tmp_path / "ref"), LITE, device="cpu", progress=False)
    for vid in ("v0.mp4", "v1.mp4", "v2.mp4"):
        np.testing.assert_array_equal(CacheReader(str(cache)).read(vid, fields=("embed_1",))["embed_1"],
                                      CacheReader(str(tmp_path / "ref")).read(vid, fields=("embed_1",))["embed_1"])
    assert read_cache_json(str(cache))["config"]["more_teachers"] == [LITE]
