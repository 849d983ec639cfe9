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

import copy
import math
import time
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from matplotlib.figure import Figure
from pydantic import Field, field_validator, model_validator

from deploypipe.config import Schema
from deploypipe.errors import InputError
from deploypipe.evaluation import top1_and_loss
from deploypipe.progress import log
from deploypipe.stage import StageContext, StageResult, register

from .adaquant import AdaQuantSettings
from .attention import convert_attention
from .bit_allocation import InfeasibleBudget, allocate_bits
from .calibrate import adaquant_model, init_ranges, init_tensor_ranges
from .modules import (TRANSFORM_MODULE, QuantLayer, conv_bn_pairs, fold_batchnorm, quantizable_layers, select_layers,
                      wrap_layers)
from .mixed_precision import (assemble, cost_table, layer_macs, measure_deltas, model_bops, precision_label,
                              read_latency_table)
from .quantizer import FP16
from .onnx_export import export_onnx, onnx_parity
from .tensor_ops import insert_tensor_quantizers, set_enabled
from .tuning import bn_affine, guarded_reestimate_bn, tune_biases


class QuantizeConfig(Schema):
    weight_bits: int = Field(4, ge=2, le=8, description="bits of the weights (per output channel, symmetric)")
    act_bits: Optional[int] = Field(8, ge=2, le=8, description="bits of the layer inputs (per tensor); null = weight-only")
    first_last_bits: Optional[int] = Field(8, ge=2, le=8, description="bits (weights and inputs) of the first and last layer; null = like the rest")
    method: Literal["rtn", "adaquant"] = Field("adaquant", description="round-to-nearest, or AdaQuant layer-wise calibration")
    mode: Literal["parallel", "sequential"] = Field("sequential", description="AdaQuant inputs: FP (parallel) or from the quantized prefix (sequential)")
    weight_range: Literal["minmax", "percentile", "mse"] = Field("mse", description="initial weight clipping")
    act_range: Literal["minmax", "percentile", "mse"] = Field("mse", description="initial activation clipping")
    percentile: float = Field(99.99, gt=50, le=100, description="for the percentile ranges")
    residual_bits: Optional[int] = Field(8, ge=2, le=8, description="bits of both inputs of residual adds (Q/DQ as TensorRT fuses them); null = float; only with act_bits")
    matmul_bits: Optional[int] = Field(8, ge=2, le=8, description="bits of both inputs of activation matmuls (attention); null = float; only with act_bits")
    unsigned_activations: bool = Field(False, description="unsigned grids for non-negative inputs (not for TensorRT)")
    include: list[str] = Field(["*"], description="glob patterns of layer names to quantize")
    exclude: list[str] = Field([], description="glob patterns of layer names to keep in floating point")
    iters: int = Field(1000, ge=1, description="AdaQuant steps per layer")
    batch_size: int = Field(50, ge=1, description="cached samples per AdaQuant step")
    lr_weight: float = Field(1e-5, gt=0, description="AdaQuant learning rate of the weights")
    lr_bias: float = Field(1e-3, gt=0, description="AdaQuant learning rate of the biases")
    lr_weight_scale: float = Field(1e-3, gt=0, description="AdaQuant relative learning rate of the weight scales")
    lr_act_scale: float = Field(1e-2, gt=0, description="AdaQuant relative learning rate of the activation scale")
    bit_candidates: Optional[list[int]] = Field(None, description="weight precisions the integer program chooses from per layer, e.g. [2, 3, 4, 8]; fp16 (or 16) = keep the layer in FP16")
    cost: Literal["size", "bops", "latency"] = Field("size", description="with bit_candidates: what the budget limits — weight storage, bit operations (MACs x w bits x a bits), or a measured latency table")
    latency_table: Optional[str] = Field(None, description="with cost latency: CSV layer,bits,ms (bits 2..8 or fp16) measured on the target")
    budget: Optional[float] = Field(None, gt=0, le=1, description="with bit_candidates: the cost (size or BOPs) as a fraction of the FP32 model's")
    avg_bits: Optional[float] = Field(None, gt=0, le=16, description="with bit_candidates and cost size: average weight bits of the layers the program chooses for")
    max_latency_ms: Optional[float] = Field(None, gt=0, description="with bit_candidates and cost latency: total table latency of the layers the program chooses for")
    max_loss: Optional[float] = Field(None, ge=0, description="with bit_candidates: max total calibration-KL increase (minimise the cost)")
    sweep: list[float] = Field([], description="with bit_candidates: more budgets (same unit as budget / avg_bits / max_latency_ms) to solve and evaluate (pareto.csv, pareto.png)")
    bn_tuning: bool = Field(False, description="re-estimate the folded BN statistics on the quantized model")
    bn_guard: bool = Field(True, description="keep the BN re-estimation only if it lowers the calibration-set KL to the FP logits")
    bn_target: Literal["fp", "bn"] = Field("fp", description="BN re-estimation target: the FP model's measured output statistics (fp) or the BN's beta/|gamma| (bn, the paper's)")
    bias_tuning: bool = Field(False, description="train the biases towards the FP logits (KL) on the calibration set")
    bias_steps: int = Field(300, ge=1, description="bias-tuning steps")
    bias_lr: float = Field(1e-4, gt=0, description="bias-tuning learning rate (Adam)")
    export_onnx: bool = Field(True, description="write model.onnx (Q/DQ) and check it in ONNX Runtime on the test split")
    calib_batch_size: int = Field(256, ge=1, description="images per forward pass while calibrating")
    calib_noise_sigma: float = Field(0.0, ge=0, description="Gaussian noise on the [0,1] calibration images (a base classifier for randomized smoothing sees noisy inputs: calibrate on those; e.g. the train stage's noise_sigma); 0 = clean")
    cache_budget_mb: float = Field(1024, gt=0, description="memory for one layer's cached inputs+outputs (subsampled above it)")

    def adaquant_settings(self) -> AdaQuantSettings:
        return AdaQuantSettings(self.iters, self.batch_size, self.lr_weight, self.lr_bias, self.lr_weight_scale,
                                self.lr_act_scale)

    @field_validator("bit_candidates", mode="before")
    @classmethod
    def _fp16_label(cls, value):
        if isinstance(value, (list, tuple)):
            return [FP16 if str(v).strip().lower() == "fp16" else v for v in value]
        return value

    @model_validator(mode="after")
    def _mixed_precision(self) -> "QuantizeConfig":
        limits = {k: getattr(self, k) for k in ("budget", "avg_bits", "max_latency_ms", "max_loss") if getattr(self, k) is not None}
        if self.bit_candidates is not None:
            if (not self.bit_candidates or any(not (2 <= b <= 8 or b == FP16) for b in self.bit_candidates)
                    or all(b == FP16 for b in self.bit_candidates)):
                raise ValueError("bit_candidates must be weight bit widths in 2..8 (and optionally fp16), e.g. [2, 3, 4, 8]")
            if len(limits) != 1:
                raise ValueError("with bit_candidates give exactly one of budget, avg_bits, max_latency_ms or max_loss")
            if self.avg_bits is not None and self.cost != "size":
                raise ValueError("avg_bits limits weight storage: use it with cost size")
            if self.max_latency_ms is not None and self.cost != "latency":
                raise ValueError("max_latency_ms needs cost latency (and a latency_table)")
            if self.budget is not None and self.cost == "latency":
                raise ValueError("with cost latency give max_latency_ms (milliseconds), not a fraction budget")
            if self.cost == "latency":
                if not self.latency_table:
                    raise ValueError("cost latency needs latency_table: a CSV layer,bits,ms")
                if not Path(self.latency_table).is_file():
                    raise ValueError(f"latency_table '{self.latency_table}' does not exist")
        elif limits or self.sweep:
            raise ValueError(f"{', '.join(limits) or 'sweep'} need(s) bit_candidates")
        if self.cost != "latency" and self.avg_bits is None and any(not 0 < b <= 1 for b in self.sweep):
            raise ValueError("sweep budgets are fractions of the FP32 cost in (0, 1]")
        return self


