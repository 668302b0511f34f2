"""Objectives on hand-computed cases."""
import math

import torch
import torch.nn.functional as F

from pipeline.distill.losses import (
    bridged_teacher,
    concept_align,
    concept_distill,
    distill_kl,
    embed_cosine,
    info_nce,
    teacher_targets,
)


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    target = torch.softmax(logits / 2.0, dim=-1)
    assert abs(float(distill_kl(logits, target, tau=2.0))) < 1e-6
    assert float(distill_kl(-logits, target, tau=2.0)) > 0.1


def test_kl_matches_a_hand_computed_value():
    # p = [0.5, 0.5], q = softmax([log 3, 0]) = [0.75, 0.25]; KL = 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25)
    target = torch.tensor([[0.5, 0.5]])
    student = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert abs(float(distill_kl(student, target, tau=1.0)) - expected) < 1e-6


def test_targets_average_only_the_real_frames():
    logits = torch.zeros(1, 3, 2)
    logits[0, 0] = torch.tensor([10.0, 0.0])   # frame says class 0
    logits[0, 1] = torch.tensor([0.0, 10.0])   # frame says class 1
    logits[0, 2] = torch.tensor([0.0, 100.0])  # padding: must be ignored
    mask = torch.tensor([[True, True, False]])
    p = teacher_targets(logits, mask, tau=1.0)
    assert torch.allclose(p, torch.tensor([[0.5, 0.5]]), atol=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        r = teacher_targets(logits, mask, tau=1.0, mode="random", generator=g)
        assert r[0].max() > 0.99 and torch.allclose(r.sum(), torch.tensor(1.0))  # one real frame's target


def test_embed_cosine_zero_when_aligned():
    teacher = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    mask = torch.tensor([[True, True]])
    assert abs(float(embed_cosine(torch.tensor([[2.0, 0.0]]), teacher, mask))) < 1e-6
    assert abs(float(embed_cosine(torch.tensor([[0.0, 1.0]]), teacher, mask)) - 1.0) < 1e-6


def test_info_nce_prefers_the_positive():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    aligned = info_nce(q, q, queue, tau=0.1)
    shuffled = info_nce(q, q.roll(1, dims=0), queue, tau=0.1)
    assert float(aligned) < 0.5 < float(shuffled)
    # with one query and one key and nothing else, the positive is certain: loss 0
    assert abs(float(info_nce(q[:1], q[:1], None, tau=0.1))) < 1e-6


def test_kl_scales_with_tau_squared():
    # at tau 2 the student's logits 2*[log 3, 0] soften to [0.75, 0.25]: the same KL as above, times tau^2
    target = torch.tensor([[0.5, 0.5]])
    student = torch.tensor([[2 * math.log(3.0), 0.0]])
    expected = 4 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert abs(float(distill_kl(student, target, tau=2.0)) - expected) < 1e-6


def test_a_negative_from_the_querys_own_video_is_masked():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    k = torch.nn.functional.normalize(q + 0.3 * torch.randn(3, 8), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    ids, queue_ids = torch.tensor([10, 11, 12]), torch.tensor([1, 2, 3, 4, 5])
    # an older key of video 11 (here: its current key) in the queue is no negative for video 11's
    # query, and still one for the others
    with_own = torch.cat([queue, k[1:2]])
    masked = info_nce(q, k, with_own, 0.1, ids=ids, queue_ids=torch.cat([queue_ids, torch.tensor([11])]))
    rows = []
    for i in range(3):
        logits = torch.cat([q[i] @ k.t(), q[i] @ with_own.t()]) / 0.1
        if i == 1:
            logits[-1] = float("-inf")
        rows.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([i])))
    assert torch.allclose(masked, torch.stack(rows).mean())
    assert info_nce(q, k, with_own, 0.1) > masked + 1e-3  # unmasked, the own key is a hard negative
    # a second clip of one video in the batch is not a negative for the other either
    twice = torch.tensor([10, 10, 12])
    expected_rows = []
    for i in range(3):
        logits = torch.cat([q[i] @ k.t(), q[i] @ queue.t()]) / 0.1
        if i < 2:
            logits[1 - i] = float("-inf")
        expected_rows.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([i])))
    assert torch.allclose(info_nce(q, k, queue, 0.1, ids=twice, queue_ids=queue_ids), torch.stack(expected_rows).mean())


def test_info_nce_is_computed_in_fp32_under_autocast():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(16, 128), dim=1)
    k = torch.nn.functional.normalize(q + 0.01 * torch.randn(16, 128), dim=1)  # cosines near 1
    queue = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
    exact = info_nce(q, k, queue, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert info_nce(q, k, queue, 0.1) == exact
        naive = torch.nn.functional.cross_entropy(torch.cat([q @ k.t(), q @ queue.t()], 1) / 0.1, torch.arange(16))
    assert naive != exact  # what bf16 logits would have done


def test_bridged_teacher_is_mean_probabilities_through_the_bridge():
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 3, 10), torch.tensor([[True, True, False], [True, False, False]])
    bridge = F.normalize(torch.randn(10, 6), dim=1)
    got = bridged_teacher(logits, mask, bridge)
    want0 = F.normalize((F.softmax(logits[0, :2], -1).mean(0) @ bridge), dim=0)
    want1 = F.normalize(F.softmax(logits[1, 0], -1) @ bridge, dim=0)
    assert torch.allclose(got, torch.stack([want0, want1]), atol=1e-6)


