"""Every stage's settings, with their defaults, in one place.

The CLI reads its option defaults from these dataclasses, so a default is written once. This module
imports nothing heavy (no torch, no OpenCV): `cli.py` loads it to build its options and answers a
mistyped option at once. Each config is saved whole inside the cache or checkpoint it produces.
"""
from dataclasses import dataclass

OBJECTIVES = ("distinit", "modist", "both")  # the demo's runs; `lss` and any "+" combination also train
OBJECTIVE_PARTS = ("distinit", "modist", "lss")
PRECISIONS = ("auto", "fp32", "bf16")  # the students' arithmetic (pipeline/common/precision.py)
INITS = ("checkpoint", "scratch", "inflate", "teacher")  # rows of an evaluation table
PROTOCOLS = ("linear", "knn", "retrieval", "finetune", "zeroshot")
TASKS = ("ucf101", "hmdb51", "folder", "csv")



def objective_parts(objective):
    """'both' -> ('distinit', 'modist'); 'distinit+lss' -> ('distinit', 'lss'); in OBJECTIVE_PARTS order.
    Raises ValueError on an unknown part."""
    parts = set(("distinit", "modist") if objective == "both" else objective.split("+"))
    unknown = parts - set(OBJECTIVE_PARTS) - {"both"}
    if unknown or not objective:
        raise ValueError(f"--objective takes distinit, modist, lss or a '+' combination of them (both = "
                         f"distinit+modist), not {objective!r}")
    if "both" in parts:
        parts |= {"distinit", "modist"}
    return tuple(p for p in OBJECTIVE_PARTS if p in parts)


# Clips cut from one source video must not straddle a split (near-duplicate frames would leak the
# answer). UCF101 names them v_<Class>_g<group>_c<clip>; the same rule serves any similar naming.
UCF_GROUPS = r"^(v_.+_g\d+)_c\d+"
# HMDB51 cuts several clips from one source and numbers them last: <source>_<tags>_<n>.avi
HMDB_GROUPS = r"^(.+)_\d+\.\w+$"
TASK_GROUPS = {"hmdb51": HMDB_GROUPS}  # any other task: UCF_GROUPS unless --group-pattern says otherwise


def group_rule(task, group_pattern=None):
    """The file-name rule that groups clips of one source for `task` (a given pattern wins; '' = none)."""
    return group_pattern if group_pattern is not None else TASK_GROUPS.get(task, UCF_GROUPS)

# What "auto" means for the student, its clip length and batch: a GPU trains the standard network on
# the standard clips; two CPU cores need a small network and short clips to learn anything in minutes.
DEVICE_DEFAULTS = {"cuda": dict(student="r2plus1d_18", clip_len=16, batch_size=32),
                   "cpu": dict(student="r3d_cpu", clip_len=8, batch_size=8)}


@dataclass
class ExtractConfig:
    videos: str
    cache: str = "cache"  # in the working folder, where `distill` looks by default
    fps: float = 8.0
    height: int = 128
    width: int = 171
    teacher: str = "efficientnet_lite0"
    teacher_weights: str = None
    teacher_pretrained: str = None  # clip:ARCH only: a hub tag, fetched once before any work
    teacher_size: int = 0  # 0: the input size the teacher's weights were trained at (224 without a teacher)
    teacher_classes: str = None  # timm:/torchvision: teachers: a file of their class names, one per line
    # teachers after the first, each "SPEC[,weights=FILE][,classes=FILE]" at its own input size and crop,
    # labelling the same frames from the same decode (pipeline/extract/teachers.py)
    more_teachers: tuple = ()
    # share of the central square the teacher sees (then resized to teacher_size); 0: the teacher's own
    # evaluation crop (EfficientNet-Lite0: 224 of 256, 0.875; CLIP: the whole square)
    teacher_crop: float = 0.0
    teacher_every: int = 1
    flow: str = "dis"
    shard: tuple = None  # (index, count); None: from the environment, else (0, 1)
    workers: int = 1  # processes in this job; 0: auto (extract.auto_workers: from the cores and GPUs found)
    device: str = "auto"
    batch_frames: int = 32
    # a part is committed after part_videos videos or part_mb of stored data, whichever comes first: what
    # a kill can cost, and the commit granularity; large parts keep the cache a few files per GB
    part_videos: int = 1024
    part_mb: int = 256
    # how frames and flow are stored (cache/codecs.py): JPEG at this quality, or lossless zstd
    frame_codec: str = "jpeg"
    frame_quality: int = 90
    flow_codec: str = "jpeg"
    flow_quality: int = 95
    stall_timeout: float = 60.0
    retry_failed: bool = False
    strict: bool = False
    overwrite: bool = False
    # an object store without conditional writes: no lease keeps two jobs apart, the user vouches for one
    single_writer: bool = False
    progress: bool = True


