"""The image teacher: real ImageNet weights, correct predictions on real photos, batching, errors."""
import hashlib

import numpy as np
import pytest
import skimage.data
import torch
from helpers import center_crop_resize
from torchvision.models._meta import _IMAGENET_CATEGORIES as IMAGENET_CLASSES

from models.efficientnet_lite import EfficientNetLite
from models.teacher import default_weights_path, load_teacher, teacher_fingerprint
from pipeline.common.config import ExtractConfig
from pipeline.extract.extract import make_fingerprint


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


@pytest.fixture(scope="module")
def photos():
    """Two real photos with unambiguous ImageNet classes, centre-cropped to the teacher's input."""
    return np.stack([center_crop_resize(skimage.data.chelsea(), 224), center_crop_resize(skimage.data.coffee(), 224)])


def test_real_photos_get_their_imagenet_class(teacher, photos):
    logits, _ = teacher.predict(photos)
    probs = torch.from_numpy(logits).softmax(-1)
    assert probs.argmax(-1).tolist() == [285, 967], [IMAGENET_CLASSES[i] for i in probs.argmax(-1)]
    assert IMAGENET_CLASSES[285] == "Egyptian cat" and IMAGENET_CLASSES[967] == "espresso"
    assert probs[1, 967] > 0.8  # random or mis-loaded weights are never this sure


def test_shapes_dtypes_and_torch_input(teacher, photos):
    logits, embed = teacher.predict(photos)
    assert logits.shape == (2, 1000) and embed.shape == (2, 1280)
    assert logits.dtype == np.float32 and embed.dtype == np.float32
    assert (embed >= 0).all()  # pooled ReLU6 features
    logits_t, embed_t = teacher.predict(torch.from_numpy(photos))
    np.testing.assert_array_equal(logits_t, logits)
    np.testing.assert_array_equal(embed_t, embed)
    empty_logits, empty_embed = teacher.predict(photos[:0])
    assert empty_logits.shape == (0, 1000) and empty_embed.shape == (0, 1280)


def test_parameter_count():
    model = EfficientNetLite()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # the 4.65 M of the EfficientNet-Lite0 paper table


def test_batches_match_single_frames(teacher, photos):
    rng = np.random.default_rng(0)
    frames = np.concatenate([photos, photos[:, ::-1], rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)])
    old = teacher.batch_size
    teacher.batch_size = 3  # 7 frames -> batches of 3, 3, 1
    try:
        logits, embed = teacher.predict(frames)
    finally:
        teacher.batch_size = old
    singles = [teacher.predict(f[None]) for f in frames]
    np.testing.assert_allclose(logits, np.concatenate([s[0] for s in singles]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(embed, np.concatenate([s[1] for s in singles]), rtol=1e-4, atol=1e-4)


def test_fingerprint_names_the_exact_weights(teacher):
    # the teacher describes itself; the cache fingerprint (stage one) adds the sha256 of its weights file
    fp = make_fingerprint(ExtractConfig(videos="", cache="", device="cpu"), [teacher])["teacher"]
    with open(default_weights_path(), "rb") as f:
        assert fp["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert fp == {"name": "efficientnet_lite0", "weights_sha256": fp["weights_sha256"], "input_size": 224,
                  "normalisation": "(x-127)/128", "num_classes": 1000, "embed_dim": 1280, "precision": "fp32"}
    assert teacher_fingerprint(teacher) == {k: v for k, v in fp.items() if k != "weights_sha256"}
    # a job that will run the teacher on a GPU computes at another precision: another fingerprint
    assert teacher_fingerprint(teacher, "cuda")["precision"].startswith("cuda autocast")


def test_bad_weights_give_one_line_value_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match="nope.pth") as err:
        load_teacher(weights=missing)
    assert "\n" not in str(err.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(ValueError, match="garbage.pth") as err:
        load_teacher(weights=str(garbage))
    assert "\n" not in str(err.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        load_teacher(weights=wrong)
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("resnet50")


def test_class_names_are_the_teachers_output_order(teacher, photos):
    from models.imagenet import class_names
    names = class_names()
    assert len(names) == 1000 and names == IMAGENET_CLASSES  # torchvision's metadata: nothing downloads
    logits, _ = teacher.predict(photos)
    assert [names[i] for i in logits.argmax(-1)] == ["Egyptian cat", "espresso"]
    assert class_names(5) == [f"class {i}" for i in range(5)]
