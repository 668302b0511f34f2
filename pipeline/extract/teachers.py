"""Which teachers an extraction runs: the first from --teacher (with --teacher-weights and
--teacher-classes), each further --teacher as SPEC[,weights=FILE][,classes=FILE]. Every teacher labels
the same frames of the same decode; the cache keeps each one's outputs in its own arrays (slot order)."""
import os

OPTION_KEYS = ("weights", "classes")


def parse_teacher(text):
    """'torchvision:resnet50,weights=r50.pth,classes=places.txt' -> (spec, weights, classes), the files'
    paths absolute (the cache records them; an evaluation run from elsewhere loads the same teacher)."""
    spec, *options = [part.strip() for part in text.split(",")]
    found = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key not in OPTION_KEYS or not value:
            raise ValueError(f"--teacher {text!r}: {option!r} is not weights=FILE or classes=FILE")
        found[key] = os.path.abspath(value)
    if not spec:
        raise ValueError(f"--teacher {text!r}: no teacher spec before the options")
    return spec, found.get("weights"), found.get("classes")


def render_teacher(spec, weights=None, classes=None):
    """The inverse of parse_teacher."""
    return ",".join([spec] + [f"{k}={v}" for k, v in (("weights", weights), ("classes", classes)) if v])


def teacher_args(cfg):
    """[(spec, weights, classes)] of every teacher of an extraction, first one first ([]: --teacher none)."""
    if cfg.teacher == "none":
        return []
    return [(cfg.teacher, cfg.teacher_weights, cfg.teacher_classes), *map(parse_teacher, cfg.more_teachers)]


def load_teachers(cfg, device):
    from models.teacher import load_teacher  # here: distill parses specs and must never import the teacher
    return [load_teacher(spec, weights, device=device, classes=classes) for spec, weights, classes in teacher_args(cfg)]