@dataclass
class DistillConfig:
    cache: str = "cache"
    out: str = ""  # "": runs/<objective>-<date-time>/, or the latest run with these settings (resumed)
    objective: str = "distinit"
    student: str = "auto"  # r2plus1d_18 on CUDA, r3d_cpu on CPU
    # where the student starts: "scratch" (random weights), "inflate" (its image network made temporal,
    # models/inflate.py), or a PATH (RUN/, RUN/checkpoint.pt, a torchvision-format export); "auto":
    # inflate where the image weights ship (efficientnet3d_lite0/1/2), else scratch (models/start.py)
    init: str = "auto"
    init_weights: str = ""  # inflate: the 2D network's weights file ("": the shipped ones, EfficientNet-Lite only)
    # the student's BatchNorm in training: "batch" statistics (the usual), or "frozen" at their running
    # statistics (an inflated student keeps its image network's normalisation; TSN's partial BN)
    bn_stats: str = "batch"
    # steps at the start in which only the heads learn and the backbone is held, then it warms up and decays
    # over the rest (LP-FT, Kumar et al. 2022): a start that knows (inflate, PATH) first gets heads that fit
    # its features, instead of fresh heads whose large first gradients rewrite them
    hold_backbone: int = 0
    # the backbone's learning rate as a share of --lr: below 1, a start that knows keeps near what it
    # knows while the fresh heads and the motion pathway, which start from random weights, learn at --lr
    backbone_lr_scale: float = 1.0
    clip_len: int = 0  # 0: 16 on CUDA, 8 on CPU
    stride: int = 2
    crop: int = 112
    crop_scale: float = 0.25  # smallest random-resized-crop area (share of the frame)
    # the distilled view's crop: inside the central square the teacher saw ("teacher_square"), so its
    # target never describes what the clip does not show, or "anywhere" in the frame
    distill_view: str = "teacher_square"
    # colour augmentations (the MaCLR paper's settings), drawn per clip on the device; a probability of 0 turns one
    # off. Which views: "key" jitters the contrastive key clip only, so the student's own clip, which
    # DistInit matches to the teacher's view of clean frames, stays clean (the demo's validation runs:
    # jittering it cost distinit 22 points of object accuracy); "all" jitters every RGB view, as MaCLR does
    colour_views: str = "key"
    jitter: float = 0.4  # brightness, contrast and saturation factors in [1 - jitter, 1 + jitter]
    hue: float = 0.1  # hue shift in [-hue, hue] turns of the colour wheel
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # Gaussian blur, sigma 0.1-2 px
    batch_size: int = 0  # 0: 32 on CUDA, 8 on CPU
    steps: int = 0  # total optimiser steps; 0: from epochs
    epochs: int = 10
    clips_per_video: int = 0  # clips of each video per epoch; 0: enough for epochs of >= 25 steps on small caches
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = -1.0  # -1: 0.05 for AdamW, 5e-4 for SGD (the usual values of each)
    warmup_steps: int = 0  # 0: 5 % of the run's steps
    grad_clip: float = 1.0
    tau: float = 2.0  # distillation temperature
    target_mode: str = "average"  # teacher target: frame-averaged probabilities, or one random frame
    embed_weight: float = 0.0  # cosine regression onto the teacher embedding
    distinit_weight: float = 1.0
    # how the objectives of a '+' combination add up: "grad" rescales each every step so it sends the
    # backbone its --*-weight's share of the gradient (pipeline/distill/balance.py); "none": the weights
    # multiply the losses as they are
    balance: str = "none"
    # a cache of several teachers: "NAME=W,NAME=W" (relative weights, scaled to sum to 1; a teacher left
    # out is not distilled); "": every teacher of the cache, equal weights, one head each
    teacher_weight: str = ""
    modist_weight: float = 1.0
    cross_weight: float = 1.0  # RGB<->flow terms inside MoDist, both directions summed
    flow_weight: float = 0.0  # flow<->flow term inside MoDist (0: off)
    # LSS: the student's concept-space head matches the teacher's distribution over the bank's
    # concepts (categories and descriptions), and its category distribution, carried through the
    # membership, agrees with its own description distribution (concept alignment)
    concepts: str = ""  # the bank from `cli.py concepts` (needed by lss)
    lss_weight: float = 1.0
    align_weight: float = 1.0  # concept alignment, inside lss
    concept_tau: float = 0.1  # the student's temperature over concept cosines
    concept_teacher_tau: float = 0.04  # the teacher's, sharper (as DINO's teacher is)
    # the paper's self-distillation inside lss: the student's concept distributions on its clip match
    # those of an EMA copy of it (backbone + concept head) on a second clip of the same video; 0: off
    concept_self_weight: float = 0.0
    shuffle_bn_groups: int = 2  # key encoders' BatchNorm sub-batches on one device (shuffle-BN)
    # MoDist negatives from the query's own video (an older key of it in the queue, a second clip of it in
    # the batch) are false negatives: masked out of the InfoNCE denominator unless turned off
    mask_own_video: bool = True
    nce_tau: float = 0.1
    queue_size: int = 4096
    momentum: float = 0.0  # key encoders; 0: from the run's length, 1 - 4 / steps within [0.9, 0.999]
    # decompressed frame/flow chunks each loader process keeps (a cache that fits is decompressed once)
    read_cache_mb: int = 512
    proj_dim: int = 128
    # channels-last (NDHWC) memory for the 3D convolutions: 1.3-1.4x faster steps on CPU (bench/bench_distill.py);
    # the same numbers within float tolerance
    channels_last: bool = True
    compile: bool = False  # torch.compile the networks (backbone, motion pathway, key encoders): for long GPU runs
    workers: int = 2
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    # training health (pipeline/distill/health.py) on a fixed sample of cached clips every N steps and at the
    # end: each head against a student that ignores its input, in the log and the summary
    health_every: int = 100
    device: str = "auto"
    # the networks' arithmetic: "auto" = bf16 autocast on CUDA and on CPUs that compute bf16 natively
    # (AVX512_BF16 or AMX), fp32 elsewhere (pipeline/common/precision.py); the checkpoint keeps the choice
    precision: str = "auto"
    progress: bool = True


