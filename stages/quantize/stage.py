"""The quantize stage: fold BN, quantize the selected layers (first and last at 8 bits by default),
initialise ranges on the calibration split, optionally run AdaQuant, and hand on a model that
reloads exactly (transform record "quantize").

With ``bit_candidates`` the weight precision of every layer but the first and last is chosen by
the integer program from measured per-layer loss deltas, under a size budget (fraction of the FP32
model) or a maximum total loss increase. Then, optionally, BN re-estimation and bias tuning.
Finally the model is exported as ONNX with QuantizeLinear/DequantizeLinear (``model.onnx``) and
checked in ONNX Runtime against the PyTorch model on the test split.
Not in this stage yet (see the quantize issue): BOPs / latency-table costs, the "keep FP16"
candidate, budget sweeps with a Pareto plot, Q/DQ on residual adds.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Literal, Optional

import torch
from matplotlib.figure import Figure
from pydantic import Field, model_validator

from deploypipe.config import Schema
from deploypipe.errors import InputError
from deploypipe.evaluation import top1_and_loss
from deploypipe.progress import log
from deploypipe.stage import StageContext, StageResult, register

from .adaquant import AdaQuantSettings
from .bit_allocation import InfeasibleBudget, allocate_bits
from .calibrate import adaquant_model, init_ranges
from .modules import (TRANSFORM_MODULE, QuantLayer, conv_bn_pairs, fold_batchnorm, quantizable_layers, select_layers,
                      wrap_layers)
from .mixed_precision import assemble, measure_deltas, weight_costs
from .onnx_export import export_onnx, onnx_parity
from .tuning import bn_affine, reestimate_bn, tune_biases


class QuantizeConfig(Schema):
    weight_bits: int = Field(4, ge=2, le=8, description="bits of the weights (per output channel, symmetric)")
    act_bits: Optional[int] = Field(8, ge=2, le=8, description="bits of the layer inputs (per tensor); null = weight-only")
    first_last_bits: Optional[int] = Field(8, ge=2, le=8, description="bits (weights and inputs) of the first and last layer; null = like the rest")
    method: Literal["rtn", "adaquant"] = Field("adaquant", description="round-to-nearest, or AdaQuant layer-wise calibration")
    mode: Literal["parallel", "sequential"] = Field("sequential", description="AdaQuant inputs: FP (parallel) or from the quantized prefix (sequential)")
    weight_range: Literal["minmax", "percentile", "mse"] = Field("mse", description="initial weight clipping")
    act_range: Literal["minmax", "percentile", "mse"] = Field("mse", description="initial activation clipping")
    percentile: float = Field(99.99, gt=50, le=100, description="for the percentile ranges")
    unsigned_activations: bool = Field(False, description="unsigned grids for non-negative inputs (not for TensorRT)")
    include: list[str] = Field(["*"], description="glob patterns of layer names to quantize")
    exclude: list[str] = Field([], description="glob patterns of layer names to keep in floating point")
    iters: int = Field(1000, ge=1, description="AdaQuant steps per layer")
    batch_size: int = Field(50, ge=1, description="cached samples per AdaQuant step")
    lr_weight: float = Field(1e-5, gt=0, description="AdaQuant learning rate of the weights")
    lr_bias: float = Field(1e-3, gt=0, description="AdaQuant learning rate of the biases")
    lr_weight_scale: float = Field(1e-3, gt=0, description="AdaQuant relative learning rate of the weight scales")
    lr_act_scale: float = Field(1e-2, gt=0, description="AdaQuant relative learning rate of the activation scale")
    bit_candidates: Optional[list[int]] = Field(None, description="weight bits to choose from per layer by integer programming, e.g. [2, 3, 4, 8]")
    budget: Optional[float] = Field(None, gt=0, le=1, description="with bit_candidates: model size as a fraction of FP32")
    max_loss: Optional[float] = Field(None, ge=0, description="with bit_candidates: max total calibration-KL increase (minimise size)")
    sweep: list[float] = Field([], description="with bit_candidates: more size budgets to solve and evaluate (pareto.csv, pareto.png)")
    bn_tuning: bool = Field(False, description="re-estimate the folded BN statistics on the quantized model")
    bias_tuning: bool = Field(False, description="train the biases towards the FP logits (KL) on the calibration set")
    bias_steps: int = Field(300, ge=1, description="bias-tuning steps")
    bias_lr: float = Field(1e-4, gt=0, description="bias-tuning learning rate (Adam)")
    export_onnx: bool = Field(True, description="write model.onnx (Q/DQ) and check it in ONNX Runtime on the test split")
    calib_batch_size: int = Field(256, ge=1, description="images per forward pass while calibrating")
    cache_budget_mb: float = Field(1024, gt=0, description="memory for one layer's cached inputs+outputs (subsampled above it)")

    def adaquant_settings(self) -> AdaQuantSettings:
        return AdaQuantSettings(self.iters, self.batch_size, self.lr_weight, self.lr_bias, self.lr_weight_scale,
                                self.lr_act_scale)

    @model_validator(mode="after")
    def _mixed_precision(self) -> "QuantizeConfig":
        if self.bit_candidates is not None:
            if not self.bit_candidates or any(not 2 <= b <= 8 for b in self.bit_candidates):
                raise ValueError("bit_candidates must be weight bit widths in 2..8, e.g. [2, 3, 4, 8]")
            if (self.budget is None) == (self.max_loss is None):
                raise ValueError("with bit_candidates give exactly one of budget or max_loss")
        elif self.budget is not None or self.max_loss is not None or self.sweep:
            raise ValueError("budget, max_loss and sweep need bit_candidates")
        if any(not 0 < b <= 1 for b in self.sweep):
            raise ValueError("sweep budgets are fractions of the FP32 size in (0, 1]")
        return self


def size_bits(model: torch.nn.Module) -> int:
    """Storage of the parameters: quantized weights at their bits, everything else at 32."""
    total = 0
    quantized = set()
    for m in model.modules():
        if isinstance(m, QuantLayer) and m.w_bits:
            total += m.w_bits * m.layer.weight.numel() + 32 * m.weight_scale.numel()
            quantized.add(id(m.layer.weight))
    total += sum(32 * p.numel() for p in model.parameters() if id(p) not in quantized and p.ndim > 0)
    return total


def _mse_plot(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(max(6, 0.3 * len(rows)), 3.6))
    ax = fig.subplots()
    xs = range(len(rows))
    ax.semilogy(xs, [r["mse_rtn"] for r in rows], "o-", label="round-to-nearest")
    ax.semilogy(xs, [r["mse_adaquant"] for r in rows], "o-", label="AdaQuant")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=7)
    ax.set(ylabel="output MSE vs FP", title="per-layer quantization error")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _mixed_precision(ctx: StageContext, cfg: QuantizeConfig, fp, q, names: list[str], plan: dict, batches,
                     metrics: dict):
    """Measure delta-loss per (layer, bits), solve the integer program, assemble the chosen model."""
    settings = cfg.adaquant_settings() if cfg.method == "adaquant" else None
    candidates = sorted(set(cfg.bit_candidates))
    cost = weight_costs(fp, names, candidates)
    fp_bits = size_bits(fp)
    fixed = size_bits(q) - sum(cost[n][max(candidates)] for n in names)  # everything the program does not choose
    smallest = math.ceil((fixed + sum(min(c.values()) for c in cost.values())) / fp_bits * 1e4) / 1e4
    if cfg.budget is not None and cfg.budget < smallest:  # known before measuring anything
        raise InputError(f"quantize budget {cfg.budget} of the FP32 size is infeasible: the smallest feasible "
                         f"budget with bit_candidates {candidates} is {smallest}",
                         f"raise --budget to at least {smallest} or add lower bit candidates")
    dloss, layers = measure_deltas(fp, q, names, candidates, batches, cfg.weight_range, settings,
                                   int(cfg.cache_budget_mb * 2**20), ctx.seed)
    try:
        if cfg.budget is not None:
            alloc = allocate_bits(dloss, cost, budget=cfg.budget * fp_bits - fixed)
        else:
            alloc = allocate_bits(dloss, cost, max_loss=cfg.max_loss)
    except InfeasibleBudget as err:
        raise InputError(f"quantize {err.what} is infeasible: the smallest achievable is {err.smallest:.6g}",
                         f"raise --{err.what.replace('_', '-')} to at least {err.smallest:.6g}") from None
    base, q = q, assemble(q, alloc, layers)
    if cfg.sweep:
        _sweep(ctx, cfg, fp, base, dloss, cost, layers, fp_bits, fixed, smallest, size_bits(q) / fp_bits)
    params = {n: fp.get_submodule(n).weight.numel() for n in names}
    for n, bits in alloc.choice.items():
        plan[n]["w_bits"] = bits
    ctx.save_table("bit_allocation", [{"layer": n, "params": params[n], "bits": alloc.choice[n],
                                       **{f"dloss_w{b}": dloss[n][b] for b in candidates},
                                       "cost_bits": cost[n][alloc.choice[n]]} for n in names])
    metrics.update({"ip_solve_seconds": alloc.solve_seconds, "ip_predicted_dloss": alloc.delta_loss,
                    "ip_average_bits": alloc.cost / sum(params.values())})
    metrics["mixed_top1"], metrics["mixed_test_loss"] = top1_and_loss(q, ctx.data.test, device=ctx.device)
    metrics["test_top1"], metrics["test_loss"] = metrics["mixed_top1"], metrics["mixed_test_loss"]
    log(f"[{ctx.stage_id}] mixed precision ({alloc.status}, {alloc.solve_seconds:.2f} s): "
        f"{dict(alloc.choice)} -> {metrics['mixed_top1']:.4f}")
    return q


def _sweep(ctx: StageContext, cfg: QuantizeConfig, fp, q, dloss: dict, cost: dict, layers: dict, fp_bits: float,
           fixed: float, smallest: float, chosen_fraction: float) -> None:
    """Solve and evaluate every sweep budget on the measured deltas: the size / accuracy front."""
    rows = []
    for budget in sorted(set(cfg.sweep)):
        if budget < smallest:
            log(f"[{ctx.stage_id}] sweep: budget {budget} is below the smallest feasible {smallest}; skipped")
            continue
        alloc = allocate_bits(dloss, cost, budget=budget * fp_bits - fixed)
        model = assemble(q, alloc, layers)
        top1, loss = top1_and_loss(model, ctx.data.test, device=ctx.device)
        rows.append({"budget": budget, "size_fraction_of_fp32": size_bits(model) / fp_bits,
                     "predicted_dloss": alloc.delta_loss, "test_top1": top1, "test_loss": loss,
                     "bits": " ".join(str(alloc.choice[n]) for n in dloss)})
    ctx.save_table("pareto", rows)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["size_fraction_of_fp32"] for r in rows], [100 * r["test_top1"] for r in rows], "o-", label="IP solutions")
    fp_top1 = top1_and_loss(fp, ctx.data.test, device=ctx.device)[0]
    ax.axhline(100 * fp_top1, color="gray", linestyle="--", label="FP32")
    ax.axvline(chosen_fraction, color="tab:red", alpha=0.4, label="chosen budget")
    ax.set(xlabel="model size / FP32 size", ylabel="test top-1 (%)", title="mixed precision: size vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ctx.save_figure(fig, "pareto")


@register("quantize", help="Post-training quantization: BN folding, calibrated ranges, AdaQuant (W/A bits, first/last 8-bit)")
def run(ctx: StageContext, cfg: QuantizeConfig) -> StageResult:
    device = ctx.device
    fp = copy.deepcopy(ctx.model).eval()
    affine = bn_affine(fp, [list(p) for p in conv_bn_pairs(fp)])  # FP gamma/beta, for BN re-estimation
    folded = fold_batchnorm(fp)  # FP-equivalent; the quantized model is built on the folded graph
    names = [n for n, _ in quantizable_layers(fp)]
    chosen = select_layers(names, cfg.include, cfg.exclude)
    if not chosen:
        raise ValueError(f"no layer matches include={cfg.include} exclude={cfg.exclude}; layers: {names[:8]}...")
    edge = {names[0], names[-1]}
    plan = {}
    for n in chosen:
        bits = cfg.first_last_bits if (n in edge and cfg.first_last_bits) else None
        w_bits = bits or (max(cfg.bit_candidates) if cfg.bit_candidates else cfg.weight_bits)
        plan[n] = {"w_bits": w_bits, "a_bits": (bits or cfg.act_bits) if cfg.act_bits else None, "a_signed": True}
    if cfg.unsigned_activations:  # inputs that are never negative (after ReLU) get the unsigned grid
        nonneg: dict[str, bool] = {}
        hooks = [fp.get_submodule(n).register_forward_hook(
            lambda _m, i, _o, n=n: nonneg.__setitem__(n, bool((i[0] >= 0).all()))) for n in chosen]
        with torch.no_grad():
            fp(next(iter(ctx.data.calib.batches(cfg.calib_batch_size)))[0].to(device))
        for h in hooks:
            h.remove()
        for n in chosen:
            plan[n]["a_signed"] = not nonneg[n]
    q = wrap_layers(copy.deepcopy(fp), plan).to(device).eval()

    def batches():
        return (x.to(device) for x, _ in ctx.data.calib.batches(cfg.calib_batch_size))

    t0 = time.perf_counter()
    init_ranges(fp, q, chosen, batches, cfg.weight_range, cfg.act_range, cfg.percentile)
    fp_top1, fp_loss = top1_and_loss(fp, ctx.data.test, device=device)
    rtn_top1, rtn_loss = top1_and_loss(q, ctx.data.test, device=device)
    log(f"[{ctx.stage_id}] FP top-1 {fp_top1:.4f}; round-to-nearest W{cfg.weight_bits}A{cfg.act_bits}: {rtn_top1:.4f}")
    metrics = {"fp_top1": fp_top1, "rtn_top1": rtn_top1, "fp_test_loss": fp_loss, "rtn_test_loss": rtn_loss}
    rows = []
    if cfg.method == "adaquant":
        rows, stats = adaquant_model(fp, q, chosen, batches, cfg.mode, cfg.adaquant_settings(), int(cfg.cache_budget_mb * 2**20),
                                     ctx.seed, ctx.show_progress)
        metrics["adaquant_top1"], metrics["adaquant_test_loss"] = top1_and_loss(q, ctx.data.test, device=device)
        metrics["cache_peak_mb"] = stats.peak_bytes / 2**20
        metrics["cache_subsampled_layers"] = float(len(stats.subsampled_layers))
        log(f"[{ctx.stage_id}] AdaQuant ({cfg.mode}): {metrics['adaquant_top1']:.4f}")
        ctx.save_figure(_mse_plot(rows), "layer_mse")
    metrics["test_top1"] = metrics.get("adaquant_top1", rtn_top1)
    metrics["test_loss"] = metrics.get("adaquant_test_loss", rtn_loss)
    if cfg.bit_candidates:
        free = [n for n in chosen if n not in edge or not cfg.first_last_bits]  # layers the program chooses for
        q = _mixed_precision(ctx, cfg, fp, q, free, plan, batches, metrics)
    if cfg.bn_tuning:
        ctx.save_table("bn_reestimation", reestimate_bn(q, affine, batches))
        metrics["test_top1"], metrics["test_loss"] = metrics["bn_top1"], metrics["bn_test_loss"] = \
            top1_and_loss(q, ctx.data.test, device=device)
        log(f"[{ctx.stage_id}] + BN re-estimation: {metrics['bn_top1']:.4f}")
    if cfg.bias_tuning:
        def small_batches():
            return (x.to(device) for x, _ in ctx.data.calib.batches(64))

        metrics["bias_kl_before"], metrics["bias_kl_after"] = tune_biases(fp, q, small_batches, cfg.bias_steps, cfg.bias_lr)
        metrics["test_top1"], metrics["test_loss"] = metrics["bias_top1"], metrics["bias_test_loss"] = \
            top1_and_loss(q, ctx.data.test, device=device)
        log(f"[{ctx.stage_id}] + bias tuning: {metrics['bias_top1']:.4f}")
    metrics["calibration_seconds"] = time.perf_counter() - t0
    if cfg.export_onnx:
        path = export_onnx(q, ctx.data.input_shape, ctx.out_dir / "model.onnx")
        metrics.update(onnx_parity(q, path, ctx.data.test))
        log(f"[{ctx.stage_id}] ONNX Q/DQ export: top-1 agreement with ONNX Runtime "
            f"{metrics['onnx_top1_agreement']:.4f}, max logit diff {metrics['onnx_max_abs_logit_diff']:.2e}")
        q.to(device)
    fp_bits, q_bits = size_bits(fp), size_bits(q)
    metrics.update({"fp32_bytes": fp_bits / 8, "quantized_bytes": q_bits / 8, "size_fraction_of_fp32": q_bits / fp_bits})
    params = {n: q.get_submodule(n).layer.weight.numel() for n in chosen}
    by_layer = {r["layer"]: r for r in rows}
    # AdaQuant's errors are for the bits it ran at (with bit_candidates: the highest candidate)
    ctx.save_table("layers", [{"layer": n, "params": params[n], **plan[n],
                               **{("adaquant_w_bits" if k == "w_bits" else k): v for k, v in by_layer.get(n, {}).items()
                                  if k not in ("layer", "a_bits")}}
                              for n in chosen])
    record = ctx.record.with_transform("quantize", TRANSFORM_MODULE, {"folded": folded, "layers": plan})
    return StageResult(model=q.cpu(), record=record, metrics=metrics)
