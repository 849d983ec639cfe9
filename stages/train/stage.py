"""The train stage: pipeline adapter around stages/train/loop.py."""

from __future__ import annotations

import dataclasses

import torch
from matplotlib.figure import Figure

from deploypipe.data import diagonal_split, half_image_shape
from deploypipe.errors import InputError
from deploypipe.evaluation import top1_and_loss
from deploypipe.stage import StageContext, StageResult, register
from deploypipe.training import Callback, EpochLog, Evaluate, GaussianNoise, TrainBatch, Trainer, TrainOptions

from .config import SIDES, TrainConfig
from .side_input import KIND as GRID_FILL, TRANSFORM_MODULE as SIDE_INPUT_MODULE, GridFill


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


@register("train", model_input_shape=model_input_shape, distributed="ddp")
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