def size_bits(model: torch.nn.Module) -> int:
    """Storage of the parameters: quantized weights at their bits (plus their 32-bit scales; N:M
    layers compressed), FP16 weights at 16, everything else at 32."""
    total = 0
    quantized = set()
    for m in model.modules():
        if isinstance(m, QuantLayer) and (m.w_bits or m.sparse):
            total += m.weight_storage_bits()
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


class _Budget:
    """The program's constraint in the user's unit (a fraction of the FP32 cost, average bits, or
    milliseconds) and in the program's (sum of the chosen layers' costs)."""

    def __init__(self, cfg: QuantizeConfig, cost: dict, reference: float, fixed: float, params: dict[str, int]):
        self.cost, self.reference, self.fixed, self.params = cost, reference, fixed, params
        if cfg.avg_bits is not None:
            self.key, self.unit = "avg_bits", "average weight bits"
        elif cfg.cost == "latency":
            self.key, self.unit = "max_latency_ms", "ms of table latency"
        else:
            self.key, self.unit = "budget", f"of the FP32 {'size' if cfg.cost == 'size' else 'BOPs'}"

    def to_program(self, value: float) -> float:
        if self.key == "avg_bits":
            return value * sum(self.params.values())
        if self.key == "max_latency_ms":
            return value
        return value * self.reference - self.fixed

    def of(self, program_cost: float) -> float:
        """A chosen allocation's cost in the user's unit."""
        if self.key == "avg_bits":
            return program_cost / sum(self.params.values())
        if self.key == "max_latency_ms":
            return program_cost
        return (self.fixed + program_cost) / self.reference

    def smallest(self) -> float:
        return math.ceil(self.of(sum(min(c.values()) for c in self.cost.values())) * 1e4) / 1e4


