"""`cli.py concepts`: the concept bank of LSS, embedded once, before training.

A bank holds two sets of concepts in a text encoder's space, as fixed unit vectors:
- categories: action names through prompt templates, the templates' embeddings averaged;
- descriptions: short phrases about each action (objects, body motion, scene), with the
  category -> description membership.
It also holds the bridge of the ImageNet teacher into that space: the text embeddings of its 1000
class names, so stage two turns the cached teacher logits into a concept-space vector (probabilities
times these rows) without loading the teacher or the text encoder.

The paper writes descriptions with a large language model. A user may pass such a file
(`{class: [descriptions]}`); without one, the built-in descriptions are the content words of each
class name ("ApplyEyeMakeup" -> "eye", "makeup"), a description shared by every class that names it.
"""
import datetime
import json
import os
import re

import h5py
import numpy as np

from cache.fingerprint import sha256_file
from models.clip import IMAGENET_TEMPLATE as BRIDGE_TEMPLATE  # the prompt CLIP's own ImageNet classifier uses
from models.imagenet import class_names
from pipeline.common.errors import ConceptError

# CLIP's video prompts (its Kinetics-700 templates, shortened): averaging several keeps one phrasing's
# quirks out of the class vector
TEMPLATES = ("a video of a person {}.", "a video of {}.", "a photo of a person {}.", "an example of {}.",
             "a demonstration of {}.")
DESCRIPTION_TEMPLATE = "a video showing {}."
BUILTIN_CLASSES = ("k400", "ucf101", "hmdb51", "imagenet")
STOP_WORDS = {"a", "an", "the", "of", "on", "in", "at", "to", "with", "and", "or", "up", "out", "off", "from",
              "into", "onto", "by", "for", "something", "someone", "doing", "using", "person", "s"}
BANK_FORMAT = 1




