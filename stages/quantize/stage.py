"""The quantize stage: fold BN, quantize the selected layers (first and last at 8 bits by default),
initialise ranges on the calibration split, optionally run AdaQuant, and hand on a model that
reloads exactly (transform record "quantize").

Residual adds and attention matmuls get per-tensor quantizers on both inputs (tensor_ops.py), as
TensorRT's explicit quantization expects.

With ``bit_candidates`` (weight bits 2..8, and "fp16" = keep the layer in half precision) the
precision of every layer but the first and last is chosen by the integer program from measured
per-layer loss deltas, under a budget on the size (fraction of FP32, or average bits), the BOPs
(fraction of FP32) or a measured latency table (ms), or under a maximum total loss increase; a sweep
of budgets gives the Pareto front. Then, optionally, BN re-estimation and bias tuning. Finally the
model is exported as ONNX with QuantizeLinear/DequantizeLinear (``model.onnx``) and checked in ONNX
Runtime against the PyTorch model on the test split.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from deploypipe.evaluation import top1_and_loss
from deploypipe.onnx_export import export_onnx, onnx_parity
from deploypipe.progress import log
from deploypipe.stage import Preflight, StageContext, StageResult, register

from .config import QuantizeConfig
from .modules import TRANSFORM_MODULE
from .ptq import check_budget, quantize
from .quantizer import FP16


def _mse_plot(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(max(6, 0.3 * len(rows)), 3.6))
    ax = fig.subplots()
    xs = range(len(rows))
    ax.semilogy(xs, [r["mse_rtn"] for r in rows], "o-", label="round-to-nearest")
    ax.semilogy(xs, [r["mse_adaquant"] for r in rows], "o-", label="AdaQuant")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=7)
    ax.set(xlabel="layer (input side first)", ylabel="output MSE vs FP (calibration set)",
           title="per-layer quantization error")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _pareto_plot(rows: list[dict], fp_top1: float, chosen: float, key: str, unit: str, cost: str) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["achieved"] for r in rows], [100 * r["test_top1"] for r in rows], "o-", label="IP solutions")
    ax.axhline(100 * fp_top1, color="gray", linestyle="--", label="FP32")
    ax.axvline(chosen, color="tab:red", alpha=0.4, label="chosen budget")
    ax.set(xlabel=f"{key} ({unit})", ylabel="test top-1 (%)", title=f"mixed precision: {cost} vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _rounds_plot(rows: list[dict], unit: str) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for holds, marker, label in ((True, "o", "constraint holds"), (False, "x", "constraint violated")):
        pts = [r for r in rows if r["holds"] == holds]
        ax.scatter([r["achieved"] for r in pts], [r["acr"] for r in pts], marker=marker, label=label, zorder=3)
    for r in rows:
        ax.annotate(f"round {r['round']}" + (" (chosen)" if r["chosen"] else ""), (r["achieved"], r["acr"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(rows[0]["acr"] + rows[0]["acr_loss"], color="gray", linestyle="--", label="FP32 ACR")
    ax.set(xlabel=f"achieved budget ({unit})", ylabel="ACR on the selection subset",
           title="certified-constraint rounds (selection subset of the training data)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def preflight(cfg: QuantizeConfig, pre: Preflight) -> None:
    """Before the pipeline's first stage: enough held-out images for a certified constraint, and a
    budget that some allocation meets (on the pipeline's input model, when this stage gets its
    architecture and no N:M sparsity or quantization comes in between)."""
    if cfg.certified_constraint() is not None:
        _check_selection_size(len(pre.data.held_out(cfg.selection_images, 0)))
    if (pre.model is None or {"sparsify", "quantize"} & set(pre.earlier_stages)
            or any(t.get("kind") == "quantize" for t in pre.record.transforms)):
        return
    calib = pre.data.calib.images[:cfg.calib_batch_size]
    check_budget(pre.model, pre.data.calib.as_float(calib), cfg, _sparse_layers(pre.record))


def _check_selection_size(count: int) -> None:
    if count < 10:
        raise ValueError(f"only {count} training images lie outside the calibration set: too few to certify "
                         "the bit allocation on — fix: lower the data's calib_size or use more training data")


def _sparse_layers(record) -> dict[str, str]:
    return {n: p for t in record.transforms if t.get("kind") == "sparsify" for n, p in t["params"]["layers"].items()}


@register("quantize", preflight=preflight)
def run(ctx: StageContext, cfg: QuantizeConfig) -> StageResult:
    def measure(model: torch.nn.Module) -> dict[str, float]:
        top1, loss = top1_and_loss(model, ctx.data.test, device=ctx.device)
        return {"top1": top1, "test_loss": loss}

    sparse = _sparse_layers(ctx.record)
    calib = ((x, y) for x, y in ctx.data.calib.batches(cfg.calib_batch_size))
    selection = None
    if cfg.certified_constraint() is not None:  # held out from calibration, never the test split
        held = ctx.data.held_out(cfg.selection_images, ctx.seed)
        _check_selection_size(len(held))
        selection = (held.as_float(held.images), held.labels)
    q, report = quantize(ctx.model, list(calib), cfg, seed=ctx.seed, device=ctx.device, sparse_layers=sparse,
                         evaluate=measure, show_progress=ctx.show_progress, selection=selection,
                         log=lambda msg: log(f"[{ctx.stage_id}] {msg}"))
    metrics = dict(report.metrics)
    metrics["test_top1"] = metrics.pop("top1")
    bits = max(b for b in cfg.bit_candidates if b != FP16) if cfg.bit_candidates else cfg.weight_bits
    log(f"[{ctx.stage_id}] top-1: FP {metrics['fp_top1']:.4f}; round-to-nearest W{bits}A{cfg.act_bits or '-float'} "
        f"{metrics['rtn_top1']:.4f}" + "".join(f"; {name} {metrics[k + '_top1']:.4f}" for k, name in (
            ("adaquant", f"AdaQuant ({cfg.mode})"), ("mixed", "mixed precision"), ("bn", "+ BN re-estimation"),
            ("bias", "+ bias tuning")) if f"{k}_top1" in metrics))
    if report.adaquant:
        ctx.save_figure(_mse_plot(report.adaquant), "layer_mse")
    if report.bit_allocation:
        ctx.save_table("bit_allocation", report.bit_allocation)
    if report.pareto:
        rows = [{**{k: v for k, v in r.items() if k != "top1"}, "test_top1": r["top1"]} for r in report.pareto]
        ctx.save_table("pareto", rows)
        key = next(k for k in ("budget", "avg_bits", "max_latency_ms") if k in rows[0])
        ctx.save_figure(_pareto_plot(rows, metrics["fp_top1"], metrics[f"ip_{key}"], key, report.budget_unit, cfg.cost),
                        "pareto")
    if report.robust_rounds:
        ctx.save_table("robust_rounds", report.robust_rounds)
        for row in report.robust_rounds:  # one MLflow step per certified model
            ctx.log_metrics({k: float(v) for k, v in row.items() if k not in ("round", "bits", "chosen", "holds")}
                            | {"round_holds": float(row["holds"])}, step=row["round"])
        ctx.save_figure(_rounds_plot(report.robust_rounds, report.budget_unit), "robust_rounds")
    if report.bn_reestimation:
        ctx.save_table("bn_reestimation", report.bn_reestimation)
    if cfg.export_onnx:
        path = export_onnx(q, ctx.data.input_shape, ctx.out_dir / "model.onnx")
        metrics.update(onnx_parity(q, path, ctx.data.test))
        log(f"[{ctx.stage_id}] ONNX Q/DQ export: top-1 agreement with ONNX Runtime "
            f"{metrics['onnx_top1_agreement']:.4f} "
            f"(its fused integer kernels), {metrics['onnx_exact_top1_agreement']:.4f} (Q/DQ as written; max logit "
            f"diff {metrics['onnx_exact_max_abs_logit_diff']:.2e})")
        q.to(ctx.device)
    ctx.save_table("layers", report.layers)
    record = ctx.record.with_transform("quantize", TRANSFORM_MODULE, report.transform)
    return StageResult(model=q.cpu(), record=record, metrics=metrics)
