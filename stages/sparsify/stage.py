"""The sparsify stage: train the selected layers into an N:M pattern with SR-STE, MDGF or SDGF, then
hard-mask them, verify the pattern, and write the compressed weights.

Fine-tunes the input model by default (``from_scratch`` re-initialises it first). The output model
has the same architecture with exact zeros where the pattern prunes, and a ``sparsify`` transform
record ({layer: "N:M"}) so that quantize keeps the pattern and the checker knows what to check.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from deploypipe.errors import InputError
from deploypipe.evaluation import top1_and_loss
from deploypipe.kernels.dispatch import interpreter_requested
from deploypipe.progress import log
from deploypipe.stage import StageContext, StageResult, register
from deploypipe.training import EpochLog

from .config import SparsifyConfig
from .nm_training import sparsify
from .patterns import TRANSFORM_MODULE, Pattern


def _plots(history: list[dict], steps: list[dict], table: list[dict], skipped: list[dict],
           reference: dict[str, float]) -> Figure:
    fig = Figure(figsize=(15, 4))
    a, b, c = fig.subplots(1, 3)
    a.plot([s["step"] for s in steps], [s["alpha"] for s in steps], label="α (pruned-weight multiplier)")
    a.plot([s["step"] for s in steps], [s["density"] for s in steps], label="pattern density N/M")
    a.set(xlabel="optimizer step", ylabel="value", title="sparsity schedule", ylim=(-0.05, 1.05))
    ep = [h["epoch"] for h in history]
    b.plot(ep, [100 * h["train_top1"] for h in history], ".-", label="train (augmented)")
    tested = [h for h in history if "test_top1" in h]
    b.plot([h["epoch"] for h in tested], [100 * h["test_top1"] for h in tested], "o-", label="test")
    for (label, top1), style in zip(reference.items(), ("--", ":")):  # the dense model, pruned without training
        b.axhline(100 * top1, color="gray", linestyle=style, label=f"{label} (test)")
    b.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    names = [r["layer"] for r in table + skipped]
    c.barh(range(len(table)), [100 * r["sparsity"] for r in table], color="tab:blue", label="N:M sparse")
    kept = range(len(table), len(names))  # a dense layer has no zeros: a light full-width band says so
    c.barh(kept, [100] * len(skipped), color="lightgray", label="kept dense (0% zeros)")
    for i, r in zip(kept, skipped):
        c.text(2, i, f"dense: {r['reason']}", va="center", fontsize=6)
    c.set_yticks(range(len(names)), names, fontsize=6)
    c.invert_yaxis()
    c.set(xlabel="zeros (%)", ylabel="layer", title="per-layer sparsity", xlim=(0, 100))
    c.legend(fontsize=7, loc="lower right")
    from matplotlib.ticker import MaxNLocator

    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


@register("sparsify", distributed="ddp")
def run(ctx: StageContext, cfg: SparsifyConfig) -> StageResult:
    if cfg.kernels == "triton" and ctx.device.type != "cuda" and not interpreter_requested():
        raise InputError("--kernels triton on CPU runs Triton's interpreter, which needs TRITON_INTERPRET=1 "
                         "in the environment", "set TRITON_INTERPRET=1 (slow), or use --kernels auto on CPU")

    def measure(model: torch.nn.Module) -> dict[str, float]:
        top1, loss = top1_and_loss(model, ctx.data.test, device=ctx.device)
        return {"test_top1": top1, "test_loss": loss}

    model, report = sparsify(ctx.model, ctx.data.train, cfg, device=ctx.device, seed=ctx.seed, evaluate=measure,
                             augment=ctx.data.augment, callbacks=[EpochLog(ctx.log_metrics, ctx.stage_id, cfg.epochs)],
                             checkpoint=ctx.work_dir / "checkpoint.pt", show_progress=ctx.show_progress,
                             log=lambda msg: log(f"[{ctx.stage_id}] {msg}"))
    m = report.metrics
    target = Pattern.parse(cfg.pattern)
    metrics = {"dense_top1": m["dense_test_top1"], "dense_test_loss": m["dense_test_loss"],
               "oneshot_top1": m["oneshot_test_top1"], "test_top1": m["test_top1"], "test_loss": m["test_loss"],
               "top1_change": m["test_top1"] - m["dense_test_top1"],
               **{k: v for k, v in m.items() if not k.startswith(("dense_test", "oneshot_test", "test_"))}}
    log(f"[{ctx.stage_id}] {target} {cfg.recipe.upper()}: top-1 {metrics['test_top1']:.4f} (dense "
        f"{metrics['dense_top1']:.4f} {metrics['top1_change']:+.4f}; pruned to {target} without training "
        f"{metrics['oneshot_top1']:.4f})")
    ctx.save_table("layers", report.table + [{"layer": r["layer"], "reason": r["reason"], "ok": True}
                                             for r in report.kept_dense])
    ctx.save_table("epochs", report.history)
    reference = {"dense": metrics["dense_top1"], "pruned, no training": metrics["oneshot_top1"]}
    ctx.save_figure(_plots(report.history, report.trace, report.table, report.kept_dense, reference), "sparsity")
    torch.save(report.compressed, ctx.out_dir / "compressed_weights.pt")
    record = ctx.record.with_transform("sparsify", TRANSFORM_MODULE, {"layers": report.layers})
    return StageResult(model=model, record=record, metrics=metrics)
