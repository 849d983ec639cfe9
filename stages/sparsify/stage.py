"""The sparsify stage: train the selected layers into an N:M pattern with SR-STE, MDGF or SDGF, then
hard-mask them, verify the pattern, and write the compressed weights.

Fine-tunes the input model by default (``from_scratch`` re-initialises it first). The output model
has the same architecture with exact zeros where the pattern prunes, and a ``sparsify`` transform
record ({layer: "N:M"}) so that quantize keeps the pattern and the checker knows what to check.
"""

from __future__ import annotations

from typing import Optional

import click
import torch
from matplotlib.figure import Figure

from deploypipe.errors import InputError
from deploypipe.evaluation import top1_and_loss
from deploypipe.kernels.dispatch import interpreter_requested
from deploypipe.progress import log
from deploypipe.stage import StageContext, StageResult, register, register_command
from deploypipe.training import EpochLog

from .checker import check_path
from .config import SparsifyConfig
from .nm_training import sparsify
from .patterns import TRANSFORM_MODULE, Pattern


def _plots(history: list[dict], steps: list[dict], table: list[dict], skipped: list[dict],
           reference: dict[str, float]) -> Figure:
    fig = Figure(figsize=(15, 4))
    a, b, c = fig.subplots(1, 3)
    a.plot([s["step"] for s in steps], [s["alpha"] for s in steps], label="α (pruned-weight multiplier)")
    a.plot([s["step"] for s in steps], [s["density"] for s in steps], label="pattern density N/M")
    a.set(xlabel="optimizer step", title="sparsity schedule", ylim=(-0.05, 1.05))
    ep = [h["epoch"] for h in history]
    b.plot(ep, [100 * h["train_top1"] for h in history], ".-", label="train (augmented)")
    tested = [h for h in history if "test_top1" in h]
    b.plot([h["epoch"] for h in tested], [100 * h["test_top1"] for h in tested], "o-", label="test")
    for (label, top1), style in zip(reference.items(), ("--", ":")):  # the dense model, pruned without training
        b.axhline(100 * top1, color="gray", linestyle=style, label=f"{label} (test)")
    b.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    names = [r["layer"] for r in table + skipped]
    values = [100 * r["sparsity"] for r in table] + [0.0] * len(skipped)
    c.barh(range(len(names)), values, color=["tab:blue"] * len(table) + ["tab:gray"] * len(skipped))
    c.set_yticks(range(len(names)), names, fontsize=6)
    c.invert_yaxis()
    c.set(xlabel="zeros (%)", title="per-layer sparsity (gray: kept dense)", xlim=(0, 100))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


@click.command("check-sparsity", help="Check that a saved model folder or an ONNX file is N:M sparse; exit 1 if a "
                                      "layer breaks its pattern.")
@click.argument("path")
@click.option("--pattern", default=None, help="N:M to check (default: the patterns the model records; required for "
                                              "ONNX)")
@click.option("--layers", "layers", multiple=True, default=("*",), show_default=True, help="glob patterns of layer / "
                                                                                           "weight names")
@click.option("--json", "as_json", is_flag=True, help="print the table as JSON")
def check_sparsity(path: str, pattern: Optional[str], layers: tuple[str, ...], as_json: bool) -> None:
    import json

    try:
        rows = check_path(path, Pattern.parse(pattern) if pattern else None, layers)
    except ValueError as err:
        if not InputError.is_for_user(err):
            raise
        raise InputError.from_error(err, "check-sparsity") from None
    if not rows:
        raise InputError(f"no layer of '{path}' can hold the pattern{' ' + pattern if pattern else ''}",
                         "check --pattern and --layers (reduction sizes must be multiples of M)")
    bad = [r for r in rows if not r["ok"]]
    if as_json:
        click.echo(json.dumps({"ok": not bad, "layers": rows}))
    else:
        for r in rows:
            click.echo(f"{'ok  ' if r['ok'] else 'FAIL'} {r['layer']:<40} {r['shape']:<16} {r['pattern']:<6} "
                       f"zeros {100 * r['sparsity']:5.1f}%  groups breaking it {r['violating_groups']}/{r['groups']}")
        click.echo(f"{len(rows) - len(bad)} of {len(rows)} layers hold their pattern")
    raise SystemExit(1 if bad else 0)


register_command(check_sparsity)


@register("sparsify", help="N:M structured sparsity by training: SR-STE, mask decay (MDGF), structure decay (SDGF)",
          distributed="ddp", headline=("test_top1", "dense_top1", "sparse_layer_sparsity", "train_seconds"))
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
