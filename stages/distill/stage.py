"""The distill stage: a student trained on a pruned training set with knowledge distilled from a
teacher (pruned_kd.py), as a pipeline stage.

Outputs: ``scores.csv`` (index, file, label, score, kept), ``score_histogram.png`` (per class),
``epochs.csv`` and ``training_curves.png`` of the student, ``sweep.csv`` and ``distill.png`` (test
top-1 against the kept fraction, with and without KD) for a sweep, and the student as ``model/``.
The student's test top-1 and training seconds sit next to the teacher's test top-1 in the metrics.
"""

from __future__ import annotations

import dataclasses

import torch
from matplotlib.figure import Figure

from deploypipe.config import ModelSpec
from deploypipe.evaluation import top1_and_loss
from deploypipe.models import build_model, model_from_spec
from deploypipe.progress import log
from deploypipe.stage import StageContext, StageResult, register
from deploypipe.training import EpochLog

from .config import DistillConfig
from .pruned_kd import distill


def _score_plot(scores: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor, classes: list[str],
                what: str) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    bins = torch.linspace(float(scores.min()), float(scores.max()) + 1e-12, 31).tolist()
    for c, name in enumerate(classes):
        mine = scores[labels == c]
        if len(mine):
            ax.hist(mine.tolist(), bins=bins, histtype="step", label=name)
    ax.set(xlabel=f"{what} score (higher = harder)", ylabel="training examples",
           title=f"{what} scores per class ({len(kept)} of {len(scores)} kept)")
    ax.legend(fontsize=7, ncols=2)
    return fig


def _sweep_plot(rows: list[dict], teacher_top1: float) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for kd, style in ((True, "o-"), (False, "s--")):
        pts = sorted((r["keep"], r["test_top1"]) for r in rows if r["kd"] == kd and "test_top1" in r)
        if pts:
            ax.plot([100 * k for k, _ in pts], [100 * t for _, t in pts], style,
                    label="with KD" if kd else "without KD")
    ax.axhline(100 * teacher_top1, color="gray", linestyle=":", label="teacher (all data)")
    ax.set(xlabel="training examples kept (%)", ylabel="student test top-1 (%)", title="data pruning with KD")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _curves(history: list[dict]) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([h["epoch"] for h in history], [100 * h["train_top1"] for h in history], ".-", label="train (kept set)")
    tested = [h for h in history if "test_top1" in h]
    ax.plot([h["epoch"] for h in tested], [100 * h["test_top1"] for h in tested], "o-", label="test")
    ax.set(xlabel="epoch", ylabel="top-1 (%)", title="student")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


@register("distill", replaces_architecture=lambda cfg: cfg.student is not None)
def run(ctx: StageContext, cfg: DistillConfig) -> StageResult:
    data = ctx.data
    mean, std = data.channel_stats()
    shape, classes = tuple(data.input_shape), data.num_classes
    if cfg.teacher:
        teacher, _ = model_from_spec(ModelSpec(spec=cfg.teacher), shape, classes, mean, std)
    else:
        teacher = ctx.model
    if cfg.student:
        student, record = model_from_spec(ModelSpec(spec=cfg.student), shape, classes, mean, std)
    else:  # the teacher's architecture, fresh weights (no quantize / sparsify transforms)
        record = dataclasses.replace(ctx.record, transforms=[])
        torch.manual_seed(ctx.seed)
        student = build_model(record)
    teacher = teacher.to(ctx.device).eval()
    student = student.to(ctx.device)

    def measure(model: torch.nn.Module) -> dict[str, float]:
        top1, loss = top1_and_loss(model, data.test, device=ctx.device)
        return {"test_top1": top1, "test_loss": loss}

    teacher_top1 = measure(teacher)["test_top1"]
    model, report = distill(student, data.train, cfg, teacher=teacher if cfg.kd_weight != 0 else None,
                            device=ctx.device, seed=ctx.seed, augment=data.augment, evaluate=measure,
                            callbacks=[EpochLog(ctx.log_metrics, ctx.stage_id, cfg.epochs)],
                            checkpoint=ctx.work_dir / "checkpoint.pt", show_progress=ctx.show_progress,
                            log=lambda msg: log(f"[{ctx.stage_id}] {msg}"))
    kept = set(report.selection.indices.tolist())
    names = data.train.names or [""] * len(data.train)
    scores = report.scores.tolist() if report.scores is not None else [None] * len(data.train)
    ctx.save_table("scores", [{"index": i, "file": names[i], "label": int(data.train.labels[i]), "score": s,
                               "kept": int(i in kept)} for i, s in enumerate(scores)])
    what = "your" if cfg.scores else cfg.score
    if report.scores is not None:
        ctx.save_figure(_score_plot(report.scores, data.train.labels, report.selection.indices, data.classes, what),
                        "score_histogram")
    ctx.save_table("epochs", report.history)
    ctx.save_figure(_curves(report.history), "training_curves")
    if len(report.sweep) > 1:
        ctx.save_table("sweep", report.sweep)
        ctx.save_figure(_sweep_plot(report.sweep, teacher_top1), "distill")
    final = report.history[-1]
    metrics = {"test_top1": final["test_top1"], "test_loss": final["test_loss"], "teacher_test_top1": teacher_top1,
               **report.metrics}
    for row in report.sweep:
        if "test_top1" in row:
            metrics[f"test_top1_keep{row['keep']:g}{'' if row['kd'] else '_nokd'}"] = row["test_top1"]
    log(f"[{ctx.stage_id}] student {100 * metrics['test_top1']:.2f}% on {int(metrics['kept_examples'])} of "
        f"{len(data.train)} examples ({what}, KD weight {report.kd_weight:g}); teacher {100 * teacher_top1:.2f}%")
    return StageResult(model=model.eval(), record=record, metrics=metrics)
