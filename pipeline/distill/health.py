"""Training health, for a user with no labels: is distillation working?

On a fixed sample of cached clips (one clip of each of up to 32 videos spread over the cache, cut as
training cuts them but drawn with an epoch number no run reaches, so the same clips every time and
never a training batch), every few hundred steps and at the end:
- each teacher head: the KL to the teacher's targets and how often the student's top class is the
  teacher's, each against what always predicting the sample's mean target scores (a student that
  ignores its input scores exactly that);
- MoDist: how often a clip's RGB embedding finds its own flow embedding among the sample's (chance 1/n);
- lss: the same KL comparison and top-1 agreement over the concept bank's categories.
After warm-up, a head no better than the mean target on both (or retrieval at chance) gets one warning line.
"""
import numpy as np
import torch
import torch.nn.functional as F

from cache.fingerprint import teacher_array
from pipeline.distill.losses import bridged_teacher, distill_kl, joint_teacher, teacher_targets

SAMPLE_CLIPS = 32
HEALTH_EPOCH = 2 ** 31 - 1  # ClipDataset draws item (epoch, i) from a generator seeded by it: no run gets here


def health_sample(dataset, n=SAMPLE_CLIPS):
    """A fixed batch {key: [N,...]} of one clip of each of N <= n videos spread over the dataset."""
    rows = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    return torch.utils.data.default_collate([dataset[(HEALTH_EPOCH, int(i))] for i in rows])


def kl_to_mean_target(target, tau):
    """What distill_kl gives a student that always predicts the batch's mean target: KL(p || mean p) * tau^2,
    mean over the batch. target [B,K] probabilities -> scalar."""
    mean = target.mean(0, keepdim=True).clamp_min(1e-12)  # [1,K]
    return (target * (target.clamp_min(1e-12).log() - mean.log())).sum(1).mean() * tau * tau


def agreement(student_scores, target):
    """Share of rows whose top class is the target's. [B,K], [B,K] -> float."""
    return float((student_scores.argmax(1) == target.argmax(1)).float().mean())


@torch.no_grad()
def measure_health(model, sample, device, batch_size=16):
    """{"health/<head>/<figure>": value} for the model (a Distiller) on the fixed sample, in eval mode."""
    was_training = model.training
    model.eval()
    cfg, out = model.cfg, {}
    batch = {k: v.to(device) for k, v in sample.items()}
    feat = torch.cat([model.backbone(model.video_input(batch["video"][i:i + batch_size])).float()
                      for i in range(0, len(batch["video"]), batch_size)])  # [N,D]
    for t in model.teachers:
        slot = t["slot"]
        head = getattr(model, teacher_array("distill_head", slot))
        logits = head(feat)
        target = teacher_targets(batch[teacher_array("teacher_logits", slot)],
                                 batch["teacher_mask"], cfg.tau)
        name = model.loss_name("distinit", t)
        out[f"health/{name}/kl"] = float(distill_kl(logits, target, cfg.tau))
        out[f"health/{name}/kl_mean_target"] = float(kl_to_mean_target(target, cfg.tau))
        out[f"health/{name}/top1_agree"] = agreement(logits, target)
        out[f"health/{name}/top1_mean_target"] = agreement(target.mean(0, keepdim=True).expand_as(target), target)
    if model.use_modist:
        q = model.proj_rgb(feat)  # [N,128]
        k = model.proj_flow(model.motion(model.layout(batch["flow"].float() / model.flow_bound)))
        out["health/modist/rgb_to_flow_top1"] = float(((q @ k.t()).argmax(1) == torch.arange(len(q), device=device))
                                                      .float().mean())
        out["health/modist/chance"] = 1 / len(q)
    if model.use_lss:
        student = model.concept_head(feat)
        teacher = (joint_teacher(batch["teacher_embed"], batch["teacher_mask"]) if model.teacher_in_text_space
                   else bridged_teacher(batch["teacher_logits"], batch["teacher_mask"], model.bridge_vectors))
        target = F.softmax(teacher.float() @ model.category_vectors.t() / cfg.concept_teacher_tau, dim=-1)
        scores = student @ model.category_vectors.t()  # the student's tau: KL as concept_distill sees it
        out["health/lss/kl"] = float(distill_kl(scores / cfg.concept_tau, target, 1.0))
        out["health/lss/kl_mean_target"] = float(kl_to_mean_target(target, 1.0))
        out["health/lss/top1_agree"] = agreement(scores, target)
        out["health/lss/top1_mean_target"] = agreement(target.mean(0, keepdim=True).expand_as(target), target)
    model.train(was_training)
    return out


def health_heads(record):
    """The heads a health record speaks of, e.g. ["distinit", "modist"]."""
    return list(dict.fromkeys(k[len("health/"):].rsplit("/", 1)[0] for k in record if k.startswith("health/")))


def describe_health(record):
    """One line: each head's figures, e.g. 'distinit KL 0.41 (mean target 1.20), top-1 as the teacher 62 %'."""
    parts = []
    for head in health_heads(record):
        h = {k.rsplit("/", 1)[1]: v for k, v in record.items() if k.startswith(f"health/{head}/")}
        if "kl" in h:
            parts.append(f"{head} KL {h['kl']:.3f} (mean target {h['kl_mean_target']:.3f}), top-1 as the teacher "
                         f"{100 * h['top1_agree']:.0f} % (mean target {100 * h['top1_mean_target']:.0f} %)")
        else:
            parts.append(f"{head} RGB->flow top-1 {100 * h['rgb_to_flow_top1']:.0f} % (chance {100 * h['chance']:.0f} %)")
    return "; ".join(parts)


def health_advice(heads, lr):
    """What to check for the heads unhealthy() named: a teacher head that matches only the mean target is
    usually a learning rate or a cache problem; contrastive retrieval at chance is usually just early
    (MoDist needed ~600 steps on the demo's 128 videos, a student from the inflated start still more)."""
    advice = []
    if set(heads) - {"modist"}:
        advice.append(f"check --lr (now {lr:g}) and the cache's teacher outputs")
    if "modist" in heads:
        advice.append(f"contrastive retrieval often stays at chance for a few hundred steps: if it still is at the "
                      f"end, give it more --steps, then check --lr (now {lr:g}) and the cache's flow")
    return "; ".join(advice)


def unhealthy(record):
    """The heads no better than their baseline: a KL not below the mean target's and a top-1 agreement not
    above it (a student that ignores its input scores exactly both), or retrieval at chance."""
    bad = []
    for head in health_heads(record):
        h = {k.rsplit("/", 1)[1]: v for k, v in record.items() if k.startswith(f"health/{head}/")}
        if ("kl" in h and h["kl"] >= h["kl_mean_target"] and h["top1_agree"] <= h["top1_mean_target"]) \
                or ("chance" in h and h["rgb_to_flow_top1"] <= h["chance"]):
            bad.append(head)
    return bad
