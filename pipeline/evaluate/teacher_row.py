"""The 2D teacher row: a teacher's per-video embeddings or ImageNet probabilities, averaged over frames,
from the cache's teacher rows when it has them, else from the teacher run on each video's decode."""
import os

import numpy as np
import torch

from models.teacher import load_teacher
from pipeline.common.errors import EvalError
from pipeline.common.progress import progress_bar
from pipeline.evaluate.frames import weights_sha256
from pipeline.extract.decode import DecodeError, VideoDecode
from pipeline.extract.extract import teacher_identity

_decoded_teacher = {}  # (cache, every, teacher weights, device) -> {video id: {"embed", "probs"}}, per process


def teacher_row(reader, every, device, progress, source=("efficientnet_lite0", None, None), own_view=False):
    """(teacher fingerprint, compute(ids, output)) of the 2D teacher row: per video, the average over
    every `every`-th frame of its embedding (output "embed") or of its ImageNet probabilities ("probs"),
    [N,1,D]. From the cache's teacher rows when it has them at a step dividing `every`; else the
    teacher `source` (name, weights file, classes file) runs on each video's own decode at the
    distillation's teacher size (the stored frames are too small to show it what it saw in distillation),
    or, own_view (a further teacher of the cache), at its own input size and crop, cut from that decode as
    extract cut it. Either way, the frames-only cache is not redone."""
    def probs(logits):
        return torch.softmax(torch.from_numpy(logits).float(), -1).numpy()
    fp = reader.fingerprint
    cached_every = fp["preprocessing"].get("teacher_every")
    # the cache's teacher outputs serve only when they are this teacher's (same weights) at a step dividing `every`
    if fp["teacher"].get("weights_sha256") == weights_sha256(source[1]) and cached_every and every % cached_every == 0:
        def from_cache(ids, output):
            out = []
            for v in ids:
                rows = reader.read(v, fields=("embed" if output == "embed" else "logits",))
                keep = rows["teacher_frame"] % every == 0
                x = rows["embed"][keep] if output == "embed" else probs(rows["logits"][keep])
                out.append(x.astype(np.float32).mean(0, keepdims=True))
            return np.stack(out)
        return fp["teacher"], from_cache
    try:
        name, weights, classes = source
        teacher = load_teacher(name, weights, device=device, classes=classes)
    except ValueError as e:
        raise EvalError(f"teacher row: {e}") from None
    tfp = teacher_identity(teacher, device)
    pre = fp["preprocessing"]

    # one decode serves both outputs: the probes' embeddings and zero-shot's probabilities of a video
    # are averaged from the same frames, so the second row asking for them finds them here
    memo = _decoded_teacher.setdefault((os.path.abspath(reader.cache_dir), every, tfp["weights_sha256"], str(device)), {})

    def from_decode(ids, output):
        for v in progress_bar([v for v in ids if v not in memo], desc="features teacher", unit="video",
                              disable=not progress):
            path, embeds, frame_probs, n = reader.record(v)["path"], [], [], 0
            try:
                for stored, views in VideoDecode(path, fps=pre["fps"], height=pre["height"], width=pre["width"],
                                                 teacher_size=pre["teacher_size"], teacher_crop=pre.get("teacher_crop", 1.0),
                                                 more_teachers=[(teacher.input_size, teacher.eval_crop)] if own_view else ()):
                    teacher_in = views[-1]
                    pick = np.flatnonzero((np.arange(n, n + len(stored)) % every) == 0)
                    if len(pick):
                        logits, embed = teacher.predict(teacher_in[pick])
                        embeds.append(embed)
                        frame_probs.append(probs(logits))
                    n += len(stored)
            except DecodeError as e:
                raise EvalError(f"{path}: cannot decode it for the teacher row ({e})") from None
            if not embeds:
                raise EvalError(f"{path}: no frames decoded for the teacher row")
            memo[v] = {"embed": np.concatenate(embeds).mean(0, keepdims=True),
                       "probs": np.concatenate(frame_probs).mean(0, keepdims=True)}
        return np.stack([memo[v][output] for v in ids])
    return tfp, from_decode


def in_text_space(teacher, text_identity):
    """A CLIP teacher whose own text tower made the space: its embeddings are compared with it directly."""
    return (teacher.get("space") == "clip joint" and teacher["name"] == text_identity["name"]
            and teacher.get("weights_sha256") == text_identity["weights_sha256"])
