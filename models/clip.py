"""CLIP through open_clip: a text-aligned image teacher and the text tower of the same model.

`clip:ARCH` names an open_clip architecture (`clip:ViT-B-32`) or a model-config JSON file in open_clip's
format (`clip:path/to/model.json`, registered under the file's stem). The weights come from a local
file (an open_clip or OpenAI checkpoint), or, only when asked for by tag, from the model hub: offline,
that request fails at once with one line instead of retrying for a minute.
"""
import dataclasses
import os
import socket
import urllib.parse

import torch
from torch import nn

from models.imagenet import class_names

IMAGENET_TEMPLATE = "a photo of a {}."  # the teacher's classes are things in photos (CLIP's own prompt)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default normalisation


def parse_spec(spec):
    """'clip:ViT-B-32' -> ('ViT-B-32', None); 'clip:cfg/tiny.json' -> ('tiny', its absolute path)."""
    arch = spec.split(":", 1)[1] if spec.startswith("clip:") else ""
    if not arch:
        raise ValueError(f"{spec!r}: a CLIP model is named clip:ARCH (an open_clip architecture, e.g. clip:ViT-B-32) "
                         "or clip:CONFIG.json")
    if arch.endswith(".json"):
        path = os.path.abspath(arch)
        if not os.path.isfile(path):
            raise ValueError(f"{spec}: model config file not found: {path}")
        return os.path.splitext(os.path.basename(path))[0], path
    return arch, None


def absolute_spec(spec):
    """The spec with a model-config path made absolute: recorded in caches, it must load from any
    working directory."""
    _, config_path = parse_spec(spec)
    return f"clip:{config_path}" if config_path else spec


def hub_reachable(url, timeout=3.0):
    host = urllib.parse.urlparse(url).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(spec, tag):
    """(spec, local weights file) of a hub tag, downloading the weights into the hub's cache if needed.
    The spec becomes the architecture the tag was trained as (OpenAI's weights: its -quickgelu
    variant), so the file alone loads the same model again later (eval, a concept bank)."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg
    arch, _ = parse_spec(spec)
    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(f"clip:{arch} has no pretrained weights tagged {tag!r}; tags: {', '.join(tags) or 'none'}")
    if cfg.get("quick_gelu") and not arch.endswith("-quickgelu"):
        arch += "-quickgelu"
    preprocess = (open_clip.get_model_config(arch) or {}).get("preprocess_cfg", {})
    if tuple(cfg.get("mean", OPENAI_MEAN)) != tuple(preprocess.get("mean", OPENAI_MEAN)):
        raise ValueError(f"clip:{arch} --pretrained {tag}: its normalisation (mean {cfg.get('mean')}) is not the "
                         "architecture's; download the weights and pass a model config with that preprocess_cfg "
                         "as clip:CONFIG.json with --teacher-weights / --text-weights")
    # where download_pretrained will go: the hub when the tag has a hub copy (it prefers it), else its url
    url = f"https://huggingface.co/{cfg['hf_hub']}" if cfg.get("hf_hub") else cfg.get("url", "")
    if not hub_reachable(url):
        raise ValueError(f"clip:{arch} --pretrained {tag}: cannot reach {urllib.parse.urlparse(url).hostname} "
                         "(offline?); pass a local checkpoint file instead (--teacher-weights / --text-weights)")
    try:
        return f"clip:{arch}", download_pretrained(cfg)
    except Exception as e:  # the hub's own errors (HTTP, disk): one line
        raise ValueError(f"clip:{arch} --pretrained {tag}: download failed ({' '.join(str(e).split())[:160]})") from None


@dataclasses.dataclass
class LoadedClip:
    model: nn.Module  # in eval mode, no gradients
    tokenizer: object
    arch: str  # the open_clip architecture name
    weights: str  # the local weights file
    config: dict  # the architecture's config
    spec: str  # how to load it again from any folder, without the network: clip:<arch or absolute config path>


def load_clip(spec, weights=None, pretrained=None):
    """A CLIP model from a local weights file or (resolved to one first) a hub tag."""
    import open_clip
    if pretrained is not None:
        if weights is not None:
            raise ValueError(f"{spec} takes a weights file or a hub tag, not both")
        spec, weights = resolve_pretrained(spec, pretrained)
    arch, config_path = parse_spec(spec)
    if config_path:
        open_clip.add_model_config(config_path)
    if arch not in open_clip.list_models():
        raise ValueError(f"{spec}: unknown open_clip architecture {arch!r} (see open_clip.list_models(), "
                         "or pass a model config as clip:FILE.json)")
    if weights is None:
        raise ValueError(f"{spec} needs its weights: a local file (--teacher-weights / --text-weights FILE) "
                         "or a hub tag (--teacher-pretrained / --text-pretrained TAG, needs the network)")
    path = os.path.abspath(os.fspath(weights))
    if not os.path.isfile(path):
        raise ValueError(f"CLIP weights file not found: {path}")
    try:
        model = open_clip.create_model(arch, pretrained=path, device="cpu")
    except Exception as e:  # not a checkpoint, or another architecture's
        raise ValueError(f"CLIP weights {path} do not load into {arch}: {' '.join(str(e).split())[:160]}") from None
    return LoadedClip(model.eval().requires_grad_(False), open_clip.get_tokenizer(arch), arch, path,
                      open_clip.get_model_config(arch), f"clip:{config_path or arch}")


@torch.no_grad()
def encode_text(model, tokenizer, texts, batch_size=256):
    """list of str -> float32 [N, D] unit rows in the joint space."""
    device = next(model.parameters()).device
    out = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float()
           for i in range(0, len(texts), batch_size)]
    return nn.functional.normalize(torch.cat(out), dim=-1).cpu()


class ClipTeacherNet(nn.Module):
    """Image tower as a teacher: float RGB 0..255 [N,3,H,W] -> (logits [N,1000], embedding [N,D]).

    The embedding is the unit joint-space vector (what LSS and zero-shot compare with text); the logits
    are CLIP's zero-shot ImageNet classifier, logit_scale x cosine to each class name's prompt, so
    DistInit distils from a CLIP cache exactly as from the ImageNet teacher."""
    num_classes = 1000
    normalisation = "CLIP mean/std on 0..1 RGB"
    eval_crop = 1.0  # CLIP's transform: the short side resized to the input size, then its centre square

    def __init__(self, clip):
        super().__init__()
        model, tokenizer = clip.model, clip.tokenizer
        self.visual, self.arch, self.config = model.visual, clip.arch, clip.config
        size = model.visual.image_size
        self.input_size = size if isinstance(size, int) else size[0]
        self.logit_scale = float(model.logit_scale.exp())
        prompts = [IMAGENET_TEMPLATE.format(n) for n in class_names()]
        # the text side of the classifier, embedded once here: stage one never runs the text tower again
        self.register_buffer("class_text", encode_text(model, tokenizer, prompts))  # [1000, D]
        self.embed_dim = self.class_text.shape[1]
        mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def identity(self):
        """What changes the outputs besides the weights' content: part of the cache fingerprint."""
        return {"architecture": self.config, "logit_scale": round(self.logit_scale, 4), "space": "clip joint",
                "classifier": f"zero-shot {IMAGENET_TEMPLATE!r} over the ImageNet-1k names"}

    def forward(self, x):
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:  # a ViT's positions fix its size
            x = nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", antialias=True)
        embed = nn.functional.normalize(self.visual((x - self.mean) / self.std).float(), dim=-1)
        return self.logit_scale * embed @ self.class_text.T, embed
