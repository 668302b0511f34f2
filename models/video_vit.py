"""A timm image ViT made temporal with divided space-time attention (TimeSformer, Bertasius et al. 2021).

Every frame's patches go through the image ViT as they would for a picture (patch embedding, class
token and position embedding, its blocks), and before each block a temporal attention lets each
token attend to the same token in the other frames. The temporal attention's output projection and a
learnt time embedding start at zero, so the temporal part starts as the identity: on a clip of one
repeated frame the student gives the image ViT's features for that frame, and inflation is just loading
the image ViT's weights (`--init inflate --init-weights vit.pth`, a timm state dict of that
architecture). The clip's feature is the mean of its frames' pooled features.

Student name: `vit3d:ARCH` with ARCH a timm ViT (e.g. vit3d:vit_small_patch16_224). timm builds it
without weights (nothing downloads); positions are interpolated to the clip's size (dynamic_img_size).
"""
import torch
import torch.nn as nn

PREFIX = "vit3d:"
MAX_FRAMES = 64  # time embeddings held; clips are 8-16 frames


class TemporalAttention(nn.Module):
    """Pre-norm multi-head attention across frames at each token position, residual, its output
    projection zero at the start (the identity)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, tokens, frames):  # [B*T, N, D] -> [B*T, N, D]
        bt, n, d = tokens.shape
        x = tokens.view(bt // frames, frames, n, d).transpose(1, 2).reshape(-1, frames, d)  # [B*N, T, D]
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x.view(bt // frames, n, frames, d).transpose(1, 2).reshape(bt, n, d)


class VideoViT(nn.Module):
    """`vit3d:ARCH`: clips [B,3,T,H,W] (Kinetics-normalised, as every student) -> [B, embed_dim]."""

    def __init__(self, arch, video_mean, video_std):
        super().__init__()
        import timm  # a requirement; imported when a ViT student is built
        try:
            self.image = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
        except Exception as e:  # an unknown or non-ViT timm name
            raise ValueError(f"student {PREFIX}{arch}: timm cannot build it as a ViT ({str(e)[:120]})") from None
        if not hasattr(self.image, "blocks") or not hasattr(self.image, "patch_embed"):
            raise ValueError(f"student {PREFIX}{arch}: not a timm VisionTransformer")
        self.arch = arch
        dim, heads = self.image.embed_dim, self.image.blocks[0].attn.num_heads
        self.temporal = nn.ModuleList(TemporalAttention(dim, heads) for _ in self.image.blocks)
        self.time_embed = nn.Parameter(torch.zeros(1, MAX_FRAMES, 1, dim))
        self.feature_dim = dim
        # students take Kinetics-normalised input (video_mean, video_std); the ViT expects its own statistics
        # (ImageNet's, CLIP's, or 0.5): a fixed per-channel affine converts one into the other
        mean = torch.tensor(self.image.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
        std = torch.tensor(self.image.pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
        self.register_buffer("in_scale", (torch.tensor(video_std) / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((torch.tensor(video_mean) - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):  # [B,3,T,H,W] -> [B,D]
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w) * self.in_scale + self.in_shift
        vit = self.image
        tokens = vit._pos_embed(vit.patch_embed(frames))  # [B*T, N, D] with the class token
        tokens = tokens + self.time_embed[:, :t].expand(b, t, 1, -1).reshape(b * t, 1, -1)
        tokens = vit.norm_pre(tokens)
        for temporal, block in zip(self.temporal, vit.blocks):
            tokens = block(temporal(tokens, t))
        return vit.forward_head(vit.norm(tokens), pre_logits=True).view(b, t, -1).mean(1)
