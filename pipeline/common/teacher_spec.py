"""The teacher-spec syntax, SPEC[,weights=FILE][,classes=FILE]: how a further --teacher names its files
inline, and how a cache's config records each teacher. Extract parses it; distill and evaluate read
it back from a cache's config, so it lives below the stages (no torch)."""
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
