"""Which teachers an extraction runs: the first from --teacher (with --teacher-weights and
--teacher-classes), each further --teacher as SPEC[,weights=FILE][,classes=FILE] (the syntax:
pipeline/common/teacher_spec.py). Every teacher labels the same frames of the same decode; the cache
keeps each one's outputs in its own arrays (slot order)."""
from pipeline.common.teacher_spec import parse_teacher


def teacher_args(cfg):
    """[(spec, weights, classes)] of every teacher of an extraction, first one first ([]: --teacher none)."""
    if cfg.teacher == "none":
        return []
    return [(cfg.teacher, cfg.teacher_weights, cfg.teacher_classes), *map(parse_teacher, cfg.more_teachers)]


def load_teachers(cfg, device):
    from models.teacher import load_teacher  # here: importing the teacher's torch code costs seconds
    return [load_teacher(spec, weights, device=device, classes=classes) for spec, weights, classes in teacher_args(cfg)]
