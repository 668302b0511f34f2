"""The CLIP teacher and text tower (open_clip), end to end on a tiny randomly initialised model saved to
files: its numbers mean nothing, its shapes, spaces, fingerprints and refusals are real."""
import json
import re

import numpy as np
import pytest
import torch
from helpers import extract_config, make_video, texture

from pipeline.common.config import ConceptsConfig, DistillConfig, EvalConfig

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(teacher name, weights file): an open_clip model config and its random weights, as a user's
    own checkpoint would be given."""
    import open_clip
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tinyclip.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    weights = folder / "tinyclip.pt"
    torch.save(open_clip.create_model("tinyclip").state_dict(), weights)
    return f"clip:{config}", str(weights)


def test_clip_teacher_gives_zero_shot_imagenet_logits_and_unit_joint_embeddings(tiny_clip):
    from models.teacher import load_teacher, teacher_fingerprint
    from models.text import load_text_encoder
    name, weights = tiny_clip
    teacher = load_teacher(name, weights)
    frames = np.stack([texture(80, 80, seed=s) for s in range(3)])  # another size than the model's: resized
    logits, embed = teacher.predict(frames)
    assert logits.shape == (3, 1000) and embed.shape == (3, 32) and logits.dtype == embed.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embed, axis=1), 1, atol=1e-5)
    net = teacher.network
    np.testing.assert_allclose(logits, net.logit_scale * embed @ net.class_text.numpy().T, rtol=1e-4, atol=1e-4)
    # the classifier's rows are the same model's text tower: one space for the teacher and the bank
    text = load_text_encoder(name, weights)
    np.testing.assert_allclose(text.encode(["a photo of a tench."])[0], net.class_text[0].numpy(), atol=1e-5)
    fp = teacher_fingerprint(teacher)
    assert fp["name"] == text.name == "clip:tinyclip" and fp["embed_dim"] == text.dim == 32
    assert fp["space"] == "clip joint" and fp["architecture"] == TINY and fp["input_size"] == 64


def test_clip_loading_refusals_are_one_line(tiny_clip, tmp_path, monkeypatch):
    import models.clip
    from models.teacher import default_weights_path, load_teacher
    name, weights = tiny_clip
    cases = [((name, None), "needs its weights: a local file"),
             ((name, str(tmp_path / "none.pt")), "CLIP weights file not found"),
             ((name, default_weights_path()), "do not load into tinyclip"),
             (("clip:NoSuchNet", weights), "unknown open_clip architecture 'NoSuchNet'"),
             (("clip:", weights), "clip:ARCH"),
             (("clip:" + str(tmp_path / "gone.json"), weights), "model config file not found")]
    for (spec, path), message in cases:
        with pytest.raises(ValueError, match=message) as e:
            load_teacher(spec, path)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="takes a weights file or a hub tag, not both"):
        load_teacher(name, weights, pretrained="openai")
    with pytest.raises(ValueError, match="no pretrained weights tagged 'nope'"):
        load_teacher("clip:ViT-B-32", pretrained="nope")
    # asked for hub weights on a machine that cannot reach the hub: one line at once, no minute of retries
    monkeypatch.setattr(models.clip, "hub_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(ValueError, match=r"cannot reach huggingface.co \(offline\?\); pass a local checkpoint"):
        load_teacher("clip:ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="--teacher-pretrained is for clip:ARCH"):
        load_teacher("efficientnet_lite0", pretrained="openai")


@pytest.mark.slow
def test_lss_with_a_clip_teacher_needs_no_bridge_and_eval_uses_that_teacher(tiny_clip, concept_bank, tmp_path):
    from models.checkpoint import load_checkpoint
    from pipeline.common.errors import DistillError
    from pipeline.distill.concepts import read_bank, run_concepts
    from pipeline.distill.train import run_distill
    from pipeline.evaluate.evaluate import run_eval
    from pipeline.extract.extract import run_extract
    name, weights = tiny_clip
    for i in range(4):
        make_video(str(tmp_path / "videos" / ("left" if i % 2 else "right") / f"v{i}.mp4"), n=12, h=64, w=96, seed=i,
                   dx=3 if i % 2 else -3)
    cache = tmp_path / "cache"
    run_extract(extract_config(tmp_path / "videos", cache, height=64, width=80, teacher=name, teacher_weights=weights))
    fp = json.load(open(cache / "cache.json"))["fingerprint"]["teacher"]
    assert fp["name"] == "clip:tinyclip" and fp["embed_dim"] == 32 and fp["space"] == "clip joint"

    bank_path = str(tmp_path / "clip-bank.h5")
    run_concepts(ConceptsConfig(classes="ucf101", out=bank_path, text_encoder=name, text_weights=weights))
    bank = read_bank(bank_path)
    assert bank["category_vectors"].shape == (101, 32) and bank["text_encoder"]["name"] == "clip:tinyclip"

    def distill(bank, out):
        return run_distill(DistillConfig(cache=str(cache), out=str(out), objective="lss", concepts=bank, student="r3d_cpu",
                                         clip_len=4, crop=48, batch_size=4, steps=2, workers=0, progress=False))
    # a MiniLM bank is another space than the CLIP teacher's embeddings: refused, with the fix
    fix = re.escape(f"--text-encoder {name} --text-weights {weights}`")
    with pytest.raises(DistillError, match=f"the cache's teacher is clip:tinyclip .* {fix}"):
        distill(concept_bank, tmp_path / "minilm-run")
    distill(bank_path, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["concepts"]["teacher_space"] == "joint" and ckpt["model"]["concept_head.net.2.weight"].shape[0] == 32
    assert ckpt["teacher"]["name"] == name and ckpt["teacher"]["weights"] == weights

    # eval: the teacher row runs the checkpoint's CLIP teacher, and zero-shot happens in its text space
    rows, _, notes = run_eval(EvalConfig(task="folder", root=str(tmp_path / "videos"), out=str(tmp_path / "eval"),
                                         protocols=("zeroshot", "knn"), checkpoint=str(tmp_path / "run" / "checkpoint.pt"),
                                         inits=("checkpoint", "teacher"), clips=2, test_fraction=0.5, group_pattern="",
                                         progress=False))
    assert any(n.startswith(f"teacher row: {name} ({weights})") for n in notes)
    assert any("class names in clip:tinyclip's space" in n for n in notes)
    assert {(r["init"], r["protocol"]) for r in rows} >= {("teacher", "zeroshot"), ("checkpoint", "zeroshot"),
                                                          ("teacher", "knn")}
    import h5py

    def stored(store):
        with h5py.File(store) as f:
            assert json.loads(f.attrs["config"])["teacher"]["name"] == "clip:tinyclip"
            return dict(zip([i.decode() for i in f["ids"][()]], f["features"][()]))
    features = tmp_path / "eval" / "features"
    [zeroshot_store] = features.glob("teacher-concepts-*.h5")
    [probe_store] = [p for p in features.glob("teacher-*.h5") if p != zeroshot_store]
    probe, zeroshot = stored(probe_store), stored(zeroshot_store)
    # zero-shot compares the teacher's own joint embedding with the class names, not its probabilities
    # through the ImageNet bridge (which would land in the same 32-d space with other values)
    assert zeroshot and all(np.allclose(x, probe[vid], atol=1e-6) and x.shape[-1] == 32 for vid, x in zeroshot.items())
    # the same labelled videos, now with the ImageNet teacher asked for: the CLIP outputs in the decoded
    # cache are another teacher's, so its row runs its own teacher (1280-d), never reads them
    rows, _, _ = run_eval(EvalConfig(task="folder", root=str(tmp_path / "videos"), out=str(tmp_path / "eval"),
                                     protocols=("knn",), inits=("teacher",), teacher="efficientnet_lite0",
                                     test_fraction=0.5, group_pattern="", progress=False))
    [store] = {r["features"] for r in rows}
    with h5py.File(store) as f:
        assert f["features"].shape[-1] == 1280


@pytest.mark.slow
def test_commands_answer_a_clip_model_without_weights_in_one_line(tmp_path):
    from test_cli import cli

    import models.clip
    make_video(str(tmp_path / "videos" / "v.mp4"), n=8)
    need = "error: clip:ViT-B-32 needs its weights: a local file"
    for args in (["extract", "--videos", "videos", "--teacher", "clip:ViT-B-32"],
                 ["concepts", "--text-encoder", "clip:ViT-B-32"]):
        result = cli(tmp_path, *args, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith(need) and result.stderr.count("\n") == 1, result.stderr
    if models.clip.hub_reachable("https://huggingface.co"):
        pytest.skip("this machine reaches the model hub: the offline refusal cannot be seen here")
    result = cli(tmp_path, "extract", "--videos", "videos", "--teacher", "clip:ViT-B-32", "--teacher-pretrained", "openai",
                 timeout=120)
    assert result.returncode == 2 and "cannot reach huggingface.co (offline?)" in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists()  # refused before any work