def _mixed_precision(ctx: StageContext, cfg: QuantizeConfig, fp, q, names: list[str], plan: dict, batches,
                     metrics: dict):
    """Measure delta-loss per (layer, precision), solve the integer program, assemble the chosen model."""
    settings = cfg.adaquant_settings() if cfg.method == "adaquant" else None
    candidates = sorted(set(cfg.bit_candidates))
    params = {n: fp.get_submodule(n).weight.numel() for n in names}
    macs = layer_macs(fp, [n for n, _ in quantizable_layers(fp)], ctx.data.input_shape)
    latency = read_latency_table(cfg.latency_table) if cfg.cost == "latency" else None
    cost = cost_table(cfg.cost, fp, names, candidates, {n: plan[n]["a_bits"] for n in names}, macs, latency,
                      {n: plan[n]["sparse"] for n in names if "sparse" in plan[n]})
    top = max(b for b in candidates if b != FP16)  # q has every program layer at this precision
    if cfg.cost == "size":
        reference, fixed = size_bits(fp), size_bits(q) - sum(cost[n][top] for n in names)
    elif cfg.cost == "bops":
        reference, fixed = model_bops(fp, macs), model_bops(q, macs) - sum(cost[n][top] for n in names)
    else:
        reference, fixed = float("nan"), 0.0
    budget = _Budget(cfg, cost, reference, fixed, params)
    limit = getattr(cfg, budget.key)
    smallest = budget.smallest()
    if cfg.max_loss is None and limit < smallest:  # known before measuring anything
        raise InputError(f"quantize {budget.key} {limit} {budget.unit} is infeasible: the smallest feasible "
                         f"{budget.key} with bit_candidates {[precision_label(b) for b in candidates]} is {smallest}",
                         f"raise --{budget.key.replace('_', '-')} to at least {smallest} or add lower bit candidates")
    dloss, layers = measure_deltas(fp, q, names, candidates, batches, cfg.weight_range, settings,
                                   int(cfg.cache_budget_mb * 2**20), ctx.seed)
    try:
        if cfg.max_loss is None:
            alloc = allocate_bits(dloss, cost, budget=budget.to_program(limit))
        else:
            alloc = allocate_bits(dloss, cost, max_loss=cfg.max_loss)
    except InfeasibleBudget as err:
        raise InputError(f"quantize {err.what} is infeasible: the smallest achievable is {err.smallest:.6g}",
                         f"raise --{err.what.replace('_', '-')} to at least {err.smallest:.6g}") from None
    base, q = q, assemble(q, alloc, layers)
    if cfg.sweep:
        _sweep(ctx, cfg, fp, base, dloss, budget, layers, macs, budget.of(alloc.cost))
    for n, bits in alloc.choice.items():
        plan[n]["w_bits"] = bits
        if bits == FP16:
            plan[n]["a_bits"] = FP16
    ctx.save_table("bit_allocation", [{"layer": n, "params": params[n], "macs": macs[n], "bits": alloc.choice[n],
                                       "precision": precision_label(alloc.choice[n]),
                                       **{f"dloss_{precision_label(b)}": dloss[n][b] for b in candidates},
                                       "cost": cost[n][alloc.choice[n]], "cost_kind": cfg.cost} for n in names])
    metrics.update({"ip_solve_seconds": alloc.solve_seconds, "ip_predicted_dloss": alloc.delta_loss,
                    "ip_average_bits": sum(alloc.choice[n] * params[n] for n in names) / sum(params.values()),
                    f"ip_{budget.key}": budget.of(alloc.cost)})
    metrics["mixed_top1"], metrics["mixed_test_loss"] = top1_and_loss(q, ctx.data.test, device=ctx.device)
    metrics["test_top1"], metrics["test_loss"] = metrics["mixed_top1"], metrics["mixed_test_loss"]
    log(f"[{ctx.stage_id}] mixed precision ({alloc.status}, {alloc.solve_seconds:.2f} s, {budget.key} "
        f"{budget.of(alloc.cost):.4g} {budget.unit}): {({n: precision_label(b) for n, b in alloc.choice.items()})} "
        f"-> {metrics['mixed_top1']:.4f}")
    return q


