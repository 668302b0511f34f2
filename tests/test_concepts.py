"""The concept bank of LSS: class names as words, built-in descriptions, a real MiniLM bank on disk,
and the refusals a user meets (unknown list, bad descriptions file, another text encoder)."""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from pipeline.common.errors import ConceptError
from pipeline.distill.concepts import (
    builtin_descriptions,
    check_encoder,
    class_list,
    class_vectors,
    encoder_identity,
    read_bank,
    read_descriptions,
    words_of,
)


@pytest.mark.parametrize("name, words", [("ApplyEyeMakeup", "apply eye makeup"), ("potted_plant", "potted plant"),
                                         ("YoYo", "yo yo"), ("playing guitar", "playing guitar"),
                                         ("brush_hair", "brush hair"), ("PlayingDaf", "playing daf"),
                                         ("TV-L1", "tv l1")])
def test_class_names_become_words(name, words):
    assert words_of(name) == words


def test_builtin_class_lists_ship_with_the_package():
    assert len(class_list("k400")) == 400 and class_list("k400")[0] == "abseiling"
    assert len(class_list("ucf101")) == 101 and class_list("ucf101")[0] == "ApplyEyeMakeup"
    assert len(class_list("hmdb51")) == 51 and "cartwheel" in class_list("hmdb51")
    assert len(class_list("imagenet")) == 1000


def test_class_list_file_and_refusals(tmp_path):
    (tmp_path / "mine.txt").write_text("riding a bike\n\nswimming\n")
    assert class_list(str(tmp_path / "mine.txt")) == ["riding a bike", "swimming"]
    with pytest.raises(ConceptError, match="neither a built-in list"):
        class_list("k401")
    (tmp_path / "twice.txt").write_text("a\nb\na\n")
    with pytest.raises(ConceptError, match="twice.txt: a class name appears twice"):
        class_list(str(tmp_path / "twice.txt"))


def test_builtin_descriptions_are_shared_content_words():
    d = builtin_descriptions(["ApplyEyeMakeup", "ApplyLipstick", "playing guitar", "yoga"])
    assert d["ApplyEyeMakeup"] == ["apply", "eye", "makeup"] and d["ApplyLipstick"] == ["apply", "lipstick"]
    assert d["yoga"] == ["yoga"]


def test_descriptions_file_is_checked(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"yoga": ["a mat on the floor", "slow stretching"]}))
    assert read_descriptions(str(path), ["yoga"]) == {"yoga": ["a mat on the floor", "slow stretching"]}
    with pytest.raises(ConceptError, match="no descriptions for 1 class"):
        read_descriptions(str(path), ["yoga", "surfing"])
    path.write_text("[1, 2]")
    with pytest.raises(ConceptError, match="d.json: must map each class name"):
        read_descriptions(str(path), ["yoga"])


def test_bank_holds_unit_vectors_membership_and_encoder_identity(concept_bank, text_encoder):
    bank = read_bank(concept_bank)
    assert bank["categories"][0] == "ApplyEyeMakeup" and len(bank["categories"]) == 5
    for key, rows in (("category_vectors", 5), ("description_vectors", len(bank["descriptions"])),
                      ("bridge_vectors", 1000)):
        assert bank[key].shape == (rows, 384)
        assert np.allclose(np.linalg.norm(bank[key], axis=1), 1, atol=1e-5)
    apply = bank["descriptions"].index("apply")
    assert bank["membership"][:, apply].tolist() == [1, 1, 0, 0, 0]  # shared by the two Apply* classes
    assert bank["membership"].sum(1).min() >= 1  # every class has a description
    ident = bank["text_encoder"]
    assert ident["name"] == "minilm" and ident == encoder_identity(text_encoder)
    # the space means something: a guitar video's name is nearer to the guitar class than to makeup
    probe = class_vectors(text_encoder, ["playing a guitar"])[0]
    assert np.argmax(bank["category_vectors"] @ probe) == 2


def test_bank_of_another_encoder_is_refused(concept_bank, text_encoder, tmp_path):
    other = dict(read_bank(concept_bank)["text_encoder"], weights_sha256="0" * 64)
    with pytest.raises(ConceptError, match="made with text encoder minilm .*rebuild it with `cli.py concepts`"):
        check_encoder(other, encoder_identity(text_encoder), "bank.h5")
    with h5py.File(tmp_path / "not_a_bank.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(ConceptError, match="not_a_bank.h5: not a vidistill concept bank"):
        read_bank(str(tmp_path / "not_a_bank.h5"))


@pytest.mark.slow
def test_concepts_command_writes_a_bank(tmp_path):
    (tmp_path / "classes.txt").write_text("ApplyEyeMakeup\nApplyLipstick\nArchery\n")
    out = tmp_path / "bank.h5"
    r = CliRunner().invoke(cli, ["concepts", "--classes", str(tmp_path / "classes.txt"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 categories and 5 descriptions (1 shared by several categories) in minilm's 384-d space" in r.output
    assert read_bank(str(out))["categories"] == ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
    r = CliRunner().invoke(cli, ["concepts", "--classes", "nope", "--out", str(out)])
    assert r.exit_code == 2 and "error: --classes nope: neither a built-in list" in r.output
