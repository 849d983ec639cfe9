"""Supervised training: optimizer, learning-rate schedule, one epoch.

Plain functions on an nn.Module and an ImageSet; nothing here knows about pipelines.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.data import Augment, ImageSet, diagonal_split
from deploypipe.progress import progress


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm scales/shifts and embeddings are not weight-decayed."""
    return p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                   nesterov: bool = True) -> torch.optim.Optimizer:
    decay, plain = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(n, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise ValueError(f"unknown optimizer {name}")


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` of ``total``.

    cosine: linear warm-up over ``warmup`` steps, then half a cosine to 0.
    onecycle: cosine ramp from 1/25 to 1 over the first 30% of the steps (or ``warmup`` steps),
    then cosine down to 1/(25*1e4) — the schedule of Smith & Topin 2019 as torch's OneCycleLR
    computes it (anneal_strategy='cos', div_factor=25, final_div_factor=1e4).
    constant: 1 after warm-up.
    """
    if schedule == "onecycle":
        lo, end = 1 / 25, 1 / 25e4
        peak_step = (warmup or 0.3 * total) - 1
        if step <= peak_step:
            return _cos_anneal(lo, 1.0, step / peak_step) if peak_step > 0 else 1.0
        return _cos_anneal(1.0, end, min(1.0, (step - peak_step) / max(1e-9, total - 1 - peak_step)))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule}")


def _cos_anneal(start: float, stop: float, t: float) -> float:
    return stop + (start - stop) / 2 * (1 + math.cos(math.pi * t))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, schedule, warmup_steps))


def consistency_loss(logits: torch.Tensor, y: torch.Tensor, copies: int, weight: float, entropy_weight: float,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Jeong & Shin (2020): ``logits`` of ``copies`` noisy versions of each of B images (copy-major,
    (copies * B, K)). Mean cross-entropy over the copies + weight * mean_i KL(p_mean || p_i) +
    entropy_weight * H(p_mean), with p_mean the average of the copies' softmax."""
    k = logits.shape[-1]
    logp = F.log_softmax(logits.float(), -1).view(copies, -1, k)
    ce = F.cross_entropy(logits.float(), y.repeat(copies), label_smoothing=label_smoothing)
    p_mean = logp.exp().mean(0)
    log_mean = p_mean.clamp_min(1e-12).log()
    kl = (p_mean * (log_mean - logp)).sum(-1).mean()  # mean over copies and images
    entropy = -(p_mean * log_mean).sum(-1).mean()
    return ce + weight * kl + entropy_weight * entropy


def train_epoch(model: nn.Module, data: ImageSet, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, batch_size: int, generator: torch.Generator,
                device: torch.device, augment: Optional[Augment] = None, label_smoothing: float = 0.0,
                noise_sigma: float = 0.0, channels_last: bool = False, max_grad_norm: Optional[float] = None,
                show_progress: bool = False, description: str = "train", consistency: float = 0.0,
                copies: int = 2, entropy_weight: float = 0.5, side: Optional[int] = None,
                before_step: Optional[Callable[[], None]] = None) -> dict[str, float]:
    """One pass over ``data``; returns mean loss and top-1 on the (augmented) training batches.

    ``noise_sigma`` > 0 adds N(0, sigma^2) noise to every [0, 1] image before the model's own
    normalisation — the training that randomized smoothing needs (Cohen et al. 2019). With
    ``consistency`` > 0 each image is seen as ``copies`` noisy versions and ``consistency_loss``
    is minimised. ``side`` (0 = left, 1 = right) trains on that half of the DRS diagonal split;
    ``side`` 2 trains one model shared by both sides on both halves of every image (the batch holds
    the images' left halves, then their right halves, each with its image's label).
    ``before_step`` is called before every batch's forward pass (the sparsify stage sets its
    per-step sparsity state there).
    """
    model.train()
    total_loss, correct, n = 0.0, 0, 0
    steps = math.ceil(len(data) / batch_size)
    for x, y in progress(data.batches(batch_size, shuffle=True, generator=generator, augment=augment),
                         total=steps, description=description, enabled=show_progress):
        if before_step is not None:
            before_step()
        if side == 2:
            x, y = torch.cat(diagonal_split(x)), torch.cat([y, y])
        elif side is not None:
            x = diagonal_split(x)[side]
        m = copies if consistency > 0 else 1
        if m > 1:
            x = x.repeat(m, 1, 1, 1)
        if noise_sigma > 0:
            x = x + noise_sigma * torch.randn(x.shape, generator=generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        if m > 1:
            loss = consistency_loss(logits, y, m, consistency, entropy_weight, label_smoothing)
            logits = logits[: len(y)]
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return {"train_loss": total_loss / n, "train_top1": correct / n}