def _sweep(ctx: StageContext, cfg: QuantizeConfig, fp, q, dloss: dict, budget: _Budget, layers: dict,
           macs: dict, chosen: float) -> None:
    """Solve and evaluate every sweep budget on the measured deltas: the cost / accuracy front."""
    rows = []
    smallest = budget.smallest()
    fp_size, fp_bops = size_bits(fp), model_bops(fp, macs)
    for value in sorted(set(cfg.sweep)):
        if value < smallest:
            log(f"[{ctx.stage_id}] sweep: {budget.key} {value} is below the smallest feasible {smallest}; skipped")
            continue
        alloc = allocate_bits(dloss, budget.cost, budget=budget.to_program(value))
        model = assemble(q, alloc, layers)
        top1, loss = top1_and_loss(model, ctx.data.test, device=ctx.device)
        rows.append({budget.key: value, "achieved": budget.of(alloc.cost),
                     "size_fraction_of_fp32": size_bits(model) / fp_size,
                     "bops_fraction_of_fp32": model_bops(model, macs) / fp_bops,
                     "average_bits": sum(alloc.choice[n] * budget.params[n] for n in dloss) / sum(budget.params.values()),
                     "predicted_dloss": alloc.delta_loss, "test_top1": top1, "test_loss": loss,
                     "bits": " ".join(precision_label(alloc.choice[n]) for n in dloss)})
    ctx.save_table("pareto", rows)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["achieved"] for r in rows], [100 * r["test_top1"] for r in rows], "o-", label="IP solutions")
    fp_top1 = top1_and_loss(fp, ctx.data.test, device=ctx.device)[0]
    ax.axhline(100 * fp_top1, color="gray", linestyle="--", label="FP32")
    ax.axvline(chosen, color="tab:red", alpha=0.4, label="chosen budget")
    ax.set(xlabel=f"{budget.key} ({budget.unit})", ylabel="test top-1 (%)", title=f"mixed precision: {cfg.cost} vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ctx.save_figure(fig, "pareto")


def calibration_batches(ctx: StageContext, batch_size: int, noise_sigma: float = 0.0) -> Iterator[torch.Tensor]:
    """The calibration images in [0, 1], in order; with ``noise_sigma`` each batch gets Gaussian noise
    from a generator seeded by (seed, batch index), so every pass sees the same noisy images (AdaQuant
    compares FP and quantized outputs on them)."""
    for i, (x, _) in enumerate(ctx.data.calib.batches(batch_size)):
        if noise_sigma > 0:
            g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + i)
            x = x + noise_sigma * torch.randn(x.shape, generator=g)
        yield x


