"""The networks of a table's student-side rows (the distilled student, scratch, inflate; into the
concept space for zero-shot) and their features over clips x crops views of each video."""
import numpy as np
import torch
import torch.nn as nn

from models.checkpoint import load_checkpoint, load_student
from models.inflate import inflate_student
from models.students import ProjectionHead, build_student, channels_last, normalize_video
from pipeline.common.config import INITS
from pipeline.common.errors import EvalError
from pipeline.common.precision import autocast, check_convolutions
from pipeline.common.progress import progress_bar
from pipeline.distill.clips import clip_span, load_clip, view_boxes, view_starts


def load_backbone(init, checkpoint=None, student="r3d_cpu", seed=0):
    """The network of one table row: the distilled student, or a baseline of the same architecture."""
    if init == "checkpoint":
        if not checkpoint:
            raise EvalError("--init checkpoint needs --checkpoint RUN/checkpoint.pt")
        return load_student(checkpoint)[0]
    torch.manual_seed(seed)
    if init == "scratch":  # with a checkpoint: the distilled row's architecture, random weights
        arch = load_checkpoint(checkpoint)["config"]["student"] if checkpoint else student
        return build_student(arch).eval()
    if init == "inflate":
        return inflate_student(build_student("efficientnet3d_lite0"), "efficientnet3d_lite0")[0].eval()
    raise EvalError(f"unknown --init {init!r}; choose from {', '.join(INITS)}")


@torch.no_grad()
def video_features(backbone, reader, ids, pre, clips, crops, device, batch_size, progress, desc, precision="fp32"):
    """[N, clips*crops, D] float32 features, one row of views per video; the network runs at `precision`."""
    layout = torch.channels_last_3d  # oneDNN's 3D convolutions run faster channels-last (as in distill)
    backbone = channels_last(backbone.to(device)).eval()
    if precision == "bf16":
        check_convolutions(backbone)  # grouped convolutions run in fp32 on CPU, where that is faster
    span = clip_span(pre.clip_len, pre.stride)
    boxes = view_boxes(pre.height, pre.width, crops)
    per_video = clips * crops
    group = max(1, batch_size // per_video)  # the views of several videos go through the network together
    feats, bar = [], progress_bar(total=len(ids), desc=desc, unit="video", disable=not progress)
    for first in range(0, len(ids), group):
        views = [load_clip(reader, vid, int(s), pre.clip_len, pre.stride, box, False, pre.crop, False)[0]
                 for vid in ids[first:first + group]
                 for s in view_starts(reader.num_frames(vid), clips, span) for box in boxes]
        video = torch.stack(views).to(device)  # [G*V,3,T,S,S]
        with autocast(precision, device):
            out = torch.cat([backbone(normalize_video(video[i:i + batch_size]).contiguous(memory_format=layout))
                             for i in range(0, len(video), batch_size)])
        feats += list(out.float().cpu().numpy().reshape(-1, per_video, out.shape[-1]))
        bar.update(len(views) // per_video)
    bar.close()
    return np.stack(feats) if feats else np.zeros((0, per_video, 0), np.float32)


def view_times(n_frames, pre, clips, crops):
    """[clips*crops, 2] (start, end) seconds of each view of a video, in the order of video_features."""
    span = clip_span(pre.clip_len, pre.stride)
    return np.array([(s / pre.fps, min(s + span, n_frames) / pre.fps)
                     for s in view_starts(n_frames, clips, span) for _ in range(crops)], np.float32)


class BridgeHead(nn.Module):
    """A student's ImageNet head into the text space: its probabilities times the class names' text
    embeddings (the bridge LSS uses for the image-only teacher)."""

    def __init__(self, fc, bridge):
        super().__init__()
        self.fc = fc
        self.register_buffer("bridge", torch.as_tensor(bridge, dtype=torch.float32))

    def forward(self, x):  # [B,D_feat] -> [B,D_text], unit norm
        return nn.functional.normalize(torch.softmax(self.fc(x), -1) @ self.bridge, dim=-1)


def concept_head_of(init, cfg, weights=None):
    """Which head takes the row into the concept space: "concept" (an lss student's), "bridge" (a
    student's ImageNet head, through the bridge), "random" (scratch), or None (no text space: inflate,
    a modist-only student). weights: the checkpoint's model state, when already loaded."""
    if init == "scratch":
        return "random"
    if init != "checkpoint":
        return None
    weights = weights or load_checkpoint(cfg.checkpoint)["model"]
    return "concept" if "concept_head.net.0.weight" in weights else "bridge" if "distill_head.weight" in weights else None


def concept_model(init, cfg, space):
    """The row's network into the concept space: the lss student's concept head; a student without
    one through its distillation head and the bridge; scratch with a random head of that shape."""
    weights = load_checkpoint(cfg.checkpoint)["model"] if init == "checkpoint" else {}
    kind = concept_head_of(init, cfg, weights)
    if kind is None:
        raise EvalError(f"zeroshot: the {init} row has no concept space")
    backbone = load_backbone(init, cfg.checkpoint, cfg.student, cfg.seed)
    d, dim = backbone.feature_dim, space["bridge"].shape[1]
    if kind == "random":
        return nn.Sequential(backbone, ProjectionHead(d, dim_out=dim)).eval()  # seeded by load_backbone

    def state(prefix):
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if kind == "concept":
        head = ProjectionHead(d, dim_out=weights["concept_head.net.2.weight"].shape[0])
        head.load_state_dict(state("concept_head."))
    else:
        head = BridgeHead(nn.Linear(d, weights["distill_head.weight"].shape[0]), space["bridge"])
        head.fc.load_state_dict(state("distill_head."))
    return nn.Sequential(backbone, head).eval()
