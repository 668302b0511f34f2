"""`cli.py export`: the distilled backbone out of vidistill, checked against the original.

Formats:
  torchvision  a plain state dict. For torchvision students (r2plus1d_18, r3d_18, mc3_18) it is the
               stock `torchvision.models.video.<arch>` state dict, fc included, loadable with
               strict=True (mmaction2, pytorchvideo or a user's own script can fine-tune it). The
               fc is the distillation head (`fc="head"`: 1000 ImageNet classes, the student's
               estimate of the teacher's logits) or the stock 400-way layer as freshly initialised
               (`fc="init"`: untrained, to be replaced). For the other students (r3d_cpu, r3d_10_half,
               efficientnet3d_lite0) it is the backbone's state dict plus the lines that build the
               module from vidistill's models/ package (which needs only torch and torchvision).
  torchscript  torch.jit.script; torch.jit.trace for EfficientNet3d (its TF-style padding is not
               scriptable, and is traced for the crop size): batch and time free.
  onnx         the TorchScript-based exporter (dynamo=False: it needs no onnxscript, and these
               networks have no data-dependent control flow that the dynamo exporter would handle
               better), batch and time axes dynamic.

Every export is written under a temporary name, loaded back the way a user would load it (the
printed build lines are executed for the torchvision format; torch.jit.load; onnxruntime), run on the
same clips as the original (two real clips at the training length and one twice as long, cut from
the checkpoint's cache as evaluation cuts them), and only kept when the largest difference is within
`tolerance` of the largest output magnitude (1e-3 by default). For scale, the original's own float32
rounding (its distance from the same network in float64) is measured and reported beside it: ~2e-7 for
the ResNets, ~1e-4 for EfficientNet3d, whose ReLU6 activations reach 6.
"""
import contextlib
import json
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torchvision

from cache.fingerprint import teacher_array
from models.checkpoint import CheckpointError, load_student
from models.students import (
    TORCHVISION_STUDENTS,
    VIDEO_MEAN,
    VIDEO_STD,
    EfficientNet3dBackbone,
    normalize_video,
)
from models.video_vit import VideoViT
from pipeline.common.config import EXPORT_FC, EXPORT_FORMATS
from pipeline.common.errors import ExportError
from pipeline.common.runs import checkpoint_path, latest_run
from pipeline.distill.clips import clip_span, load_clip, view_boxes, view_starts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: models/ lives here
EXTENSIONS = {"torchvision": ".pt", "torchscript": ".pt", "onnx": ".onnx"}




