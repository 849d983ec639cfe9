"""The train stage: pipeline adapter around stages/train/loop.py."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
from matplotlib.figure import Figure
from pydantic import Field, model_validator

from deploypipe.config import Schema
from deploypipe.data import diagonal_split, half_image_shape
from deploypipe.errors import InputError
from deploypipe.evaluation import top1_and_loss
from deploypipe.stage import StageContext, StageResult, register
from deploypipe.training import Callback, EpochLog, Evaluate, GaussianNoise, TrainBatch, Trainer, TrainOptions
from .side_input import KIND as GRID_FILL, SIDES, TRANSFORM_MODULE as SIDE_INPUT_MODULE, GridFill


class TrainConfig(Schema):
    epochs: int = Field(10, ge=1, description="passes over the training split")
    batch_size: int = Field(128, ge=1, description="images per optimizer step")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (Nesterov momentum) or AdamW")
    lr: float = Field(0.2, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="decoupled for AdamW; not applied to biases/norms")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="learning-rate schedule")
    warmup_epochs: float = Field(
        0.0, ge=0, description="linear warm-up (cosine/constant; onecycle ramps 30% by default)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    noise_sigma: float = Field(0.0, ge=0, description="Gaussian noise on [0,1] inputs (for certify); 0 = off")
    consistency: float = Field(
        0.0, ge=0,
        description="with noise_sigma: weight of the consistency regulariser (Jeong & Shin 2020; e.g. 10-20); 0 = off")
    consistency_copies: int = Field(2, ge=2, description="noisy copies per image for the consistency regulariser")
    consistency_entropy: float = Field(
        0.5, ge=0, description="weight of the entropy term of the consistency regulariser")
    drs_side: Optional[Literal["left", "right", "both"]] = Field(
        None,
        description="train a dual-randomized-smoothing base classifier on this half of the diagonal split, or (both) "
                    "one model for both halves (the model then takes C x H x W/2 images)")
    drs_input: Literal["half", "full"] = Field(
        "half",
        description="with drs_side left or right, what the network sees: half = the packed C x H x W/2 sub-image; full "
                    "= the side's pixels in their places of the C x H x W grid, each other pixel the mean of its 4 "
                    "neighbours (twice the compute; a model trained on full images keeps its features)")
    augment: bool = Field(True, description="use the data's standard augmentation (crop, flip)")
    max_grad_norm: Optional[float] = Field(None, gt=0, description="clip the gradient norm")
    eval_every: int = Field(1, ge=0, description="evaluate on the test split every N epochs (0 = only at the end)")
    channels_last: bool = Field(True, description="channels-last memory format for conv nets (faster on CPU)")
    resume: bool = Field(True, description="resume from the last per-epoch checkpoint of an interrupted run")

    @model_validator(mode="after")
    def _combinations(self) -> "TrainConfig":  # checked before a work directory is made
        if self.consistency > 0 and self.noise_sigma <= 0:
            raise ValueError("consistency needs Gaussian noise: set noise_sigma > 0 (e.g. --noise-sigma 0.25) or drop "
                             "consistency")
        if self.drs_input == "full" and self.drs_side not in SIDES:
            raise ValueError("drs_input full fills one side's grid: set drs_side left or right (one model per side) or "
                             "drop drs_input")
        return self


class _Side(torch.nn.Module):
    """Evaluates a DRS side model on full test images by splitting them first."""

    def __init__(self, model: torch.nn.Module, side: int):
        super().__init__()
        self.model, self.side = model, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(diagonal_split(x)[self.side])


def _test(scored: dict[str, torch.nn.Module], data, device: torch.device, noise_sigma: float,
          seed: int) -> dict[str, float]:
    """Top-1 and loss on the test split; for a model shared by both DRS sides, the mean over the two
    halves (each also reported), so that it compares with a side model's own figure. With Gaussian
    noise training also ``test_top1_noisy``: top-1 on the test images with one seeded draw of that
    noise, the accuracy the smoothed classifier's votes come from."""
    per = {k: top1_and_loss(m, data.test, device=device) for k, m in scored.items()}
    row = {"test_top1": sum(t for t, _ in per.values()) / len(per),
           "test_loss": sum(loss for _, loss in per.values()) / len(per)}
    if len(per) > 1:
        row.update({f"test_top1_{k}": t for k, (t, _) in per.items()})
    if noise_sigma > 0:
        row["test_top1_noisy"] = sum(top1_and_loss(m, data.test, device=device, noise_sigma=noise_sigma, seed=seed)[0]
                                     for m in scored.values()) / len(scored)
    return row


