"""The fine-tuning protocol: the whole network plus a linear head, trained on the labelled clips."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.students import HeadLinear, channels_last, normalize_video
from pipeline.common.precision import autocast, check_convolutions, resolve_precision
from pipeline.common.progress import progress_bar
from pipeline.distill.clips import ClipDataset
from pipeline.evaluate.backbones import video_features
from pipeline.evaluate.protocols import view_accuracies


def finetune(backbone, reader, train, test, num_classes, pre, cfg, device):
    """AdamW + one-cycle for a few epochs on training clips cut exactly like distillation clips
    (random box, flip); tested over the evaluation views. train/test: [(video id, label)]."""
    torch.manual_seed(cfg.seed)
    layout = torch.channels_last_3d  # as in distill: oneDNN's 3D convolutions are faster channels-last
    model = channels_last(nn.Sequential(backbone, HeadLinear(backbone.feature_dim, num_classes)).to(device)).train()
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16":
        check_convolutions(model)  # as in distill: layers whose bf16 weight gradients oneDNN gets wrong train in fp32
    data = ClipDataset(reader, pre.clip_len, pre.stride, pre.crop, teacher_fields=(), seed=cfg.seed,
                       crop_scale=pre.crop_scale, ids=[v for v, _ in train])
    labels = [label for _, label in train]
    steps_per_epoch = max(1, len(data) // cfg.batch_size)
    total = cfg.finetune_epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.finetune_lr, total_steps=total, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(total=total, desc="finetune", unit="step", disable=not cfg.progress)
    for epoch in range(cfg.finetune_epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        for s in range(steps_per_epoch):
            picked = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            video = torch.stack([data[(epoch, i)]["video"] for i in picked]).to(device)
            target = torch.tensor([labels[i] for i in picked], device=device)
            with autocast(precision, device):
                logits = model(normalize_video(video).contiguous(memory_format=layout))
            loss = F.cross_entropy(logits.float(), target)  # the loss in fp32, as distill's
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    logits = video_features(model, reader, [v for v, _ in test], pre, cfg.clips, cfg.crops, device,
                            cfg.batch_size, cfg.progress, "finetune test", precision)  # [N,V,C] logits
    return view_accuracies(logits, np.array([label for _, label in test]), num_classes) | {"epochs": cfg.finetune_epochs}
