"""Stage-two objectives as pure functions (no state, no modules): easy to test by hand. Each computes
in fp32 whatever --precision the networks run in (tests/test_losses.py checks it under bf16 autocast)."""
import torch
import torch.nn.functional as F


def frame_mean(per_frame, teacher_mask):
    """per_frame [B,M,D] (padded), teacher_mask [B,M] bool -> [B,D], the mean over each clip's real frames."""
    mask = teacher_mask.float()[..., None]
    return (per_frame.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def teacher_targets(teacher_logits, teacher_mask, tau, mode="average", generator=None):
    """Soft targets for each clip from the teacher's per-frame logits.

    teacher_logits [B,M,K] (padded), teacher_mask [B,M] bool (which rows are real frames).
    mode "average": frame-averaged probabilities softmax(t/tau) over the clip's frames;
    mode "random": the probabilities of one random real frame per clip.
    Returns probabilities [B,K].
    """
    probs = F.softmax(teacher_logits.float() / tau, dim=-1)  # [B,M,K]
    mask = teacher_mask.float()  # [B,M]
    if mode == "random":
        # one valid frame per clip: sample by the mask as a categorical distribution
        pick = torch.multinomial(mask + 1e-12 * (mask.sum(1, keepdim=True) == 0), 1, generator=generator)  # [B,1]
        return probs.gather(1, pick[:, :, None].expand(-1, -1, probs.shape[-1])).squeeze(1)
    if mode != "average":
        raise ValueError(f"unknown target mode {mode!r}")
    return frame_mean(probs, teacher_mask)  # [B,K]


def distill_kl(student_logits, target_probs, tau):
    """DistInit: KL(p_teacher || softmax(student/tau)) * tau^2, mean over the batch.

    student_logits [B,K], target_probs [B,K] -> scalar. The tau^2 keeps gradient scale independent
    of tau (Hinton et al.).
    """
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_student, target_probs, reduction="batchmean") * tau * tau


def embed_cosine(student_embed, teacher_embed, teacher_mask):
    """1 - cos(student prediction, the clip's mean teacher embedding), mean over the batch.

    student_embed [B,D], teacher_embed [B,M,D], teacher_mask [B,M] -> scalar.
    """
    target = frame_mean(teacher_embed, teacher_mask)  # [B,D]
    return (1 - F.cosine_similarity(student_embed.float(), target, dim=-1)).mean()


def info_nce(query, key, queue=None, tau=0.1, ids=None, queue_ids=None):
    """InfoNCE with the matching key as positive; other keys in the batch and a queue as negatives.

    query [B,D], key [B,D] (both L2-normalised; key from the momentum encoder, no gradient),
    queue [Q,D] or None -> scalar. Positives sit on the diagonal of the in-batch similarity matrix.
    ids [B] / queue_ids [Q]: the video of each key; a negative from the query's own video (an older
    key of it in the queue, or a second clip of it in the batch) is a false negative and is masked.
    Computed in fp32 even under autocast: bf16 rounds cosines near 1 by ~0.002, x10 after tau.
    """
    with torch.autocast(query.device.type, enabled=False):
        query, key = query.float(), key.float()
        logits = query @ key.t()  # [B,B]
        if ids is not None:
            same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
            logits = logits.masked_fill(same, float("-inf"))
        if queue is not None and len(queue):
            from_queue = query @ queue.float().t()  # [B,Q]
            if ids is not None and queue_ids is not None:
                from_queue = from_queue.masked_fill(ids[:, None] == queue_ids[None, :], float("-inf"))
            logits = torch.cat([logits, from_queue], dim=1)  # [B,B+Q]
        labels = torch.arange(len(query), device=query.device)
        return F.cross_entropy(logits / tau, labels)


def bridged_teacher(teacher_logits, teacher_mask, bridge):
    """The clip's teacher in the text space: its frame-averaged ImageNet probabilities times the text
    embeddings of the 1000 class names (the bridge of an image-only teacher into a language space).

    teacher_logits [B,M,K], teacher_mask [B,M], bridge [K,D] (unit rows) -> [B,D] unit.
    In fp32 even under autocast: a target, not a network's activation.
    """
    with torch.autocast(teacher_logits.device.type, enabled=False):
        probs = teacher_targets(teacher_logits, teacher_mask, 1.0)  # [B,K]
        return F.normalize(probs @ bridge.float(), dim=-1)


def joint_teacher(teacher_embed, teacher_mask):
    """The clip's teacher in the text space when the teacher is text-aligned (CLIP): its frame-averaged
    joint-space embedding, no bridge.

    teacher_embed [B,M,D] (unit rows), teacher_mask [B,M] -> [B,D] unit.
    """
    return F.normalize(frame_mean(teacher_embed, teacher_mask), dim=-1)


def concept_distill(student, teacher, concepts, tau_student, tau_teacher, center=0.0):
    """LSS concept distillation: cross-entropy between the teacher's and the student's distributions
    over the concepts, softmax of cosine / tau (the teacher's sharper), mean over the batch. center:
    what is subtracted from the teacher's cosines first (DINO's centring, for a teacher that learns).

    student [B,D], teacher [B,D] (unit), concepts [K,D] (unit), center [K] or 0 -> scalar.
    """
    with torch.autocast(student.device.type, enabled=False):
        target = F.softmax((teacher.float() @ concepts.t() - center) / tau_teacher, dim=-1)  # [B,K]
        log_p = F.log_softmax(student.float() @ concepts.t() / tau_student, dim=-1)  # [B,K]
        return -(target * log_p).sum(-1).mean()


def concept_align(student, categories, descriptions, membership, tau):
    """LSS concept alignment: the description distribution implied by the student's category
    distribution (each category's mass spread evenly over its descriptions) agrees with the student's
    own description distribution (cross-entropy; both sides carry gradient).

    student [B,D] (unit), categories [C,D], descriptions [A,D] (unit), membership [C,A] 0/1 -> scalar.
    """
    with torch.autocast(student.device.type, enabled=False):
        p_category = F.softmax(student.float() @ categories.t() / tau, dim=-1)  # [B,C]
        spread = membership / membership.sum(1, keepdim=True).clamp_min(1.0)  # [C,A], rows sum to 1
        implied = p_category @ spread  # [B,A], rows sum to 1
        log_p_description = F.log_softmax(student.float() @ descriptions.t() / tau, dim=-1)  # [B,A]
        return -(implied * log_p_description).sum(-1).mean()
