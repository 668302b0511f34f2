"""Which loss term drives the student: each term's share of the backbone's gradient, and the part
scales that give each objective (distinit, modist, lss) its weight's share of it (`--balance grad`).

Why by the gradient and not by the loss: the terms live on different scales (a KL near 0.3, InfoNCE
near log(queue)), and what moves the backbone is their gradients there. In `distinit+modist` from
random weights the contrastive terms' backbone gradient was ~60x the KL's, so after clipping the update
was almost all MoDist's and the objects were lost; a fixed --distinit-weight only traded one for the
other (BENCHMARKS.md, "Objectives that add up"). Balancing rescales each objective so the backbone
gets them in the asked proportion.

Where it is measured: at the backbone's output. Every term reaches the backbone's weights through its
pooled features [B,D] (the heads, the projection, lss's concept head sit above them), so the gradient a
term sends into the features is what it asks of the backbone; measuring it costs a backward pass
through the small heads only, every step (GradNorm measures at the last shared layer for the same
reason). A term that never reaches the features (flow<->flow trains the motion pathway) has share 0.
"""
import torch
import torch.distributed as dist

# which objective a loss term belongs to ("distinit/<teacher>" and "embed/<teacher>" too)
TERM_PART = {"distinit": "distinit", "embed": "distinit", "rgb_nce": "modist", "cross_nce": "modist",
             "flow_nce": "modist", "concept": "lss", "align": "lss", "concept_self": "lss"}
# of the measured norms, per step: smooths one batch's noise over ~10 steps. It lags a growing gradient
# (distinit's: 0.55-0.65 of two objectives), but scaling by each step's own norms, which gives exact
# shares, lost 8 object and 6 motion points on validation (BENCHMARKS.md, "Objectives that add up")
EMA = 0.9


def part_of(term):
    return TERM_PART[term.split("/")[0]]


def term_gradients(weighted_terms, feat):
    """{term: d term / d features [B,D]}, each term alone (zeros for one that does not reach them).

    weighted_terms: {name: scalar loss, already weighted}; feat: the backbone's output [B,D]."""
    grads = {}
    for name, loss in weighted_terms.items():
        g = torch.autograd.grad(loss, feat, retain_graph=True, allow_unused=True)[0] if loss.requires_grad else None
        grads[name] = torch.zeros_like(feat, dtype=torch.float32) if g is None else g.detach().float()
    return grads


def part_norms(grads, parts):
    """[P] norms of each part's summed feature gradient, in `parts` order, averaged over DDP ranks (so
    every rank computes the same scales)."""
    def norm(gs):
        return torch.stack(gs).sum(0).norm().cpu() if gs else torch.zeros(())
    norms = torch.stack([norm([g for name, g in grads.items() if part_of(name) == part]) for part in parts])
    if dist.is_available() and dist.is_initialized():
        norms = norms.to(next(iter(grads.values())).device)
        dist.all_reduce(norms)
        norms = norms.cpu() / dist.get_world_size()
    return norms


def term_shares(grads, scales):
    """{"share/<term>": its part of the summed norms of every term's scaled feature gradient}: which term
    drives the run. scales: {part: what its terms are multiplied by beyond their weight inside it}."""
    sizes = {name: scales[part_of(name)] * float(g.norm()) for name, g in grads.items()}
    total = sum(sizes.values()) or 1.0
    return {f"share/{name}": size / total for name, size in sizes.items()}


def objective_shares(norms, scales, parts):
    """{"objective_share/<objective>": its part of the summed norms of every objective's scaled feature
    gradient}: what --balance grad evens out (smoothed). Summing its terms' shares instead would overstate
    an objective whose terms pull against each other (lss's concept and align terms): what moves the
    backbone is their sum. norms [P] (this step's, unscaled, in `parts` order), scales {part: scale}."""
    sizes = [scales[part] * float(n) for part, n in zip(parts, norms)]
    total = sum(sizes) or 1.0
    return {f"objective_share/{part}": size / total for part, size in zip(parts, sizes)}


def balanced_scales(weights, norms):
    """Scales s_p such that part p's backbone gradient s_p * n_p is the share w_p / sum(w) of the total
    sum(n): the total gradient keeps its size, its direction takes the asked mix.

    weights [P] (the parts' --*-weight), norms [P] (EMA of each part's unscaled feature gradient norm)
    -> [P]. A part not measured yet (norm 0) keeps its weight."""
    if (norms <= 0).any():
        return weights
    return weights / weights.sum() * norms.sum() / norms
