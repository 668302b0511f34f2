"""3D video students: torchvision's video ResNets, a width/depth-scaled 3D ResNet, heads.

Every student maps a clip [B, C, T, H, W] to a pooled feature [B, D] and exposes `feature_dim`;
heads live outside the backbone, so a distilled backbone is a plain feature extractor for eval.
"""
import torch
import torch.nn as nn
import torchvision

from models.efficientnet_lite import EfficientNetLite
from models.video_vit import PREFIX as VIT_PREFIX
from models.video_vit import VideoViT

# What every student sees: Kinetics statistics, as torchvision's video models use them.
VIDEO_MEAN = (0.43216, 0.394666, 0.37645)
VIDEO_STD = (0.22803, 0.22145, 0.216989)


def normalize_video(video_uint8):
    """[B,3,T,H,W] uint8 (on any device) -> float normalised input for a student."""
    mean = torch.tensor(VIDEO_MEAN, device=video_uint8.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(VIDEO_STD, device=video_uint8.device).view(1, 3, 1, 1, 1)
    return (video_uint8.float() / 255 - mean) / std

TORCHVISION_STUDENTS = ("r2plus1d_18", "r3d_18", "mc3_18")
SCALED_STUDENTS = {
    # name: (base width, blocks per stage). "r3d_cpu" trains at a useful speed on 2 CPU cores.
    "r3d_cpu": (16, (1, 1, 1, 1)),
    "r3d_10_half": (32, (1, 1, 1, 1)),
}
# the image teachers' topologies in 3D: efficientnet3d_liteN is EfficientNet-LiteN's twin
EFFICIENTNET_STUDENTS = ("efficientnet3d_lite0", "efficientnet3d_lite1", "efficientnet3d_lite2")
STUDENTS = TORCHVISION_STUDENTS + tuple(SCALED_STUDENTS) + EFFICIENTNET_STUDENTS


class _TorchvisionBackbone(nn.Module):
    """torchvision video ResNet (random init) with the classifier removed."""

    def __init__(self, arch):
        super().__init__()
        self.net = getattr(torchvision.models.video, arch)(weights=None)
        self.feature_dim = self.net.fc.in_features
        self.net.fc = nn.Identity()

    def forward(self, x):  # [B,3,T,H,W] -> [B,512]
        return self.net(x)


class BasicBlock3d(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm3d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet3d(nn.Module):
    """R3D with a base width and blocks per stage as knobs (R3D-18 is width 64, (2,2,2,2)).

    Also the MoDist motion pathway: in_channels=2 (flow), 1/8 width.
    """

    def __init__(self, width=64, blocks=(2, 2, 2, 2), in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, width, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
            nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            stride = 1 if i == 0 else 2
            stages += [BasicBlock3d(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1) for j in range(n)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.feature_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # [B,C,T,H,W] -> [B,feature_dim]
        return self.stages(self.stem(x)).mean(dim=(2, 3, 4))


class EfficientNet3dBackbone(nn.Module):
    """An EfficientNet-Lite teacher's topology in 3D, on student-normalised clips.

    Students take Kinetics-normalised input (normalize_video); the EfficientNet-Lite
    weights expect (x - 127) / 128 on 0..255. A fixed per-channel affine converts one into the other,
    so the inflated net sees exactly what the image teacher saw.
    """
    feature_dim = 1280

    def __init__(self, variant="efficientnet_lite0"):
        super().__init__()
        self.variant = variant
        self.net = EfficientNetLite(variant, video=True)
        # the ImageNet classifier is not part of the backbone (only logits() uses it): frozen, so
        # DDP does not wait for gradients it never gets
        self.net._fc.requires_grad_(False)
        mean, std = torch.tensor(VIDEO_MEAN), torch.tensor(VIDEO_STD)
        self.register_buffer("in_scale", (std * 255 / 128).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((mean * 255 - 127) / 128).view(1, 3, 1, 1, 1), persistent=False)

    def forward(self, x):  # [B,3,T,H,W] normalised -> [B,1280]
        return self.net.forward_features(x * self.in_scale + self.in_shift)

    def logits(self, x):  # ImageNet logits of the (inflated) classifier: [B,1000]
        return self.net.forward_head(self(x))


def build_student(arch):
    if arch in TORCHVISION_STUDENTS:
        return _TorchvisionBackbone(arch)
    if arch in SCALED_STUDENTS:
        width, blocks = SCALED_STUDENTS[arch]
        return ResNet3d(width, blocks)
    if arch in EFFICIENTNET_STUDENTS:
        return EfficientNet3dBackbone(arch.replace("3d", ""))
    if arch.startswith(VIT_PREFIX):  # vit3d:ARCH, a timm image ViT with divided space-time attention
        return VideoViT(arch[len(VIT_PREFIX):], VIDEO_MEAN, VIDEO_STD)
    raise ValueError(f"unknown student {arch!r}; choose from {', '.join(STUDENTS)} or {VIT_PREFIX}ARCH (a timm ViT)")


def channels_last(module):
    """NDHWC memory for every 5D weight (the 3D convolutions: oneDNN runs them 1.3-1.4x faster that way
    on CPU), in place; other weights (a ViT's 4D patch embedding) keep theirs. Returns the module."""
    for p in module.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return module


def build_motion_pathway(student_feature_dim=512):
    """MoDist's motion pathway: a small 3D ResNet on 2-channel flow at ~1/8 of the visual width.

    A ResNet's feature dim is 8x its base width, so 1/8 width is feature_dim / 64 (8 for R(2+1)D-18);
    never narrower than 8 channels, so for the small CPU students it is wider than 1/8.
    """
    return ResNet3d(width=max(8, student_feature_dim // 64), blocks=(1, 1, 1, 1), in_channels=2)


class HeadLinear(nn.Linear):
    """A head's linear layer, computed in fp32 even under bf16 autocast: a head's outputs are what the
    losses compare (logits over 1000 classes, embeddings), and bf16 keeps 8 bits of them; a head costs
    nothing next to the 3D network it sits on."""

    def forward(self, x):  # [B,D_in] -> [B,D_out] float32
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class ProjectionHead(nn.Module):
    """2-layer MLP to a 128-d L2-normalised embedding (MoCo v2 / MaCLR), in fp32 (HeadLinear)."""

    def __init__(self, dim_in, dim_hidden=None, dim_out=128):
        super().__init__()
        dim_hidden = dim_hidden or dim_in
        self.net = nn.Sequential(HeadLinear(dim_in, dim_hidden), nn.ReLU(inplace=True), HeadLinear(dim_hidden, dim_out))

    def forward(self, x):  # [B,D] -> [B,128], unit norm
        return nn.functional.normalize(self.net(x), dim=1)
