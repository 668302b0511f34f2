"""Teachers by spec: EfficientNet-Lite1/2 checked against timm's independent implementation with the
same weights; any timm or torchvision classifier from a weights file, with the model's own
preprocessing; the refusals, each in one line."""
import os

import numpy as np
import pytest
import skimage.data
import torch
from helpers import center_crop_resize, make_video

from models.efficientnet_lite import EfficientNetLite
from models.teacher import FAMILIES, default_weights_path, load_teacher, teacher_fingerprint


def photos(size):
    return np.stack([center_crop_resize(skimage.data.chelsea(), size), center_crop_resize(skimage.data.coffee(), size)])


@pytest.mark.parametrize("variant,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite1_and_lite2_compute_what_timm_computes_with_the_same_weights(variant, size):
    import timm
    ours = EfficientNetLite(variant).eval()
    ours.load_state_dict(torch.load(default_weights_path(variant), map_location="cpu", weights_only=True))
    ref = timm.create_model(f"tf_{variant}", pretrained=False).eval()  # TF "same" padding, BN eps 1e-3
    theirs = ref.state_dict()
    assert len(ours.state_dict()) == len(theirs)  # the same layers in the same order: mapped by position
    mapped = {}
    for (_, v), (key, t) in zip(ours.state_dict().items(), theirs.items()):
        assert v.shape == t.shape, key
        mapped[key] = v
    ref.load_state_dict(mapped)
    frames = photos(size)
    x = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() - 127.0) / 128.0
    with torch.no_grad():
        expected = ref(x)
        np.testing.assert_allclose(ours(x).numpy(), expected.numpy(), atol=1e-4, rtol=1e-4)
    teacher = load_teacher(variant)  # batch norm folded, channels-last, batched
    logits, embed = teacher.predict(frames)
    assert teacher.input_size == size and embed.shape == (2, 1280)
    assert np.abs(logits - expected.numpy()).max() < 1e-2
    assert 281 <= logits[0].argmax() <= 285 and logits[1].argmax() == 967  # a domestic cat; espresso
    fp = teacher_fingerprint(teacher)
    assert fp["name"] == variant and fp["input_size"] == size


def test_a_timm_classifier_is_a_teacher_with_timms_own_preprocessing(tmp_path):
    import timm
    from timm.data import resolve_data_config
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=7).eval()
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    teacher = load_teacher("timm:test_efficientnet", str(path))
    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    assert (teacher.input_size, teacher.eval_crop) == (size, pytest.approx(cfg["crop_pct"]))
    assert (teacher.num_classes, teacher.embed_dim) == (7, model.num_features)
    frames = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    logits, embed = teacher.predict(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4)
        np.testing.assert_allclose(embed, model.forward_head(model.forward_features(x), pre_logits=True).numpy(),
                                   atol=1e-4)
    fp = teacher_fingerprint(teacher)
    assert fp["spec"] == "timm:test_efficientnet" and fp["num_classes"] == 7 and fp["input_size"] == size
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match=r"do not fit timm:test_efficientnet: missing \['conv_stem.weight', .* "
                                         r"unexpected \['conv1.0.weight', ") as err:
        load_teacher("timm:test_efficientnet", str(other))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="timm:no_such_net: Unknown model"):
        load_teacher("timm:no_such_net", str(path))
    with pytest.raises(ValueError, match="needs --teacher-weights FILE"):
        load_teacher("timm:test_efficientnet")


def test_a_torchvision_scene_classifier_with_its_class_names(tmp_path):
    import torchvision
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=365).eval()
    path = tmp_path / "places365.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)  # as trained
    names = tmp_path / "places365.txt"
    names.write_text("\n".join(f"scene {i}" for i in range(365)))
    teacher = load_teacher("torchvision:mobilenet_v3_small", str(path), classes=str(names))
    assert (teacher.input_size, teacher.eval_crop, teacher.num_classes, teacher.embed_dim) == (224, 224 / 256, 365, 1024)
    frames = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    logits, _ = teacher.predict(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4)
    assert "classes_sha256" in teacher_fingerprint(teacher)
    names.write_text("\n".join(f"scene {i}" for i in range(364)))
    with pytest.raises(ValueError, match=r"places365.txt: 364 names but the teacher has 365 classes$"):
        load_teacher("torchvision:mobilenet_v3_small", str(path), classes=str(names))
    with pytest.raises(ValueError, match=f"unknown teacher 'resnet50'; known: {FAMILIES}$"):
        load_teacher("resnet50")


@pytest.mark.slow
def test_extract_with_a_timm_teacher_stores_its_classes_at_its_input_size(tmp_path):
    import timm
    from timm.data import resolve_data_config

    from cache.reader import CacheReader
    from pipeline.common.config import ExtractConfig
    from pipeline.extract.extract import run_extract
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    for i in range(2):
        make_video(str(tmp_path / "v" / f"v{i}.mp4"), n=8, h=64, w=96, seed=i)
    run_extract(ExtractConfig(videos=str(tmp_path / "v"), cache=str(tmp_path / "c"), teacher="timm:test_efficientnet",
                              teacher_weights=str(tmp_path / "tiny.pth"), height=48, width=64, teacher_every=4,
                              progress=False))
    reader = CacheReader(str(tmp_path / "c"))
    fp = reader.fingerprint
    assert fp["teacher"]["spec"] == "timm:test_efficientnet" and fp["teacher"]["num_classes"] == 7
    assert fp["preprocessing"]["teacher_size"] == resolve_data_config({}, model=model)["input_size"][-1]
    got = reader.read("v0.mp4")
    assert got["logits"].shape == (2, 7) and got["embed"].shape == (2, model.num_features)


def test_a_further_teacher_names_its_files_inline(tmp_path):
    from pipeline.common.teacher_spec import parse_teacher, render_teacher
    spec = "torchvision:resnet50,weights=r50.pth,classes=places.txt"
    name, weights, classes = parse_teacher(spec)
    assert (name, weights, classes) == ("torchvision:resnet50", os.path.abspath("r50.pth"), os.path.abspath("places.txt"))
    assert parse_teacher(render_teacher(name, weights, classes)) == (name, weights, classes)
    assert parse_teacher("efficientnet_lite2") == ("efficientnet_lite2", None, None)
    with pytest.raises(ValueError, match=r"'weight=r50.pth' is not weights=FILE or classes=FILE$"):
        parse_teacher("torchvision:resnet50,weight=r50.pth")
