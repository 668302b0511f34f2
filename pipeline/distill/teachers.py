"""Which teachers a run distils from: each of the cache's teachers (one head each) at the weights
--teacher-weight gives, and how each was loaded, for the checkpoint (an evaluation's teacher rows)."""
from cache.fingerprint import cache_teachers, read_cache_json
from pipeline.common.config import objective_parts
from pipeline.common.errors import DistillError
from pipeline.common.teacher_spec import parse_teacher


def teacher_sources(cache_dir, fingerprint):
    """How each of the cache's teachers was loaded (name as given to extract, weights and classes files,
    sha256), in slot order: an evaluation runs the same teachers for its teacher rows, without the cache."""
    extracted = read_cache_json(cache_dir).get("config", {})
    loaded = [(extracted.get("teacher"), extracted.get("teacher_weights"), extracted.get("teacher_classes")),
              *map(parse_teacher, extracted.get("more_teachers") or ())]
    return [{"name": name, "weights": weights, "classes": classes, "weights_sha256": t.get("weights_sha256")}
            for (name, weights, classes), t in zip(loaded, [fingerprint["teacher"], *fingerprint.get("more_teachers", [])])]


def distilled_teachers(cfg, fingerprint):
    """[{slot, name, weight, num_classes, embed_dim, weights_sha256}] of the teachers distinit distils from: those
    --teacher-weight names, their weights scaled to sum to 1, or every teacher of the cache equally."""
    if "distinit" not in objective_parts(cfg.objective):
        return []
    teachers = cache_teachers(fingerprint)
    names = [t["name"] for t in teachers]
    weights = dict.fromkeys(names, 1.0)
    if cfg.teacher_weight:
        weights = {}
        for item in cfg.teacher_weight.split(","):
            name, _, value = item.strip().rpartition("=")
            try:
                weights[name] = float(value)
            except ValueError:
                name = ""
            if name not in names or weights[name] < 0:
                raise DistillError(f"--teacher-weight {cfg.teacher_weight!r}: {item.strip()!r} is not NAME=WEIGHT (>= 0) "
                                   f"of a teacher of {cfg.cache} ({', '.join(names)})")
    total = sum(weights.values())
    if total <= 0:
        raise DistillError(f"--teacher-weight {cfg.teacher_weight!r}: give at least one teacher a weight above 0")
    return [{"slot": slot, "name": name, "weight": weights[name] / total, "num_classes": t["num_classes"],
             "embed_dim": t["embed_dim"], "weights_sha256": t.get("weights_sha256")} for slot, (name, t) in enumerate(zip(names, teachers)) if weights.get(name, 0) > 0]


def teachers_changed(ckpt, teachers):
    """Why a checkpoint's teachers differ from those a resume would distil from ("" when they do not)."""
    def described(ts):
        return [(t["name"], round(t["weight"], 6)) for t in ts]  # the cache's fingerprint pins their weights
    old = ckpt.get("teachers")
    if old is None or described(old) == described(teachers):
        return ""
    def names(ts):
        return ", ".join(f"{t['name']}={t['weight']:.3g}" for t in ts) or "none"
    return f"other teachers (the run distilled from {names(old)}; the cache now gives {names(teachers)})"