@register("quantize", help="Post-training quantization: BN folding, calibrated ranges, AdaQuant (W/A bits, first/last 8-bit)")
def run(ctx: StageContext, cfg: QuantizeConfig) -> StageResult:
    device = ctx.device
    fp = copy.deepcopy(ctx.model).eval()
    tensor_bits = (cfg.residual_bits, cfg.matmul_bits) if cfg.act_bits else (None, None)
    attention = convert_attention(fp, tensor_bits[1], enabled=False)  # nn.MultiheadAttention -> Linear + matmuls
    if attention:
        log(f"[{ctx.stage_id}] {len(attention)} nn.MultiheadAttention rewritten with nn.Linear projections "
            "and explicit matmuls, so they can be quantized")
    affine = bn_affine(fp, [list(p) for p in conv_bn_pairs(fp)])  # FP gamma/beta, for BN re-estimation
    folded = fold_batchnorm(fp)  # FP-equivalent; the quantized model is built on the folded graph
    fp, tensor_quant = insert_tensor_quantizers(fp, ctx.data.input_shape, *tensor_bits, enabled=False)
    if any(tensor_bits) and not tensor_quant:
        log(f"[{ctx.stage_id}] fx found no residual add or activation matmul (or cannot trace the model): "
            "those stay in floating point" + (" (except inside the rewritten attention)" if attention else ""))
    names = [n for n, _ in quantizable_layers(fp)]
    chosen = select_layers(names, cfg.include, cfg.exclude)
    if not chosen:
        raise InputError(f"no layer matches include={cfg.include} exclude={cfg.exclude} (the model's layers: "
                         f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''})",
                         "widen --include or narrow --exclude (glob patterns on those module names)")
    edge = {names[0], names[-1]}
    plan = {}
    for n in chosen:
        bits = cfg.first_last_bits if (n in edge and cfg.first_last_bits) else None
        w_bits = bits or (max(b for b in cfg.bit_candidates if b != FP16) if cfg.bit_candidates else cfg.weight_bits)
        plan[n] = {"w_bits": w_bits, "a_bits": (bits or cfg.act_bits) if cfg.act_bits else None, "a_signed": True}
    if cfg.unsigned_activations:  # inputs that are never negative (after ReLU) get the unsigned grid
        nonneg: dict[str, bool] = {}
        hooks = [fp.get_submodule(n).register_forward_hook(
            lambda _m, i, _o, n=n: nonneg.__setitem__(n, bool((i[0] >= 0).all()))) for n in chosen]
        with torch.no_grad():
            fp(next(iter(calibration_batches(ctx, cfg.calib_batch_size, cfg.calib_noise_sigma))).to(device))
        for h in hooks:
            h.remove()
        for n in chosen:
            plan[n]["a_signed"] = not nonneg[n]
    sparse = {n: p for t in ctx.record.transforms if t.get("kind") == "sparsify" for n, p in t["params"]["layers"].items()}
    for n in chosen:
        if n in sparse:  # N:M from the sparsify stage: the zeros stay frozen through calibration
            plan[n]["sparse"] = sparse[n]
    if any("sparse" in p for p in plan.values()):
        log(f"[{ctx.stage_id}] {sum('sparse' in p for p in plan.values())} N:M sparse layers keep their pattern")
    q = wrap_layers(copy.deepcopy(fp), plan).to(device).eval()
    set_enabled(q, True)

    def batches():
        return (x.to(device) for x in calibration_batches(ctx, cfg.calib_batch_size, cfg.calib_noise_sigma))

    t0 = time.perf_counter()
    init_ranges(fp, q, chosen, batches, cfg.weight_range, cfg.act_range, cfg.percentile)
    calibrated = init_tensor_ranges(fp, q, batches, cfg.act_range, cfg.percentile)  # inserted or inside attention
    if calibrated:
        log(f"[{ctx.stage_id}] {len(calibrated)} quantizers on residual-add / attention-matmul inputs "
            f"({cfg.residual_bits} / {cfg.matmul_bits} bits)")
    fp_top1, fp_loss = top1_and_loss(fp, ctx.data.test, device=device)
    rtn_top1, rtn_loss = top1_and_loss(q, ctx.data.test, device=device)
    base_bits = max(b for b in cfg.bit_candidates if b != FP16) if cfg.bit_candidates else cfg.weight_bits
    log(f"[{ctx.stage_id}] FP top-1 {fp_top1:.4f}; round-to-nearest W{base_bits}A{cfg.act_bits or '-float'}"
        f"{' (the base of the bit allocation)' if cfg.bit_candidates else ''}: {rtn_top1:.4f}")
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
        bn_rows, bn = guarded_reestimate_bn(q, fp, affine, batches, cfg.bn_target, cfg.bn_guard)
        ctx.save_table("bn_reestimation", bn_rows)
        metrics.update(bn)
        metrics["test_top1"], metrics["test_loss"] = metrics["bn_top1"], metrics["bn_test_loss"] = \
            top1_and_loss(q, ctx.data.test, device=device)
        verdict = ("kept" if bn["bn_kept"] else "undone: it did not lower") + \
            f" the calibration KL to the FP logits ({bn['bn_kl_before']:.4g} -> {bn['bn_kl_after']:.4g})"
        log(f"[{ctx.stage_id}] + BN re-estimation: {metrics['bn_top1']:.4f} ({verdict})")
    if cfg.bias_tuning:
        def small_batches():
            return (x.to(device) for x in calibration_batches(ctx, 64, cfg.calib_noise_sigma))

        metrics["bias_kl_before"], metrics["bias_kl_after"] = tune_biases(fp, q, small_batches, cfg.bias_steps, cfg.bias_lr)
        metrics["test_top1"], metrics["test_loss"] = metrics["bias_top1"], metrics["bias_test_loss"] = \
            top1_and_loss(q, ctx.data.test, device=device)
        log(f"[{ctx.stage_id}] + bias tuning: {metrics['bias_top1']:.4f}")
    metrics["calibration_seconds"] = time.perf_counter() - t0
    masked = [m for m in q.modules() if isinstance(m, QuantLayer) and m.weight_mask is not None]
    if masked:
        with torch.no_grad():
            for m in masked:  # pruned weights exactly zero in the stored weight too
                m.layer.weight.mul_(m.weight_mask)
        metrics["sparse_pattern_kept"] = float(all(bool((m.quantized_weight()[~m.weight_mask] == 0).all()) for m in masked))
    if cfg.export_onnx:
        path = export_onnx(q, ctx.data.input_shape, ctx.out_dir / "model.onnx")
        metrics.update(onnx_parity(q, path, ctx.data.test))
        log(f"[{ctx.stage_id}] ONNX Q/DQ export: top-1 agreement with ONNX Runtime {metrics['onnx_top1_agreement']:.4f} "
            f"(its fused integer kernels), {metrics['onnx_exact_top1_agreement']:.4f} (Q/DQ as written; max logit "
            f"diff {metrics['onnx_exact_max_abs_logit_diff']:.2e})")
        q.to(device)
    fp_bits, q_bits = size_bits(fp), size_bits(q)
    metrics.update({"fp32_bytes": fp_bits / 8, "quantized_bytes": q_bits / 8, "size_fraction_of_fp32": q_bits / fp_bits})
    macs = layer_macs(fp, [n for n, _ in quantizable_layers(fp)], ctx.data.input_shape)
    metrics["bops_fraction_of_fp32"] = model_bops(q, macs) / model_bops(fp, macs)
    params = {n: q.get_submodule(n).layer.weight.numel() for n in chosen}
    by_layer = {r["layer"]: r for r in rows}
    # AdaQuant's errors are for the bits it ran at (with bit_candidates: the highest candidate)
    ctx.save_table("layers", [{"layer": n, "params": params[n], **plan[n],
                               **{("adaquant_w_bits" if k == "w_bits" else k): v for k, v in by_layer.get(n, {}).items()
                                  if k not in ("layer", "a_bits")}}
                              for n in chosen])
    record = ctx.record.with_transform("quantize", TRANSFORM_MODULE, {"attention": attention, "folded": folded, "layers": plan, "tensor_quant": tensor_quant, "residual_bits": tensor_bits[0],
                                            "matmul_bits": tensor_bits[1], "input_shape": list(ctx.data.input_shape)})
    return StageResult(model=q.cpu(), record=record, metrics=metrics)