def run_export(cfg):
    """The whole of `cli.py export`. Returns a summary dict (out, contract, check, build lines, notes)."""
    if cfg.format not in EXPORT_FORMATS:
        raise ExportError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {cfg.format!r}")
    if cfg.fc not in EXPORT_FC and not cfg.fc.startswith("head:"):
        raise ExportError(f"--fc must be one of {', '.join(EXPORT_FC)} or head:TEACHER, not {cfg.fc!r}")
    path = _checkpoint(cfg.checkpoint)
    try:
        backbone, ckpt = load_student(path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    arch = ckpt["config"]["student"]
    if cfg.format == "onnx" and isinstance(backbone, VideoViT):
        raise ExportError(f"{path}: a {arch} student does not export to ONNX (timm resamples its position embeddings "
                          "with antialiased bicubic interpolation, which ONNX has no operator for); use --format "
                          "torchscript or torchvision")
    out = cfg.out or os.path.join(os.path.dirname(path), f"{arch}-{cfg.format}{EXTENSIONS[cfg.format]}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    notes = []
    clips, long_clip = check_clips(ckpt, notes)
    stem, ext = os.path.splitext(out)
    tmp = f"{stem}.{os.getpid()}.tmp{ext}"  # onnxruntime and users look at the extension
    try:
        with torch.no_grad():
            if cfg.format == "torchvision":
                check, build = _torchvision(backbone, ckpt, cfg.fc, tmp, out, clips, notes)
            elif cfg.format == "torchscript":
                check, build = _torchscript(backbone, tmp, out, clips, long_clip, notes)
            else:
                check, build = _onnx(backbone, tmp, out, clips, long_clip, cfg.opset, notes)
            rounding = float32_rounding(backbone, clips)
        worst = max(check.values())
        if not worst <= cfg.tolerance:
            raise ExportError(f"the {cfg.format} export does not reproduce the checkpoint: largest difference "
                              f"{worst:.2e} of the output's scale (tolerance {cfg.tolerance:g}; the original's own "
                              f"float32 rounding is {rounding:.1e}); nothing written")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    contract = input_contract(ckpt, path, cfg.format, arch)
    summary = {"out": out, "format": cfg.format, "student": arch, "checkpoint": path, "contract": contract,
               "check": check, "tolerance": cfg.tolerance, "float32_rounding": rounding, "build": build, "notes": notes}
    with open(out + ".json", "w") as f:  # the contract travels with the file
        json.dump(summary, f, indent=2)
    return summary


def _checkpoint(given):
    if given is None:
        if not latest_run():
            raise ExportError("no --checkpoint and no runs/latest; pass RUN/checkpoint.pt or RUN/")
        given = latest_run()
    path = checkpoint_path(given)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: checkpoint not found")
    return path


# ---- the clips every export is checked on ------------------------------------------------------

def check_clips(ckpt, notes):
    """(two clips [2,3,T,S,S], one clip twice as long [1,3,2T,S,S]), normalised as the student sees them.

    Cut from the checkpoint's own cache as evaluation cuts them (centre square, uniformly spaced
    starts); a generated moving texture when that cache is not where the checkpoint says.
    """
    cfg = ckpt["config"]
    t, stride, crop = cfg["clip_len"], cfg["stride"], cfg["crop"]
    try:
        clips, long, picks = _cache_clips(cfg["cache"], t, stride, crop)
    except Exception as e:  # missing, moved or damaged: the check still needs a clip
        notes.append(f"checked on a generated moving texture: the run's cache {cfg['cache']!r} is not readable "
                     f"here ({type(e).__name__}: {str(e)[:80]})")
        return normalize_video(_texture_clip(2, t, crop)), normalize_video(_texture_clip(1, 2 * t, crop, seed=2))
    notes.append(f"checked on clips of {picks[0][0]!r}" + (f" and {picks[1][0]!r}" if picks[1][0] != picks[0][0] else "")
                 + f" from {cfg['cache']}")
    return normalize_video(clips), normalize_video(long)


def _cache_clips(cache, t, stride, crop):
    """Two evaluation views (two videos when there are two, else two places in one) and one of twice
    the length, uint8, with the (id, start) of the two."""
    from cache.reader import CacheReader
    reader = CacheReader(cache)
    if not reader.ids:
        raise ValueError("no readable videos")
    h, w = reader.frame_size
    box = view_boxes(h, w, 1)[0]
    picks = [(v, s) for v in reader.ids[:2] for s in view_starts(reader.num_frames(v), 2, clip_span(t, stride))]
    picks = [picks[0], picks[-1]]
    clips = torch.stack([load_clip(reader, v, int(s), t, stride, box, False, crop, False)[0] for v, s in picks])
    long = load_clip(reader, picks[0][0], 0, 2 * t, stride, box, False, crop, False)[0][None]
    return clips, long, picks


def _texture_clip(b, t, size, seed=1):
    """uint8 [b,3,t,size,size]: smooth noise translating by 2 px a frame (real structure, real motion)."""
    rng = np.random.default_rng(seed)
    big = torch.from_numpy(rng.random((b, 3, size // 8 + 8, (size + 2 * t) // 8 + 8)).astype(np.float32))
    big = nn.functional.interpolate(big, scale_factor=8, mode="bicubic", align_corners=False).clamp(0, 1)
    frames = [big[:, :, :size, 2 * i:2 * i + size] for i in range(t)]
    return (torch.stack(frames, 2) * 255).round().to(torch.uint8)


def relative_error(got, ref):
    """max |got - ref| over max |ref|: the tolerance is a share of the output's scale."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def float32_rounding(backbone, clips):
    """How far the original itself is from its float64 twin on the clips, in the same measure: the
    scale below which an export's difference is rounding, not a mistake. One clip: float64 is slow."""
    ref = backbone(clips[:1])
    exact = backbone.double()(clips[:1].double())
    backbone.float()
    return relative_error(ref, exact)


# ---- the three formats ---------------------------------------------------------------------------

def _torchvision(backbone, ckpt, fc, tmp, out, clips, notes):
    arch = ckpt["config"]["student"]
    if arch not in TORCHVISION_STUDENTS:
        if fc != "auto":
            notes.append(f"--fc {fc} ignored: {arch} is not a torchvision network and has no fc")
        torch.save(backbone.state_dict(), tmp)
        ns = _run_lines(build_lines(arch, tmp))
        check = {"features": relative_error(ns["net"](clips), backbone(clips))}
        return check, build_lines(arch, out)
    state = {k[len("net."):]: v for k, v in backbone.state_dict().items()}
    teacher, head = distillation_head(ckpt, fc)
    if fc.startswith("head") and not head:
        raise ExportError(f"this run ({ckpt['config']['objective']}) has no distillation head; use --fc init")
    use_head = bool(head) and fc != "init"
    if use_head:
        layer = nn.Linear(backbone.feature_dim, head["weight"].shape[0])
        layer.load_state_dict(head)
        notes.append(f"fc = the distillation head of teacher {teacher}: {layer.out_features} outputs, the student's "
                     f"estimate of that teacher's logits (class i is its class i); trained so that "
                     f"softmax(fc/{ckpt['config']['tau']:g}) matches the teacher's. Replace it to fine-tune on "
                     f"other classes")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            layer = getattr(torchvision.models.video, arch)(weights=None).fc
        notes.append(f"fc = the stock {layer.out_features}-way layer as torchvision initialises it (seed 0): "
                     f"UNTRAINED, it only makes the file load with strict=True; replace it "
                     f"(net.fc = torch.nn.Linear({backbone.feature_dim}, num_classes)) before fine-tuning")
    state.update({f"fc.{k}": v for k, v in layer.state_dict().items()})
    torch.save(state, tmp)
    ns = _run_lines(build_lines(arch, tmp, layer.out_features if use_head else None))
    net = ns["net"]
    check = {"fc outputs": relative_error(net(clips), layer(backbone(clips)))}
    net.fc = nn.Identity()
    check["features"] = relative_error(net(clips), backbone(clips))
    return check, build_lines(arch, out, layer.out_features if use_head else None)


def distillation_head(ckpt, fc):
    """(teacher name, the state dict of its head) that --fc picks: head:NAME names the teacher (a run of
    several has one head each), otherwise the first the run distilled from; (None, {}) without one."""
    teachers = ckpt.get("teachers") or [{"slot": 0, "name": (ckpt.get("teacher") or {}).get("name")}]
    if fc.startswith("head:"):
        chosen = [t for t in teachers if t["name"] == fc[len("head:"):]]
        if not chosen:
            raise ExportError(f"--fc {fc}: this run distilled from {', '.join(str(t['name']) for t in teachers) or 'no teacher'}")
        teachers = chosen
    prefix = f"{teacher_array('distill_head', teachers[0]['slot'])}." if teachers else "-"
    return teachers[0]["name"] if teachers else None, \
        {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def build_lines(arch, path, num_classes=None):
    """The Python lines that build the exported module from a torchvision-format file (printed, and
    executed by the check, so they are known to work)."""
    load = f"net.load_state_dict(torch.load({os.path.abspath(path)!r}, weights_only=True), strict=True)"
    if arch in TORCHVISION_STUDENTS:
        classes = f"num_classes={num_classes}" if num_classes else ""
        return ["import torch, torchvision",
                f"net = torchvision.models.video.{arch}({classes})", load, "net.eval()",
                "# the distilled features vidistill's eval uses: net.fc = torch.nn.Identity()  -> [B, 512]"]
    return ["import sys, torch",
            f"sys.path.insert(0, {REPO!r})  # vidistill's models/ (needs only torch, torchvision and, for vit3d, timm)",
            "from models.students import build_student", f"net = build_student({arch!r})",
            load, "net.eval()  # net(video) -> [B, feature_dim] features"]


def _run_lines(lines):
    ns = {}
    exec("\n".join(lines), ns)  # noqa: S102 - our own generated lines, executed to prove they work
    return ns


def _torchscript(backbone, tmp, out, clips, long_clip, notes):
    with warnings.catch_warnings():  # torch marks TorchScript deprecated; it still loads in Python and libtorch
        warnings.simplefilter("ignore", FutureWarning)
        # EfficientNet3d's TF-style padding and timm's ViT are not scriptable: traced
        if isinstance(backbone, (EfficientNet3dBackbone, VideoViT)):
            with _quiet_tracer():
                module = torch.jit.trace(backbone, clips[:1])
            how = (f"traced at {clips.shape[-2]}x{clips.shape[-1]}: any batch and length; frames must be "
                   f"{clips.shape[-2]}x{clips.shape[-1]} (the padding was computed for that size)")
        else:
            module = torch.jit.script(backbone)
            how = "scripted: any batch, length and frame size"
        module.save(tmp)
        loaded = torch.jit.load(tmp)
    notes.append(f"TorchScript {how}")
    check = {"clips": relative_error(loaded(clips), backbone(clips)),
             f"{long_clip.shape[2]}-frame clip": relative_error(loaded(long_clip), backbone(long_clip))}
    return check, ["import torch", f"net = torch.jit.load({os.path.abspath(out)!r})  # net(video) -> [B, feature_dim]"]


def _onnx(backbone, tmp, out, clips, long_clip, opset, notes):
    import onnx
    import onnxruntime as ort
    with warnings.catch_warnings(), _quiet_tracer():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter is legacy, and enough
        torch.onnx.export(backbone, (clips[:1],), tmp, dynamo=False, opset_version=opset, input_names=["video"],
                          output_names=["features"],
                          dynamic_axes={"video": {0: "batch", 2: "time"}, "features": {0: "batch"}})
    onnx.checker.check_model(onnx.load(tmp))
    session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])

    def run(x):
        return session.run(None, {"video": x.numpy()})[0]
    notes.append(f"ONNX opset {opset}, dynamic batch and time axes; frames {clips.shape[-2]}x{clips.shape[-1]}")
    check = {"clips": relative_error(run(clips), backbone(clips)),
             f"{long_clip.shape[2]}-frame clip": relative_error(run(long_clip), backbone(long_clip))}
    return check, ["import onnxruntime",
                   f"sess = onnxruntime.InferenceSession({os.path.abspath(out)!r}, providers=['CPUExecutionProvider'])",
                   "features = sess.run(None, {'video': video})[0]  # video: float32 numpy [B, 3, T, H, W]"]


@contextlib.contextmanager
def _quiet_tracer():
    """Tracing warns about every Python number computed from a shape; the check below is what counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


# ---- what the exported network expects -----------------------------------------------------------

def input_contract(ckpt, path, fmt, arch):
    cfg, pre = ckpt["config"], ckpt["cache_fingerprint"]["preprocessing"]
    t, stride, crop, fps = cfg["clip_len"], cfg["stride"], cfg["crop"], pre["fps"]
    lo = [round((0 - m) / s, 3) for m, s in zip(VIDEO_MEAN, VIDEO_STD)]
    hi = [round((1 - m) / s, 3) for m, s in zip(VIDEO_MEAN, VIDEO_STD)]
    return {
        "student": arch, "objective": cfg["objective"], "steps": ckpt.get("step"), "checkpoint": path,
        "feature_dim": ckpt.get("feature_dim"),
        "shape": f"[B, 3, T, H, W] float32 RGB; trained at T={t}, H=W={crop}",
        "values": "RGB / 255, then (x - mean) / std per channel",
        "mean": list(VIDEO_MEAN), "std": list(VIDEO_STD), "range": [lo, hi],
        "fps": fps, "frame_size": [pre["height"], pre["width"]],
        "frame_resize": pre.get("resize", "cover-scale + centre crop"),
        "clip": f"{t} frames, every {_nth(stride)} stored frame ({fps / stride:g} fps), spanning "
                f"{clip_span(t, stride)} stored frames = {clip_span(t, stride) / fps:.2f} s",
        "eval_crop": f"the centre {min(pre['height'], pre['width'])}x{min(pre['height'], pre['width'])} square "
                     f"resized to {crop}x{crop} (bilinear, antialiased)",
        "train_crop": f"random-resized crops of {cfg['crop_scale']:g}-1 of the frame area, flips, to {crop}x{crop}"
                      + (" (the distilled view inside the centre square the teacher saw)"
                         if cfg.get("distill_view") == "teacher_square" and cfg["objective"] != "modist" else ""),
        "output": "fc outputs [B, num_classes]; with net.fc = Identity the [B, 512] features" if
                  fmt == "torchvision" and arch in TORCHVISION_STUDENTS else
                  f"[B, {ckpt.get('feature_dim')}] pooled features",
    }


def _nth(k):
    return {1: "", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def format_contract(c):
    return "\n".join([
        f"input     {c['shape']}",
        f"values    {c['values']}: mean {tuple(c['mean'])}, std {tuple(c['std'])} (Kinetics); range "
        f"{tuple(c['range'][0])} .. {tuple(c['range'][1])}",
        f"frames    decoded at {c['fps']:g} fps to {c['frame_size'][0]}x{c['frame_size'][1]} ({c['frame_resize']})",
        f"clip      {c['clip']}",
        f"crop      eval: {c['eval_crop']}; training: {c['train_crop']}",
        f"output    {c['output']}",
        f"trained   {c['student']}, {c['objective']}, {c['steps']} steps ({c['checkpoint']})",
    ])