@dataclass
class ConceptsConfig:
    classes: str = "k400"  # k400, ucf101, hmdb51, imagenet, or a file with one class name per line
    descriptions: str = None  # JSON {class: [descriptions]}; None: the content words of each class name
    out: str = "concepts.h5"
    text_encoder: str = "minilm"  # or clip:ARCH, the text tower of a CLIP teacher (with its weights)
    text_weights: str = None  # clip: a local open_clip/OpenAI checkpoint
    text_pretrained: str = None  # clip: a hub tag instead (needs the network)


@dataclass
class EvalConfig:
    task: str
    root: str = None  # None: the benchmark's default root (ucf101, hmdb51: $VIDISTILL_DATA/<task> or data/<task>)
    out: str = "eval_out"
    split: int = 1
    splits: str = None  # folder with the split files (default: looked up beside the data)
    checkpoint: str = None  # None: runs/latest/checkpoint.pt when there is a latest run
    inits: tuple = ()  # empty: checkpoint (if given), scratch, inflate, teacher
    protocols: tuple = ("linear", "knn", "retrieval")  # finetune trains the whole net: opt in
    clips: int = 4  # temporal views per video, uniformly spaced
    crops: int = 1  # spatial views: 1 = centre, 3 = left/centre/right
    student: str = DEVICE_DEFAULTS["cpu"]["student"]  # architecture for --init scratch without a checkpoint
    seed: int = 0
    batch_size: int = 16
    finetune_epochs: int = 5
    finetune_lr: float = 1e-3
    test_fraction: float = 0.3  # folder and csv tasks: stratified split, groups kept on one side
    group_pattern: str = None  # None: the task's rule (group_rule)
    train_list: str = None
    test_list: str = None
    labels: str = None  # csv task: the labels file, its label column and its video-path column
    label_column: str = None
    id_column: str = "id"
    work: str = None  # where the decoded-frames cache lives (default: out); share it between runs
    teacher_every: int = 1  # teacher row: embeddings of every k-th frame are averaged
    # processes for the one decode of the task's videos (extract's --workers; 0: its auto rule): with the
    # teacher on every k-th frame only, decoding is the work, and one process per core does it fastest
    decode_workers: int = 1
    # the teacher row's teacher (and its weights file); None: the one the checkpoint distilled from, else
    # efficientnet_lite0
    teacher: str = None
    teacher_weights: str = None
    # a row "teacher:NAME" for each further teacher the checkpoint distilled from, as SPEC[,weights=][,classes=]
    # (filled from the checkpoint)
    more_teachers: tuple = ()
    # zeroshot: the text encoder that embeds the task's class names (and its weights file, for clip);
    # None: the checkpoint's concept bank's encoder, else a CLIP teacher's own text tower, else minilm
    text_encoder: str = None
    text_weights: str = None
    device: str = "auto"
    # the student-side rows' arithmetic, as distill's (feature extraction and fine-tuning; the teacher row
    # runs at its own); bf16 features are stored apart from fp32 ones
    precision: str = "auto"
    progress: bool = True

    def rows(self):
        """The table's rows: as asked, else the checkpoint (if any) against every baseline."""
        baselines = ("scratch", "teacher") if tuple(self.protocols) == ("zeroshot",) else ("scratch", "inflate", "teacher")
        rows = tuple(self.inits) or (("checkpoint",) if self.checkpoint else ()) + baselines  # inflate: no text space
        more = tuple(f"teacher:{spec.split(',')[0]}" for spec in self.more_teachers) if "teacher" in rows else ()
        return rows + tuple(r for r in more if r not in rows)