def _plot(history: list[dict]) -> Figure:
    fig = Figure(figsize=(10, 3.6))
    a, b = fig.subplots(1, 2)
    ep = [h["epoch"] for h in history]
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    tested = [h for h in history if "test_loss" in h]
    a.plot([h["epoch"] for h in tested], [h["test_loss"] for h in tested], "o-", label="test")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.plot(ep, [100 * h["train_top1"] for h in history], label="train (augmented)")
    b.plot([h["epoch"] for h in tested], [100 * h["test_top1"] for h in tested], "o-", label="test")
    noisy = [h for h in tested if "test_top1_noisy" in h]
    if noisy:
        b.plot([h["epoch"] for h in noisy], [100 * h["test_top1_noisy"] for h in noisy], "s--", label="test, noisy")
    b.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def model_input_shape(cfg: TrainConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A DRS side model is trained on C x H x W/2 half-images; otherwise on the data's images."""
    return half_image_shape(shape) if cfg.drs_side else tuple(shape)


class DrsSides(Callback):
    """Train a DRS base classifier on its half of the diagonal split (``side`` 0 left, 1 right), or
    (``side`` 2) one model on both halves of every image: the batch holds the images' left halves,
    then their right halves, each with its image's label."""

    def __init__(self, side: int):
        self.side = side

    def prepare(self, batch: TrainBatch) -> TrainBatch:
        halves = diagonal_split(batch.x)
        if self.side < 2:
            batch.x = halves[self.side]
            return batch
        batch.x, batch.y = torch.cat(halves), torch.cat([batch.y, batch.y])
        batch.rows = torch.cat([batch.rows, batch.rows + batch.global_size])
        batch.global_size *= 2
        return batch


@register("train", help="Train the model: SGD/AdamW, one-cycle/cosine, label smoothing, Gaussian-noise augmentation",
          model_input_shape=model_input_shape, distributed="ddp",
          headline=("test_top1", "test_top1_noisy", "train_seconds"))
def run(ctx: StageContext, cfg: TrainConfig) -> StageResult:
    model, data = ctx.model, ctx.data
    side = None if cfg.drs_side is None else (*SIDES, "both").index(cfg.drs_side)
    if side is not None and data.input_shape[-1] % 2:
        raise InputError(f"drs_side needs an even image width, the data has {data.input_shape[-1]}",
                         "resize the images (--image-size) or drop --drs-side")
    if isinstance(model, GridFill) and model.side != side:  # a full-grid side model stays one, of its side
        own = SIDES[model.side]
        raise InputError(f"the model is a {own} DRS side model (it fills the {own} side's grid), but drs_side is "
                         f"{cfg.drs_side or 'not set'}", f"train it with --drs-side {own}, or start from a full-image "
                                                         "model")
    fill = cfg.drs_input == "full" and not isinstance(model, GridFill)
    if fill:
        model = GridFill(model, side)  # before the optimizer, the scored sides and a resumed checkpoint
    # what the test split scores: the model, or its side(s) of each split test image
    scored = {"": model} if side is None else {
        k: _Side(model, i) for i, k in enumerate(SIDES) if side in (i, 2)}
    options = TrainOptions(
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
        label_smoothing=cfg.label_smoothing, max_grad_norm=cfg.max_grad_norm, channels_last=cfg.channels_last,
        augment=data.augment if cfg.augment else None, seed=ctx.seed, resume=cfg.resume,
        show_progress=ctx.show_progress, description="epoch")
    callbacks: list[Callback] = [DrsSides(side)] if side is not None else []
    if cfg.noise_sigma > 0:
        callbacks.append(GaussianNoise(cfg.noise_sigma, ctx.seed, cfg.consistency, cfg.consistency_copies,
                                       cfg.consistency_entropy, cfg.label_smoothing))
    callbacks += [Evaluate(lambda _m: _test(scored, data, ctx.device, cfg.noise_sigma, ctx.seed), cfg.epochs,
                           cfg.eval_every),
                  EpochLog(ctx.log_metrics, ctx.stage_id, cfg.epochs)]
    trainer = Trainer(model, options, ctx.device, callbacks, checkpoint=ctx.work_dir / "checkpoint.pt")
    history = trainer.fit(data.train)
    ctx.save_table("epochs", history)
    ctx.save_figure(_plot(history), "training_curves")
    final = history[-1]
    metrics = {"test_top1": final["test_top1"], "test_loss": final["test_loss"],
               "train_loss": final["train_loss"], "train_top1": final["train_top1"],
               "epochs": float(cfg.epochs), "train_seconds": sum(h["epoch_seconds"] for h in history),
               **{k: v for k, v in final.items() if k.startswith("test_top1_")}}  # sides, noisy
    record = None
    if side is not None:  # the model now takes half-width images
        half = list(half_image_shape(tuple(data.input_shape)))
        record = dataclasses.replace(ctx.record, input_shape=half)
        if fill:
            record = record.with_transform(GRID_FILL, SIDE_INPUT_MODULE, {"side": cfg.drs_side})
    return StageResult(model=model, record=record, metrics=metrics)
