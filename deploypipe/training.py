"""One training loop for every stage that trains (train, sparsify, distill): callbacks for what
differs, DistributedDataParallel under ``torchrun``.

    trainer = Trainer(model, TrainOptions(epochs=10, lr=0.1), callbacks=[GaussianNoise(0.25)])
    history = trainer.fit(data.train)            # an ImageSet, or any iterable of (input, target) batches

One optimizer step on an ``ImageSet``:

1. the *global* batch: the epoch's shuffle and the augmentation come from ``noise_generator(seed,
   "shuffle", epoch)``, so every rank draws the same batch;
2. this rank's contiguous share of it (all of it in a single process);
3. each callback's ``prepare`` (DRS half-images, Gaussian noise: the noise is drawn for the whole global
   batch from ``noise_generator(seed, "train", epoch, step)`` and each rank takes its rows, so a model
   trained on k ranks is the model trained in one process, up to float summation order);
4. each callback's ``before_step(step)`` (sparsify sets its masks there);
5. the loss: the first callback whose ``loss`` returns one (consistency regularisation, distillation),
   else cross-entropy; scaled by this rank's share of the global batch, so that DDP's gradient average
   is the gradient of the global batch's mean loss;
6. backward (DDP all-reduces the gradients), optional clipping, the optimizer and the schedule.

After each epoch: callbacks' ``end_of_epoch`` add metrics (every rank takes part, e.g. in a sharded
evaluation); the checkpoint is written (by rank 0, before anything is logged); then, on rank 0 only,
callbacks' ``on_epoch`` see the epoch's row (logging). A checkpoint holds the model, optimizer,
schedule, history and callbacks' state, so an interrupted run resumes to the same model.

On any other iterable of batches (a user's DataLoader) the batches are used as given: under torchrun
give each rank its own share (a DistributedSampler). BatchNorm layers use each rank's own batch
statistics on the CPU (gloo has no SyncBatchNorm); on GPUs they are synchronised.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import batches as B
from .data import Augment, ImageSet
from .distributed import active, all_reduce_sum, barrier, init_process_group, is_main_process, rank_slice
from .noise import gaussian, noise_generator
from .progress import log, progress


# --------------------------------------------------------------------------- optimizer and schedule
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
    raise ValueError(f"unknown optimizer {name!r} — fix: use sgd or adamw")


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
    raise ValueError(f"unknown schedule {schedule!r} — fix: use onecycle, cosine or constant")


def _cos_anneal(start: float, stop: float, t: float) -> float:
    return stop + (start - stop) / 2 * (1 + math.cos(math.pi * t))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, schedule, warmup_steps))


# --------------------------------------------------------------------------- options, batches, callbacks
@dataclass
class TrainOptions:
    """How to train (the stages' configs map onto this)."""

    epochs: int = 10
    batch_size: int = 128           # the global batch: split over the ranks under torchrun
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    max_grad_norm: Optional[float] = None
    channels_last: bool = False     # conv nets on the CPU run faster so
    augment: Optional[Augment] = None  # for ImageSet data: crop / flip of each global batch
    seed: int = 0
    resume: bool = True             # continue from the checkpoint when there is one
    show_progress: bool = False
    description: str = "train"


@dataclass
class TrainBatch:
    """One optimizer step's share of a batch, as the callbacks see and change it.

    ``rows`` are the positions of ``x``'s images within the global batch of ``global_size`` images
    (a callback that draws randomness for the global batch takes these rows); ``copies`` > 1 means
    ``x`` holds that many versions of each image, copy-major (``copies * len(y)`` rows)."""

    x: Any
    y: Optional[torch.Tensor]
    rows: torch.Tensor
    global_size: int
    epoch: int
    step: int
    copies: int = 1
    ids: Optional[torch.Tensor] = None  # the images' indices in the ImageSet (None for other data)


class Callback:
    """What a stage adds to the loop; every method is optional."""

    def prepare(self, batch: TrainBatch) -> TrainBatch:
        return batch

    def before_step(self, step: int) -> None:
        pass

    def loss(self, logits: torch.Tensor, batch: TrainBatch) -> Optional[torch.Tensor]:
        """The batch's mean loss, or None to leave it to the next callback (default: cross-entropy)."""
        return None

    def end_of_epoch(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """Metrics to add to the epoch's row (runs on every rank)."""
        return {}

    def on_epoch(self, row: dict[str, Any]) -> None:
        """The finished epoch's row, after its checkpoint is written (rank 0 only)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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


class GaussianNoise(Callback):
    """Gaussian noise augmentation (Cohen et al. 2019): every [0, 1] image gets N(0, sigma^2) noise
    before the model's normalisation. With ``consistency`` > 0 each image is seen as ``copies``
    noisy versions and ``consistency_loss`` is minimised (Jeong & Shin 2020)."""

    def __init__(self, sigma: float, seed: int = 0, consistency: float = 0.0, copies: int = 2,
                 entropy_weight: float = 0.5, label_smoothing: float = 0.0):
        self.sigma, self.seed = sigma, seed
        self.consistency, self.copies, self.entropy_weight = consistency, copies, entropy_weight
        self.label_smoothing = label_smoothing

    def prepare(self, batch: TrainBatch) -> TrainBatch:
        m = self.copies if self.consistency > 0 else 1
        g = noise_generator(self.seed, "train", batch.epoch, batch.step)
        x = batch.x
        noise = gaussian((m, batch.global_size, *x.shape[1:]), self.sigma, g)[:, batch.rows].to(x.device)
        batch.x = (x.unsqueeze(0) + noise).flatten(0, 1)  # copy-major
        batch.copies = m
        return batch

    def loss(self, logits: torch.Tensor, batch: TrainBatch) -> Optional[torch.Tensor]:
        if batch.copies == 1:
            return None
        return consistency_loss(logits, batch.y, batch.copies, self.consistency, self.entropy_weight,
                                self.label_smoothing)


# --------------------------------------------------------------------------- the loop
class Trainer:
    """Trains ``model`` in place (see the module docstring). ``checkpoint``: a file to write after
    every epoch and to resume from."""

    def __init__(self, model: nn.Module, options: TrainOptions, device: torch.device | str = "cpu",
                 callbacks: Iterable[Callback] = (), checkpoint: Optional[Path] = None):
        self.model, self.options = model, options
        self.device = torch.device(device)
        self.callbacks = list(callbacks)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.resumed_from = 0  # epochs read back from the checkpoint

    @property
    def resumed_seconds(self) -> float:
        """Seconds of the epochs an earlier sitting ran, read back from the checkpoint (0 when not resumed):
        a resumed run adds them to its own time to report the whole training's."""
        return sum(h["epoch_seconds"] for h in self.history[:self.resumed_from])

    def steps_per_epoch(self, data: Any) -> int:
        if isinstance(data, ImageSet):
            return math.ceil(len(data) / self.options.batch_size)
        return len(data)  # a DataLoader or a list of batches

    def fit(self, data: ImageSet | Iterable[Any]) -> list[dict[str, Any]]:
        o = self.options
        distributed = init_process_group(self.device)
        model = self.model.to(self.device)
        channels_last = o.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules())
        if channels_last:
            model.to(memory_format=torch.channels_last)
        steps = self.steps_per_epoch(data)
        self.optimizer = make_optimizer(model, o.optimizer, o.lr, o.weight_decay, o.momentum)
        self.scheduler = make_scheduler(self.optimizer, o.schedule, o.epochs * steps, round(o.warmup_epochs * steps))
        start = self._resume()
        net = model
        if distributed:
            if self.device.type == "cuda":
                net = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # shares the parameters and buffers
            ids = [self.device] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        for epoch in range(start, o.epochs):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch + 1, **self._epoch(net, data, epoch, steps, channels_last)}
            row["lr"] = self.scheduler.get_last_lr()[0]
            model.eval()
            for cb in self.callbacks:
                row.update(cb.end_of_epoch(epoch, model))
            row["epoch_seconds"] = time.perf_counter() - t0
            self.history.append(row)
            self._save(epoch + 1)
            if is_main_process():
                for cb in self.callbacks:
                    cb.on_epoch(row)
        model.to(memory_format=torch.contiguous_format).eval()
        return self.history

    def _batches(self, data: Any, epoch: int):
        o = self.options
        if isinstance(data, ImageSet):
            g = noise_generator(o.seed, "shuffle", epoch)
            batches = data.batches(o.batch_size, shuffle=True, generator=g, augment=o.augment, with_index=True)
            for i, (x, y, ids) in enumerate(batches):
                share = rank_slice(len(y))
                rows = torch.arange(len(y))[share]
                yield TrainBatch(x[share], y[share], rows, len(y), epoch, i, ids=ids[share])
        else:
            for i, batch in enumerate(data):
                n = B.batch_size(batch)
                yield TrainBatch(batch, B.target(batch), torch.arange(n), n, epoch, i)

    def _epoch(self, net: nn.Module, data: Any, epoch: int, steps: int, channels_last: bool) -> dict[str, float]:
        o = self.options
        net.train()
        world = torch.distributed.get_world_size() if active() else 1
        total_loss, correct, seen = 0.0, 0, 0
        desc = f"{o.description} {epoch + 1}/{o.epochs}"
        for batch in progress(self._batches(data, epoch), total=steps, description=desc,
                              enabled=o.show_progress and is_main_process()):
            for cb in self.callbacks:
                batch = cb.prepare(batch)
            for cb in self.callbacks:
                cb.before_step(self.step)
            x = B.to_device(batch.x, self.device)
            y = batch.y.to(self.device, non_blocking=True) if batch.y is not None else None
            batch.x, batch.y = x, y
            if channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = B.output_tensor(B.call(net, x))
            loss = next((v for v in (cb.loss(logits, batch) for cb in self.callbacks) if v is not None), None)
            if loss is None:
                if y is None:
                    raise ValueError("a training batch has no target — fix: give (input, target) batches or a "
                                     "dict with a 'labels' entry")
                loss = F.cross_entropy(logits.flatten(0, -2) if logits.dim() > 2 else logits,
                                       y.flatten() if logits.dim() > 2 else y, label_smoothing=o.label_smoothing)
            n = len(y) if y is not None else B.batch_size(x)
            scale = world * n / batch.global_size if world > 1 and batch.global_size != n else 1.0
            self.optimizer.zero_grad(set_to_none=True)
            (loss * scale).backward()
            if o.max_grad_norm:
                nn.utils.clip_grad_norm_(net.parameters(), o.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            total_loss += loss.item() * n
            seen += n
            if y is not None and logits.dim() == 2:
                correct += (logits[:n].argmax(1) == y).sum().item()
        total_loss, correct, seen = all_reduce_sum([total_loss, correct, seen])
        return {"train_loss": total_loss / max(seen, 1), "train_top1": correct / max(seen, 1)}

    # ----------------------------------------------------------------------- checkpoints
    def _save(self, epochs_done: int) -> None:
        if self.checkpoint is not None and is_main_process():
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "epoch": epochs_done, "step": self.step,
                     "history": self.history, "callbacks": [cb.state_dict() for cb in self.callbacks]}
            tmp = self.checkpoint.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint)
        barrier()

    def _resume(self) -> int:
        if self.checkpoint is None or not self.options.resume or not self.checkpoint.is_file():
            return 0
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history, self.step = state["history"], state["step"]
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            cb.load_state_dict(cb_state)
        self.resumed_from = state["epoch"]
        log(f"[{self.options.description}] resuming from the checkpoint of epoch {self.resumed_from}")
        return self.resumed_from


class Evaluate(Callback):
    """``measure(model)`` (e.g. test accuracy) after every ``every``-th epoch and after the last one
    (``every`` 0: only after the last)."""

    def __init__(self, measure: Callable[[nn.Module], dict[str, float]], epochs: int, every: int = 1):
        self.measure, self.epochs, self.every = measure, epochs, every

    def end_of_epoch(self, epoch: int, model: nn.Module) -> dict[str, float]:
        done = epoch + 1
        if done == self.epochs or (self.every and done % self.every == 0):
            return self.measure(model)
        return {}


class EpochLog(Callback):
    """Hands each finished epoch's numeric figures to ``log_metrics(metrics, step)`` (the stage's
    tracker) and prints one line per epoch."""

    def __init__(self, log_metrics: Callable[[dict[str, float], int], None], prefix: str, epochs: int):
        self.log_metrics, self.prefix, self.epochs = log_metrics, prefix, epochs

    def on_epoch(self, row: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}
        self.log_metrics(numbers, row["epoch"])
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in row.items() if k != "epoch")
        log(f"[{self.prefix}] epoch {row['epoch']}/{self.epochs}: {text}")
