"""The module stage two trains: the student backbone plus what the objective needs (distillation head,
MoDist's motion pathway, projection heads, momentum key encoders and queues, lss's concept head), and
its forward pass as a dict of named losses (pipeline/distill/losses.py)."""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn

from cache.fingerprint import sha256_file, teacher_array
from models.start import start_backbone
from models.students import HeadLinear, ProjectionHead, build_motion_pathway, build_student, normalize_video
from pipeline.common.config import objective_parts
from pipeline.distill.augment import colour_augment
from pipeline.distill.balance import (
    EMA,
    balanced_scales,
    objective_shares,
    part_norms,
    part_of,
    term_gradients,
    term_shares,
)
from pipeline.distill.losses import (
    bridged_teacher,
    concept_align,
    concept_distill,
    distill_kl,
    embed_cosine,
    info_nce,
    joint_teacher,
    teacher_targets,
)

CENTER_MOMENTUM = 0.9  # of the centres of lss's EMA teacher's concept scores: DINO's


class Distiller(nn.Module):
    """The student backbone plus whatever the objective needs: heads, motion pathway, momentum copies."""

    def __init__(self, cfg, teachers, flow_bound, momentum=0.99, concepts=None):
        """teachers: what distinit distils from, [{slot, name, weight, num_classes, embed_dim}]
        (train.distilled_teachers): one head per teacher, each on the cache's arrays of its slot."""
        super().__init__()
        self.cfg = cfg
        self.momentum = momentum  # of the key encoders: from the run's plan unless set
        self.pending_keys = None  # this step's MoDist keys, queued once the step is accepted
        self.flow_bound = flow_bound  # the cache's flow bound scales flow inputs to about [-1, 1]
        self.backbone = build_student(cfg.student)
        d = self.backbone.feature_dim
        self.parts = parts = objective_parts(cfg.objective)
        self.use_distinit, self.use_modist, self.use_lss = ("distinit" in parts), ("modist" in parts), ("lss" in parts)
        # each objective's gradient norm at the backbone's output (EMA; 0: not measured yet), for --balance grad
        self.register_buffer("part_grad_norms", torch.zeros(len(parts)))
        self.shares = {}  # {"share/<term>": ...} of the last measured step
        if self.use_lss:
            # the concept bank as fixed buffers (saved with the weights): nothing text-side runs in the loop
            for key in ("category_vectors", "description_vectors", "membership", "bridge_vectors"):
                self.register_buffer(key, torch.as_tensor(concepts[key], dtype=torch.float32))
            self.concept_head = ProjectionHead(d, dim_out=self.category_vectors.shape[1])
        # LSS self-distillation's teacher: an EMA copy of the student and its concept head
        self.ema_concepts = None
        self.pending_centers = None  # this step's mean EMA concept scores, folded in once the step is accepted
        if self.use_lss and cfg.concept_self_weight > 0:
            self.ema_concepts = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.concept_head))
            self.ema_concepts.requires_grad_(False)
            # DINO's centring: the running mean of the EMA teacher's scores, subtracted before its sharper
            # softmax. Sharpening alone collapses self-distillation onto one concept for every clip (on the
            # demo the concept KL to the image teacher rose while the self term fell to a constant's)
            self.register_buffer("center_categories", torch.zeros(len(self.category_vectors)))
            self.register_buffer("center_descriptions", torch.zeros(len(self.description_vectors)))
        self.bank = concepts["identity"] if self.use_lss else None  # which bank: saved in the checkpoint
        # a CLIP teacher's cached embeddings already live in the bank's space; an ImageNet teacher's
        # logits reach it through the bridge
        self.teacher_in_text_space = self.use_lss and concepts["identity"]["teacher_space"] == "joint"
        self.teachers = teachers if self.use_distinit else []
        for t in self.teachers:  # distill_head (the first teacher's, as in a cache of one), distill_head_<slot>
            setattr(self, teacher_array("distill_head", t["slot"]), HeadLinear(d, t["num_classes"]))
            if cfg.embed_weight > 0:
                setattr(self, teacher_array("embed_head", t["slot"]), HeadLinear(d, t["embed_dim"]))
        if self.use_modist:
            self.proj_rgb = ProjectionHead(d, dim_out=cfg.proj_dim)
            self.motion = build_motion_pathway(d)
            self.proj_flow = ProjectionHead(self.motion.feature_dim, dim_out=cfg.proj_dim)
            # MoCo-style momentum encoders: keys change slowly so the queue stays consistent
            self.key_rgb = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.proj_rgb))
            self.key_flow = nn.Sequential(copy.deepcopy(self.motion), copy.deepcopy(self.proj_flow))
            for p in list(self.key_rgb.parameters()) + list(self.key_flow.parameters()):
                p.requires_grad = False
            self.register_buffer("queue_rgb", nn.functional.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer("queue_flow", nn.functional.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer("queue_ids", torch.full((cfg.queue_size,), -1, dtype=torch.long))  # video of each key
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def backbone_copies(self):
        """The momentum copies of the backbone: MoDist's key encoder, lss's EMA teacher (those that exist)."""
        return [c[0] for c in (getattr(self, "key_rgb", None), self.ema_concepts) if c is not None]

    def train(self, mode=True):
        """nn.Module.train, except that with --bn-stats frozen the student's BatchNorm layers (and those of
        its momentum copies) keep normalising with their running statistics: a student started from an
        image network then computes exactly that network at its first step, instead of renormalising
        every layer by the statistics of a few small clips; their scale and shift still learn."""
        super().train(mode)
        if mode and self.cfg.bn_stats == "frozen":
            for net in [self.backbone] + self.backbone_copies():
                for m in net.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    @torch.no_grad()
    def start(self):
        """Set the backbone where cfg.init says (models/start.py), then everything copied from it (the
        key encoders, lss's EMA teacher) to match. A teacher head whose teacher is the very image network
        the backbone was inflated from starts as that network's classifier: the student then predicts its
        teacher from the first step, and distillation's first gradients refine the features instead of
        pulling them towards a random head (LP-FT's argument). Returns the start record."""
        record = start_backbone(self.backbone, self.cfg.student, self.cfg.init, self.cfg.init_weights)
        if "weights" in record:
            record["weights_sha256"] = sha256_file(record["weights"])
        for net in self.backbone_copies():
            net.load_state_dict(self.backbone.state_dict())
        classifier = getattr(getattr(self.backbone, "net", None), "_fc", None)
        for t in self.teachers:
            same = record["init"] == "inflate" and t.get("weights_sha256") == record["weights_sha256"] \
                and classifier is not None and classifier.out_features == t["num_classes"]
            if same:
                getattr(self, teacher_array("distill_head", t["slot"])).load_state_dict(classifier.state_dict())
                record.setdefault("heads_from_classifier", []).append(t["name"])
        self.start_record = record
        return record

    @torch.no_grad()
    def after_step(self):
        """What an accepted optimiser step is followed by: the momentum copies move towards the updated
        student, this step's keys enter the queue and its EMA concept scores lss's centres. A step skipped
        for a non-finite loss does none of it (its keys are dropped), so one bad batch cannot poison the
        queue, the centres or the key encoders. Moving the copies after the step rather than before the
        next forward is MoCo's order too."""
        self.momentum_update()
        if self.pending_keys is not None:
            self.enqueue(*self.pending_keys)
        if self.pending_centers is not None:
            for center, batch_mean in zip((self.center_categories, self.center_descriptions), self.pending_centers):
                center.mul_(CENTER_MOMENTUM).add_(all_gather(batch_mean[None]).mean(0), alpha=1 - CENTER_MOMENTUM)
        self.pending_keys = self.pending_centers = None

    def drop_step(self):
        """A skipped step: forget its keys and concept scores and put back the BatchNorm statistics its
        forward pass moved (a non-finite batch would otherwise leave NaN in them for good)."""
        self.pending_keys = self.pending_centers = None
        with torch.no_grad():
            for buffer, saved in zip(self.batchnorm_buffers(), self.saved_statistics):
                buffer.copy_(saved)

    def batchnorm_buffers(self):
        return [b for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for b in m.buffers()]

    @torch.no_grad()
    def momentum_update(self):
        """Every momentum copy (MoDist's key encoders, lss's EMA teacher) moves towards the student."""
        m, pairs = self.momentum, []
        if self.use_modist:
            pairs += [(nn.Sequential(self.backbone, self.proj_rgb), self.key_rgb),
                      (nn.Sequential(self.motion, self.proj_flow), self.key_flow)]
        if self.ema_concepts is not None:
            pairs.append((nn.Sequential(self.backbone, self.concept_head), self.ema_concepts))
        for q_mod, k_mod in pairs:  # one fused update per copy, not a Python loop over its tensors
            keys = list(k_mod.parameters())
            torch._foreach_mul_(keys, m)
            torch._foreach_add_(keys, [q.detach() for q in q_mod.parameters()], alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, k_rgb, k_flow, ids):
        k_rgb, k_flow, ids = all_gather(k_rgb), all_gather(k_flow), all_gather(ids)
        n, size = len(k_rgb), len(self.queue_rgb)
        idx = (self.queue_ptr + torch.arange(n, device=k_rgb.device)) % size
        self.queue_rgb[idx] = k_rgb.to(self.queue_rgb.dtype)
        self.queue_flow[idx] = k_flow.to(self.queue_flow.dtype)
        self.queue_ids[idx] = ids
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def compile_networks(self):
        """torch.compile every 3D network in place (parameter names unchanged, so checkpoints load either
        way); the heads and the losses stay eager."""
        for name in ("backbone", "motion", "key_rgb", "key_flow", "ema_concepts"):
            if getattr(self, name, None) is not None:
                getattr(self, name).compile()

    def video_input(self, video):
        """uint8 clips [B,3,T,H,W] -> the student's normalised input, in the model's memory layout."""
        return self.layout(normalize_video(video))

    def layout(self, x):
        """Channels-last (NDHWC) when the model is: oneDNN's 3D convolutions and BatchNorm run 1.3-1.4x
        faster that way on CPU (bench/bench_distill.py)."""
        return x.contiguous(memory_format=torch.channels_last_3d) if self.cfg.channels_last else x

    def augment(self, video):
        """Colour augmentations on the device, one draw per clip (geometry was drawn in the loader)."""
        cfg = self.cfg
        if cfg.jitter_p == cfg.grayscale_p == cfg.blur_p == 0:
            return video
        return colour_augment(video, cfg.jitter, cfg.hue, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p)

    def forward(self, batch):
        """Returns a dict of named scalar losses for one batch (already on the device)."""
        cfg, losses = self.cfg, {}
        self.saved_statistics = [b.clone() for b in self.batchnorm_buffers()]  # a few KB: put back if skipped
        video = self.augment(batch["video"]) if cfg.colour_views == "all" else batch["video"]
        feat = self.backbone(self.video_input(video))  # [B,D]
        self.features = feat  # where every term's gradient enters the backbone (measure_shares)
        for t in self.teachers:  # one term per teacher: "distinit" alone, else "distinit/<teacher>"
            slot, name = t["slot"], self.loss_name("distinit", t)
            target = teacher_targets(batch[teacher_array("teacher_logits", slot)], batch["teacher_mask"], cfg.tau,
                                     cfg.target_mode)
            losses[name] = distill_kl(getattr(self, teacher_array("distill_head", slot))(feat), target, cfg.tau)
            if cfg.embed_weight > 0:
                losses[self.loss_name("embed", t)] = embed_cosine(getattr(self, teacher_array("embed_head", slot))(feat),
                                                                  batch[teacher_array("teacher_embed", slot)],
                                                                  batch["teacher_mask"])
        if self.use_modist:
            losses.update(self.contrastive_losses(feat, batch))
        if self.use_lss:
            losses.update(self.concept_losses(feat, batch))
        return losses

    def loss_name(self, term, teacher):
        return term if len(self.teachers) == 1 else f"{term}/{teacher['name']}"

    def concept_losses(self, feat, batch):
        """LSS: the student's distributions over the bank's concepts match the teacher's (concept
        distillation), and its category distribution, carried through the membership, agrees with its
        own description distribution (concept alignment)."""
        cfg = self.cfg
        student = self.concept_head(feat)  # [B,D] unit
        teacher = (joint_teacher(batch["teacher_embed"], batch["teacher_mask"]) if self.teacher_in_text_space
                   else bridged_teacher(batch["teacher_logits"], batch["teacher_mask"], self.bridge_vectors))  # [B,D]
        vectors = (self.category_vectors, self.description_vectors)

        def distill(target, centers=(0.0, 0.0)):  # over the categories and over the descriptions
            return sum(concept_distill(student, target, v, cfg.concept_tau, cfg.concept_teacher_tau, c)
                       for v, c in zip(vectors, centers))
        losses = {"concept": distill(teacher)}
        if self.ema_concepts is not None:  # the EMA student's view of another clip of the video
            with torch.no_grad():
                video2 = self.video_input(self.augment(batch["video2"]))
                ema = shuffled_forward(self.ema_concepts, video2, cfg.shuffle_bn_groups).float()  # [B,D] unit
                self.pending_centers = [(ema @ v.t()).mean(0) for v in vectors]  # [C], [A]: after_step folds them in
            losses["concept_self"] = distill(ema, (self.center_categories, self.center_descriptions))
        if cfg.align_weight > 0:
            losses["align"] = concept_align(student, self.category_vectors, self.description_vectors, self.membership,
                                            cfg.concept_tau)
        return losses

    def contrastive_losses(self, feat, batch):
        """MoDist: the student's clip (query) against the momentum encoders' keys of another clip of
        the same video, in both modalities, with the queue as negatives."""
        cfg, ids = self.cfg, batch["index"] if self.cfg.mask_own_video else None
        q_rgb = self.proj_rgb(feat)  # [B,128]
        q_flow = self.proj_flow(self.motion(self.layout(batch["flow"].float() / self.flow_bound)))  # [B,128]
        with torch.no_grad():
            video2 = self.video_input(self.augment(batch["video2"]))
            k_rgb = shuffled_forward(self.key_rgb, video2, cfg.shuffle_bn_groups)
            k_flow = shuffled_forward(self.key_flow, self.layout(batch["flow2"].float() / self.flow_bound),
                                      cfg.shuffle_bn_groups)
        # copies: enqueue() (after the step) overwrites the buffers in place, which autograd must not see
        queue_rgb, queue_flow, queue_ids = self.queue_rgb.clone(), self.queue_flow.clone(), self.queue_ids.clone()

        def nce(query, key, queue):
            return info_nce(query, key, queue, cfg.nce_tau, ids=ids, queue_ids=queue_ids)
        losses = {"rgb_nce": nce(q_rgb, k_rgb, queue_rgb),
                  # summed, not averaged: in flow->rgb the RGB side is a key without gradient, so the
                  # student's gradient comes from rgb->flow alone and --cross-weight w gives it w
                  "cross_nce": nce(q_rgb, k_flow, queue_flow) + nce(q_flow, k_rgb, queue_rgb)}
        if cfg.flow_weight > 0:
            losses["flow_nce"] = nce(q_flow, k_flow, queue_flow)
        self.pending_keys = (k_rgb, k_flow, batch["index"])  # queued by after_step once the step is accepted
        return losses

    def term_weights(self):
        """{loss term: its weight inside its objective}; the objective's own --*-weight is its part scale."""
        cfg = self.cfg
        weights = {"rgb_nce": 1.0, "flow_nce": cfg.flow_weight, "cross_nce": cfg.cross_weight,
                   "concept": 1.0, "align": cfg.align_weight, "concept_self": cfg.concept_self_weight}
        for t in self.teachers:  # the teachers' weights sum to 1: --distinit-weight keeps its meaning
            weights[self.loss_name("distinit", t)] = t["weight"]
            weights[self.loss_name("embed", t)] = cfg.embed_weight * t["weight"]
        return weights

    def part_scales(self):
        """{objective: what its terms are multiplied by}: its --*-weight, or with --balance grad the scale
        that gives it that weight's share of the gradient reaching the backbone (balance.py)."""
        weights = torch.tensor([{"distinit": self.cfg.distinit_weight, "modist": self.cfg.modist_weight,
                                 "lss": self.cfg.lss_weight}[p] for p in self.parts])
        if self.cfg.balance == "grad" and len(self.parts) > 1:
            weights = balanced_scales(weights, self.part_grad_norms.cpu())
        return dict(zip(self.parts, weights.tolist()))

    def weighted_terms(self, losses):
        """{term: the scalar it adds to the total}."""
        within, scales = self.term_weights(), self.part_scales()
        return {k: scales[part_of(k)] * within[k] * v for k, v in losses.items()}

    def total(self, losses):
        return sum(self.weighted_terms(losses).values())

    def measure_shares(self, losses):
        """Each term's and, in a combination, each objective's share of the gradient reaching the backbone
        (for the log), and, balancing, the objectives' norms moved towards this step's. Call between forward
        and backward."""
        within = self.term_weights()
        grads = term_gradients({k: within[k] * v for k, v in losses.items()}, self.features)
        norms = part_norms(grads, self.parts).to(self.part_grad_norms.device)
        with torch.no_grad():
            seen = self.part_grad_norms > 0
            self.part_grad_norms.copy_(torch.where(seen, EMA * self.part_grad_norms + (1 - EMA) * norms, norms))
        scales = self.part_scales()
        shares = term_shares(grads, scales)
        if len(self.parts) > 1:  # one objective's share is 1
            shares |= objective_shares(norms, scales, self.parts)
        return shares


def shuffled_forward(encoder, x, groups):
    """A key encoder's forward with shuffle-BN (MoCo, section 3.3): in train mode, BatchNorm statistics
    of a batch whose order matches the queries' would let a query tell its key from the negatives.
    Under DDP the batch is shuffled across processes, as MoCo does; on one device it is permuted and
    normalised in `groups` sub-batches. Outputs come back in the input's order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, rank = dist.get_world_size(), dist.get_rank()
        x_all = all_gather(x)
        perm = torch.randperm(len(x_all), device=x.device)
        dist.broadcast(perm, src=0)
        out_all = all_gather(encoder(x_all[perm.view(world, -1)[rank]]))
        return out_all[torch.argsort(perm).view(world, -1)[rank]]
    if groups <= 1:  # one batch's statistics do not depend on its order: the permutation would be ~1 % of a step
        return encoder(x)
    perm = torch.randperm(len(x), device=x.device)
    out = torch.cat([encoder(chunk) for chunk in x[perm].chunk(groups)])
    return out[torch.argsort(perm)]


def all_gather(x):
    if not (dist.is_available() and dist.is_initialized()):
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)
