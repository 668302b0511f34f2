"""Colour augmentations (the MaCLR paper's settings), batched on the training device inside the step:
one draw per clip, the same for all its frames."""
import math

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _gray(x):  # [B,3,T,H,W] -> [B,1,T,H,W]
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue_rotation(turns):
    """[B,3,3] RGB matrices shifting hue by `turns` of the colour wheel: a rotation of the chroma plane
    in YIQ space (a linear stand-in for HSV's hue shift, so it composes with the other colour ops)."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=turns.device)
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    rot = torch.zeros(len(turns), 3, 3, device=turns.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur of every frame, one sigma [B] per clip."""
    b, c, t, h, w = x.shape
    r = int(math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, 2r+1]
    y = x.permute(2, 0, 1, 3, 4).reshape(t, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(t, b, c, h, w).permute(1, 2, 0, 3, 4)


def colour_augment(video, jitter=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0)):
    """MaCLR's colour augmentations on a batch of clips: colour jitter (brightness, contrast and
    saturation factors in [1-jitter, 1+jitter], then a hue shift in [-hue, hue]) with probability
    jitter_p, grayscale with grayscale_p, Gaussian blur (sigma in blur_sigma, pixels) with blur_p.
    One draw per clip, identical for all its frames (a per-frame draw would flicker, which flow would
    call motion). Jitter and grayscale are linear in RGB, so each clip's are composed into one affine
    colour map applied in a single pass and clamped once (torchvision clamps after every op; the two
    differ only where a channel saturates midway). Randomness from torch's generator on the clips'
    device, so a resumed run draws the same.

    video [B,3,T,H,W] uint8 or float on 0..255 -> float [B,3,T,H,W] on 0..255, in fp32 whatever --precision
    the networks run in (bf16 would round the colour maps to 3 digits).
    """
    with torch.autocast(video.device.type, enabled=False):
        x = video.float() / 255
        n, dev = len(x), x.device
        eye = torch.eye(3, device=dev).expand(n, 3, 3)
        gray = torch.tensor(_GRAY, device=dev)
        to_gray = torch.ones(3, 1, device=dev) * gray[None]  # [3,3]: every channel becomes the luma

        def factor(lo, hi):
            return torch.empty(n, 1, 1, device=dev).uniform_(lo, hi)
        b, c, s = factor(1 - jitter, 1 + jitter), factor(1 - jitter, 1 + jitter), factor(1 - jitter, 1 + jitter)
        clip_luma = x.mean(dim=(2, 3, 4)) @ gray  # [B]: contrast pulls towards the clip's mean grey
        # y = c * b * x + (1 - c) * b * luma, then saturation s (towards each pixel's grey), then hue
        mix = _hue_rotation(torch.empty(n, device=dev).uniform_(-hue, hue)) @ (s * eye + (1 - s) * to_gray)  # [B,3,3]
        matrix, offset = mix * (c * b), mix.sum(2, keepdim=True) * ((1 - c) * b * clip_luma.view(n, 1, 1))  # [B,3,1]
        on = torch.rand(n, device=dev) < jitter_p
        matrix, offset = torch.where(on.view(n, 1, 1), matrix, eye), torch.where(on.view(n, 1, 1), offset, 0.0)
        grayscale = (torch.rand(n, device=dev) < grayscale_p).view(n, 1, 1)
        matrix = torch.where(grayscale, to_gray @ matrix, matrix)
        offset = torch.where(grayscale, to_gray @ offset, offset)
        x = (torch.einsum("bij,bjthw->bithw", matrix, x) + offset.view(n, 3, 1, 1, 1)).clamp(0, 1)
        sigma, blur = torch.empty(n, device=dev).uniform_(*blur_sigma), torch.rand(n, device=dev) < blur_p
        if blur.any():  # blur only the clips drawn for it: the costliest of these steps
            x = x.clone()
            x[blur] = _gaussian_blur(x[blur], sigma[blur])
        return x * 255