def words_of(name):
    """A class name as words: 'ApplyEyeMakeup' -> 'apply eye makeup', 'potted_plant' -> 'potted plant',
    'YoYo' -> 'yo yo', 'playing_guitar' -> 'playing guitar'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return " ".join(re.sub(r"[_\-/]+", " ", spaced).lower().split())


def class_list(source):
    """Class names of a built-in list (k400, ucf101, hmdb51, imagenet) or of a file, one per line."""
    if source == "k400":
        import torchvision  # the names ship in torchvision's weights metadata: nothing downloads
        return list(torchvision.models.video.R2Plus1D_18_Weights.KINETICS400_V1.meta["categories"])
    if source == "imagenet":
        return class_names()
    if source in ("ucf101", "hmdb51"):
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classlists", f"{source}.txt")
    elif not os.path.isfile(source):
        raise ConceptError(f"--classes {source}: neither a built-in list ({', '.join(BUILTIN_CLASSES)}) nor a file")
    with open(source) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ConceptError(f"{source}: no class names in it")
    if len(set(names)) != len(names):
        raise ConceptError(f"{source}: a class name appears twice")
    return names


def builtin_descriptions(classes):
    """{class: [its content words]}: the stand-in for LLM-written descriptions."""
    return {c: [w for w in dict.fromkeys(words_of(c).split()) if w not in STOP_WORDS and len(w) > 1] or [words_of(c)]
            for c in classes}


def read_descriptions(path, classes):
    try:
        with open(path) as f:
            given = json.load(f)
    except (OSError, ValueError) as e:
        raise ConceptError(f"{path}: not a readable JSON file of {{class: [descriptions]}} ({e})") from None
    if not isinstance(given, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                              for v in given.values()):
        raise ConceptError(f"{path}: must map each class name to a list of description strings")
    missing = [c for c in classes if not given.get(c)]
    if missing:
        raise ConceptError(f"{path}: no descriptions for {len(missing)} class(es), e.g. {missing[0]!r}")
    return {c: list(dict.fromkeys(given[c])) for c in classes}


def class_vectors(encoder, classes, templates=TEMPLATES):
    """[C, D] unit vectors: each class's words through every template, the embeddings averaged."""
    prompts = [t.format(words_of(c)) for c in classes for t in templates]
    vectors = encoder.encode(prompts).reshape(len(classes), len(templates), -1).mean(1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bridge_vectors(encoder):
    """[1000, D] unit vectors: the ImageNet teacher's class names in the text space."""
    return class_vectors(encoder, class_list("imagenet"), (BRIDGE_TEMPLATE,))


def build_bank(encoder, classes, descriptions):
    texts = list(dict.fromkeys(d for c in classes for d in descriptions[c]))
    membership = np.zeros((len(classes), len(texts)), np.float32)  # [C, A]: 1 where class c has description a
    for i, c in enumerate(classes):
        membership[i, [texts.index(d) for d in descriptions[c]]] = 1
    return {"categories": classes, "category_vectors": class_vectors(encoder, classes),
            "descriptions": texts, "description_vectors": encoder.encode([DESCRIPTION_TEMPLATE.format(d) for d in texts]),
            "membership": membership, "bridge_vectors": bridge_vectors(encoder)}


def encoder_identity(encoder):
    """Which text space: name and weights' sha256 decide it; `load` says how to load it again."""
    return {"name": encoder.name, "model": encoder.description, "weights_sha256": sha256_file(encoder.weights_path),
            "dim": encoder.dim, "load": encoder.load}


def write_bank(path, bank, identity, config):
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        for key in ("categories", "descriptions"):
            f.create_dataset(key, data=np.array(bank[key], dtype=h5py.string_dtype()))
        for key in ("category_vectors", "description_vectors", "membership", "bridge_vectors"):
            f.create_dataset(key, data=bank[key].astype(np.float32))
        f.attrs["format"] = BANK_FORMAT
        f.attrs["text_encoder"] = json.dumps(identity)
        f.attrs["templates"] = json.dumps(TEMPLATES)
        f.attrs["config"] = json.dumps(config)
        f.attrs["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.replace(tmp, path)  # a killed run leaves no half-written bank behind


def read_bank(path):
    """The bank as {key: array or list} plus its "text_encoder" identity."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != BANK_FORMAT:
                raise ConceptError(f"{path}: not a vidistill concept bank (format {f.attrs.get('format')!r}); "
                                   f"make one with `cli.py concepts`")
            bank = {k: [s.decode() if isinstance(s, bytes) else s for s in f[k][()]] for k in ("categories", "descriptions")}
            bank.update({k: f[k][()] for k in ("category_vectors", "description_vectors", "membership", "bridge_vectors")})
            bank["text_encoder"] = json.loads(f.attrs["text_encoder"])
    except OSError as e:
        raise ConceptError(f"{path}: cannot read the concept bank ({e})") from None
    return bank


def check_encoder(bank_identity, got, where):
    """Refuse a text space other than the bank's (got: the encoder's identity): vectors of two
    encoders are not comparable."""
    if got["name"] != bank_identity["name"] or got["weights_sha256"] != bank_identity["weights_sha256"]:
        raise ConceptError(f"{where}: made with text encoder {bank_identity['name']} "
                           f"(weights {bank_identity['weights_sha256'][:12]}), but this is {got['name']} "
                           f"(weights {got['weights_sha256'][:12]}); rebuild it with `cli.py concepts`")


def run_concepts(cfg):
    """The whole of `cli.py concepts`. Returns a summary dict."""
    from models.text import load_text_encoder
    classes = class_list(cfg.classes)
    descriptions = read_descriptions(cfg.descriptions, classes) if cfg.descriptions else builtin_descriptions(classes)
    try:
        encoder = load_text_encoder(cfg.text_encoder, cfg.text_weights, cfg.text_pretrained)
    except ValueError as e:
        raise ConceptError(str(e)) from None
    bank = build_bank(encoder, classes, descriptions)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    write_bank(cfg.out, bank, encoder_identity(encoder), dict(vars(cfg)))
    return {"out": cfg.out, "categories": len(classes), "descriptions": len(bank["descriptions"]),
            "dim": encoder.dim, "text_encoder": encoder.name,
            "shared": int((bank["membership"].sum(0) > 1).sum())}