def is_teacher_row(init):
    """The 2D teacher rows: "teacher" (the checkpoint's first teacher) and "teacher:NAME" (another)."""
    return init == "teacher" or init.startswith("teacher:")


EXPORT_FORMATS = ("torchvision", "torchscript", "onnx")
EXPORT_FC = ("auto", "head", "init")  # the fc layer of a torchvision-format export (pipeline/evaluate/export.py)


@dataclass
class ExportConfig:
    checkpoint: str = None  # RUN/checkpoint.pt or RUN/; None: runs/latest
    format: str = "torchvision"
    out: str = None  # None: RUN/<student>-<format>.pt (.onnx)
    # torchvision format, torchvision students: "head" = the distillation head (the student's ImageNet-1k
    # logits, num_classes=1000), "init" = the stock 400-way fc as freshly initialised (untrained, seed 0);
    # "auto": head when the run has one (distinit, both), else init (modist)
    fc: str = "auto"
    opset: int = 17  # ONNX opset (the TorchScript-based exporter)
    # max |export - original| / max |original| on the check clips. Measured: 0 (state dict, TorchScript),
    # <= 5e-7 (ONNX, ResNets), ~1.3e-4 (ONNX, EfficientNet3d: float32 PyTorch is itself ~1e-4 from float64)
    tolerance: float = 1e-3


@dataclass
class ShowConfig:
    cache: str
    video_id: str
    out: str = "preview.png"
    frames: int = 8  # columns of the contact sheet (teacher frames when the cache has a teacher)
    scale: int = 2  # stored frames are small (128x171): each tile is drawn this many times larger
    top: int = 5  # teacher classes listed under each frame


def resolve_device(device, slot=0):
    """"auto" -> CUDA if present (one GPU per process: slot = torchrun's LOCAL_RANK or the worker
    index), else "cpu"; anything else is taken as given. The one place "auto" is decided."""
    if device != "auto":
        return device
    import torch  # here, not at the top: the CLI imports this module before any heavy work
    return f"cuda:{slot % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