def test_concept_distill_is_cross_entropy_and_pulls_the_student_to_the_teacher():
    torch.manual_seed(0)
    concepts = F.normalize(torch.randn(7, 8), dim=1)
    teacher = F.normalize(torch.randn(3, 8), dim=1)
    student = F.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    loss = concept_distill(student, teacher, concepts, 0.1, 0.04)
    p_t = F.softmax(teacher @ concepts.t() / 0.04, -1)
    assert torch.allclose(loss, -(p_t * F.log_softmax(student @ concepts.t() / 0.1, -1)).sum(-1).mean())
    loss.backward()
    moved = F.normalize(student.detach() - 0.01 * student.grad, dim=1)
    assert concept_distill(moved, teacher, concepts, 0.1, 0.04) < loss
    # lower when the student stands where the teacher does than anywhere random
    assert concept_distill(teacher, teacher, concepts, 0.1, 0.04) < loss
    # a centre is subtracted from the teacher's cosines before its softmax (DINO's centring): the concept
    # every clip's teacher favours loses its lead, and a centre that is the same for every concept changes nothing
    center = (teacher @ concepts.t()).mean(0)  # [K]
    centred = concept_distill(student.detach(), teacher, concepts, 0.1, 0.04, center)
    p_c = F.softmax((teacher @ concepts.t() - center) / 0.04, -1)
    assert torch.allclose(centred, -(p_c * F.log_softmax(student.detach() @ concepts.t() / 0.1, -1)).sum(-1).mean())
    favoured = int((teacher @ concepts.t()).mean(0).argmax())
    assert p_c[:, favoured].mean() < p_t[:, favoured].mean()
    assert torch.allclose(concept_distill(student, teacher, concepts, 0.1, 0.04, torch.full((7,), 0.3)), loss)


def test_concept_align_is_lowest_when_descriptions_follow_categories():
    torch.manual_seed(0)
    membership = torch.tensor([[1., 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]])  # [C=3, A=4]
    categories, descriptions = F.normalize(torch.randn(3, 5), dim=1), F.normalize(torch.randn(4, 5), dim=1)
    student = F.normalize(torch.randn(2, 5), dim=1)
    loss = concept_align(student, categories, descriptions, membership, 0.1)
    p_c = F.softmax(student @ categories.t() / 0.1, -1)
    implied = p_c @ (membership / membership.sum(1, keepdim=True))
    assert torch.allclose(implied.sum(1), torch.ones(2))
    assert torch.allclose(loss, -(implied * F.log_softmax(student @ descriptions.t() / 0.1, -1)).sum(-1).mean())
    # cross-entropy >= the implied distribution's entropy, reached when the description side equals it
    entropy = -(implied * implied.clamp_min(1e-12).log()).sum(-1).mean()
    assert loss >= entropy - 1e-6


def test_every_loss_is_computed_in_fp32_under_bf16_autocast():
    """--precision bf16 runs the networks in bf16; the objectives must come out exactly as in fp32 (bf16
    keeps 8 bits of mantissa: a 1000-way softmax or a cosine near 1 would lose what the loss measures)."""
    torch.manual_seed(0)
    b, m, k, d = 4, 3, 1000, 16
    logits, mask = torch.randn(b, m, k), torch.tensor([[True, True, False]] * b)
    student, embeds = torch.randn(b, k), torch.randn(b, m, d)
    unit = F.normalize(torch.randn(b, d), dim=1)
    concepts, descriptions = F.normalize(torch.randn(5, d), dim=1), F.normalize(torch.randn(7, d), dim=1)
    membership = (torch.rand(5, 7) > 0.5).float()
    bridge = F.normalize(torch.randn(k, d), dim=1)
    losses = {
        "distill_kl": lambda: distill_kl(student, teacher_targets(logits, mask, 2.0), 2.0),
        "embed_cosine": lambda: embed_cosine(torch.randn(b, d, generator=torch.Generator().manual_seed(1)), embeds, mask),
        "info_nce": lambda: info_nce(unit, F.normalize(unit + 0.01, dim=1), concepts, 0.1),
        "bridged_teacher": lambda: bridged_teacher(logits, mask, bridge),
        "concept_distill": lambda: concept_distill(unit, bridged_teacher(logits, mask, bridge), concepts, 0.1, 0.04),
        "concept_align": lambda: concept_align(unit, concepts, descriptions, membership, 0.1),
    }
    for name, loss in losses.items():
        exact = loss()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_bf16 = loss()
        assert under_bf16.dtype == torch.float32 and torch.equal(under_bf16, exact), name
