"""Post-training quantization as one call: ``quantize(model, calib, config) -> (model, report)``.

Folds batch norms, rewrites ``nn.MultiheadAttention`` into quantizable Linear layers and matmuls,
puts per-tensor quantizers on residual adds and attention matmuls (models fx can trace), wraps the
selected Conv2d / Linear layers (first and last at ``first_last_bits``), initialises the ranges on
the calibration data, optionally runs AdaQuant layer by layer, chooses per-layer precisions by
integer programming (``bit_candidates``), re-estimates BN statistics and tunes biases. Everything is
decided on the calibration data: ``evaluate``, when given, only reports (e.g. test accuracy).

Calibration data is any iterable of batches a model takes (deploypipe.batches): image tensors, (input,
target) tuples, or dicts of keyword tensors such as a Hugging Face encoder's ``input_ids`` and
``attention_mask``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from deploypipe import batches as B
from deploypipe.evaluation import storage_bytes
from deploypipe.noise import noisy_images

from .attention import convert_attention
from .bit_allocation import Allocation, allocate_bits
from .calibrate import adaquant_model, init_ranges, init_tensor_ranges
from .config import QuantizeConfig
from .mixed_precision import (VoteLoss, assemble, cost_table, layer_macs, measure_deltas, model_bops, precision_label,
                              read_latency_table)
from .modules import QuantLayer, conv_bn_pairs, fold_batchnorm, quantizable_layers, select_layers, wrap_layers
from .quantizer import FP16
from .robust_allocation import Constraint, NoFeasibleChoice, Robustness, certify_subset, search
from .tensor_ops import insert_tensor_quantizers, set_enabled, share_input_grids
from .tuning import bn_affine, guarded_reestimate_bn, tune_biases

Measure = Callable[[nn.Module], dict[str, float]]


@dataclass
class QuantizeReport:
    """What ``quantize`` did. ``plan``: each quantized layer's {w_bits, a_bits, a_signed[, sparse]};
    ``layers``: one row per quantized layer (AdaQuant's errors when it ran); ``transform``: the record
    that rebuilds the quantized structure from the FP architecture (``deploypipe.save_model``);
    ``metrics``: sizes, BOPs, calibration figures and, with ``evaluate``, its figures at each step
    (``fp_``, ``rtn_``, ``adaquant_``, ``mixed_``, ``bn_``, ``bias_`` prefixes, and unprefixed for
    the returned model)."""

    plan: dict[str, dict]
    layers: list[dict]
    transform: dict
    metrics: dict[str, float] = field(default_factory=dict)
    adaquant: list[dict] = field(default_factory=list)
    bit_allocation: list[dict] = field(default_factory=list)
    pareto: list[dict] = field(default_factory=list)
    bn_reestimation: list[dict] = field(default_factory=list)
    robust_rounds: list[dict] = field(default_factory=list)
    budget_unit: str = ""


def size_bits(model: nn.Module) -> int:
    """Deployed storage in bits, the one definition every stage and the report use
    (``deploypipe.evaluation.storage_bytes``): a quantized layer's weights at their bits with their
    32-bit per-channel scales (N:M layers compressed; FP16 at 16), its bias and input scale at 32 bits;
    every other parameter and buffer at its dtype's size."""
    return round(8 * storage_bytes(model))


class Budget:
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


def calibration_batches(calib: Any, cfg: QuantizeConfig, seed: int, device: torch.device,
                        batch_size: Optional[int] = None, sigma: Optional[float] = None,
                        stream: str = "calibrate") -> Callable[[], Iterable[B.Batch]]:
    """The calibration batches on ``device``, the same every pass; with ``calib_noise_sigma`` (or
    ``sigma``) each image gets Gaussian noise from ``noise_generator(seed, stream, its index)`` (a base
    classifier for randomized smoothing is calibrated on the noisy images it will see; the noisy
    sensitivity uses its own stream at the certification sigma)."""
    source = B.as_batches(calib, batch_size or cfg.calib_batch_size)
    sigma = cfg.calib_noise_sigma if sigma is None else sigma

    def batches() -> Iterable[B.Batch]:
        seen = 0
        for batch in source():
            if sigma > 0:
                args, _ = B.model_inputs(batch)
                if not args or not torch.is_floating_point(args[0]):
                    raise ValueError("noisy calibration (calib_noise_sigma, sensitivity noisy) adds Gaussian noise to "
                                     "image tensors; these batches hold no float tensor input — fix: calibrate this "
                                     "model on clean inputs (calib_noise_sigma 0, sensitivity clean)")
                x = noisy_images(args[0], sigma, seed, stream, range(seen, seen + len(args[0])))
                batch = x if isinstance(batch, torch.Tensor) else (x, *batch[1:])
            seen += B.batch_size(batch)
            yield B.to_device(batch, device)

    return batches


def _plan(cfg: QuantizeConfig, chosen: list[str], names: list[str]) -> dict[str, dict]:
    edge = {names[0], names[-1]}
    top = max(b for b in cfg.bit_candidates if b != FP16) if cfg.bit_candidates else cfg.weight_bits
    plan = {}
    for n in chosen:
        bits = cfg.first_last_bits if (n in edge and cfg.first_last_bits) else None
        plan[n] = {"w_bits": bits or top, "a_bits": (bits or cfg.act_bits) if cfg.act_bits else None, "a_signed": True}
    return plan


def _unsigned_inputs(fp: nn.Module, chosen: list[str], batch: B.Batch) -> dict[str, bool]:
    """{layer: whether its input was never negative on ``batch``} (after a ReLU: the unsigned grid fits)."""
    nonneg: dict[str, bool] = {}
    hooks = [fp.get_submodule(n).register_forward_hook(
        lambda _m, i, _o, n=n: nonneg.__setitem__(n, bool((i[0] >= 0).all()))) for n in chosen]
    try:
        with torch.no_grad():
            B.call(fp, batch)
    finally:
        for h in hooks:
            h.remove()
    return nonneg


@dataclass
class _Setup:
    example: Any
    input_shape: Optional[tuple]
    fp: nn.Module
    q: nn.Module
    plan: dict
    names: list[str]
    chosen: list[str]
    tensor_bits: tuple
    tensor_quant: list[dict]
    attention: list
    affine: Any
    folded: Any


def _setup(model: nn.Module, batches: Callable[[], Iterable[B.Batch]], cfg: QuantizeConfig, device: torch.device,
           sparse_layers: Optional[dict[str, str]], log: Callable[[str], None]) -> _Setup:
    """The FP model as quantize works on it (attention rewritten, BN folded, tensor quantizers
    inserted, disabled) and its quantized copy at the plan's bits (ranges not calibrated yet)."""
    example = B.first(batches)
    args, _ = B.model_inputs(example)
    input_shape = tuple(args[0].shape[1:]) if args and isinstance(args[0], torch.Tensor) else None
    fp = copy.deepcopy(model).eval().to(device)
    tensor_bits = (cfg.residual_bits, cfg.matmul_bits) if cfg.act_bits else (None, None)
    attention = convert_attention(fp, tensor_bits[1], enabled=False)  # nn.MultiheadAttention -> Linear + matmuls
    if attention:
        log(f"{len(attention)} nn.MultiheadAttention rewritten with nn.Linear projections and explicit matmuls, "
            "so they can be quantized")
    affine = bn_affine(fp, [list(p) for p in conv_bn_pairs(fp)])  # FP gamma/beta, for BN re-estimation
    folded = fold_batchnorm(fp)  # FP-equivalent; the quantized model is built on the folded graph
    tensor_quant: list[dict] = []
    if input_shape is not None:
        fp, tensor_quant = insert_tensor_quantizers(fp, input_shape, *tensor_bits, enabled=False)
    if any(tensor_bits) and not tensor_quant:
        log("fx found no residual add or activation matmul (or cannot trace the model): those stay in floating point"
            + (" (except inside the rewritten attention)" if attention else ""))
    names = [n for n, _ in quantizable_layers(fp)]
    chosen = select_layers(names, cfg.include, cfg.exclude)
    if not chosen:
        raise ValueError(f"no layer matches include={cfg.include} exclude={cfg.exclude} (the model's layers: "
                         f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}) — fix: widen include or narrow "
                         "exclude (glob patterns on those module names)")
    plan = _plan(cfg, chosen, names)
    if cfg.unsigned_activations:  # inputs that are never negative (after ReLU) get the unsigned grid
        for n, nonneg in _unsigned_inputs(fp, chosen, example).items():
            plan[n]["a_signed"] = not nonneg
    for n, pattern in (sparse_layers or {}).items():
        if n in plan:  # N:M from the sparsify stage: the zeros stay frozen through calibration
            plan[n]["sparse"] = pattern
    if any("sparse" in p for p in plan.values()):
        log(f"{sum('sparse' in p for p in plan.values())} N:M sparse layers keep their pattern")
    q = wrap_layers(copy.deepcopy(fp), plan).to(device).eval()
    set_enabled(q, True)
    return _Setup(example, input_shape, fp, q, plan, names, chosen, tensor_bits, tensor_quant, attention, affine,
                  folded)


def quantize(model: nn.Module, calib: Any, config: Optional[QuantizeConfig] = None, *, seed: int = 0,
             device: Optional[torch.device | str] = None, sparse_layers: Optional[dict[str, str]] = None,
             evaluate: Optional[Measure] = None, show_progress: bool = False,
             selection: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             log: Callable[[str], None] = lambda _msg: None) -> tuple[nn.Module, QuantizeReport]:
    """Quantize a copy of ``model`` on the calibration data ``calib``; returns it and a report.

    ``sparse_layers``: {layer: "N:M"} of an N:M-sparse model (deploypipe.sparsify's report.layers):
    those layers keep their zeros. ``evaluate(model)``: figures to report at each step (never used to
    choose anything). ``selection``: (images in [0, 1], labels) held out from the calibration data
    and the test set, certified to check ``max_acr_loss`` / ``min_certified_accuracy``
    (robust_allocation.py). ``log``: where progress lines go.

    >>> import torch
    >>> from deploypipe import quantize, QuantizeConfig
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    >>> calib = torch.randn(128, 16)
    >>> q, report = quantize(net, calib, QuantizeConfig(weight_bits=8, act_bits=8, method="rtn"))
    >>> report.plan["0"]["w_bits"], round(report.metrics["size_fraction_of_fp32"], 2)
    (8, 0.35)
    """
    cfg = config or QuantizeConfig()
    constraint = cfg.certified_constraint()
    if constraint is not None and selection is None:  # before any work
        raise ValueError(f"{'max_acr_loss' if constraint[0] == 'acr' else 'min_certified_accuracy'} certifies the "
                         "candidates on held-out images — fix: pass selection=(images, labels) from the training data "
                         "(not the calibration set, never the test set)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batches = calibration_batches(calib, cfg, seed, device)
    setup = _setup(model, batches, cfg, device, sparse_layers, log)
    example, input_shape, fp, q, plan = setup.example, setup.input_shape, setup.fp, setup.q, setup.plan
    names, chosen, tensor_bits, tensor_quant = setup.names, setup.chosen, setup.tensor_bits, setup.tensor_quant
    attention, affine, folded = setup.attention, setup.affine, setup.folded
    report = QuantizeReport(plan, [], {})
    metrics = report.metrics

    evaluating = [0.0]  # seconds inside ``evaluate``: reported apart from the calibration's own

    def timed(net: nn.Module) -> dict[str, float]:
        t = time.perf_counter()
        figures = evaluate(net)
        evaluating[0] += time.perf_counter() - t
        return figures

    def measured(prefix: str, net: nn.Module) -> None:
        if evaluate is not None:
            figures = timed(net)
            metrics.update({f"{prefix}{k}": v for k, v in figures.items()})
            metrics.update(figures)  # unprefixed: the model as it stands after this step

    t0 = time.perf_counter()
    init_ranges(fp, q, chosen, batches, cfg.weight_range, cfg.act_range, cfg.percentile)
    calibrated = init_tensor_ranges(fp, q, batches, cfg.act_range, cfg.percentile)  # inserted or inside attention
    if calibrated:
        log(f"{len(calibrated)} quantizers on residual-add / attention-matmul inputs "
            f"({cfg.residual_bits} / {cfg.matmul_bits} bits)")
    if cfg.unsigned_activations and share_input_grids(q, tensor_quant):
        log(f"{sum(r.get('signed') is False for r in tensor_quant)} residual-add inputs share the unsigned input "
            "grid of the layer that reads the same tensor")
    measured("fp_", fp)
    measured("rtn_", q)
    if cfg.method == "adaquant":
        t_step = time.perf_counter()
        report.adaquant, stats = adaquant_model(fp, q, chosen, batches, cfg.mode, cfg.adaquant_settings(),
                                                int(cfg.cache_budget_mb * 2**20), seed, show_progress)
        metrics["cache_peak_mb"] = stats.peak_bytes / 2**20
        metrics["cache_subsampled_layers"] = float(len(stats.subsampled_layers))
        metrics["adaquant_seconds"] = time.perf_counter() - t_step
        share_input_grids(q, tensor_quant)  # AdaQuant moved the layers' input scales
        measured("adaquant_", q)
    if cfg.bit_candidates:
        free = _free(cfg, chosen, names)
        sensing = batches if cfg.sensitivity == "clean" else calibration_batches(calib, cfg, seed, device,
                                                                                  sigma=cfg.sigma, stream="sensitivity")
        votes = None
        if cfg.sensitivity == "votes":  # copy j of image i: noise_generator(seed, "sensitivity-votes-j", i)
            votes = VoteLoss(fp, [calibration_batches(calib, cfg, seed, device, sigma=cfg.sigma,
                                                      stream=f"sensitivity-votes-{j}")
                                  for j in range(cfg.sensitivity_copies)])
        q = _mixed_precision(cfg, fp, q, free, plan, batches, sensing, example, seed, report,
                             timed if evaluate else None, selection, log, show_progress, votes)
        share_input_grids(q, tensor_quant)
        measured("mixed_", q)
    if cfg.bn_tuning:
        t_step = time.perf_counter()
        report.bn_reestimation, bn = guarded_reestimate_bn(q, fp, affine, batches, cfg.bn_target, cfg.bn_guard)
        metrics.update(bn)
        metrics["bn_seconds"] = time.perf_counter() - t_step
        verdict = ("kept" if bn["bn_kept"] else "undone: it did not lower") + \
            f" the calibration KL to the FP logits ({bn['bn_kl_before']:.4g} -> {bn['bn_kl_after']:.4g})"
        log(f"BN re-estimation {verdict}")
        measured("bn_", q)
    if cfg.bias_tuning:
        t_step = time.perf_counter()
        small = calibration_batches(calib, cfg, seed, device, batch_size=64)
        metrics["bias_kl_before"], metrics["bias_kl_after"] = tune_biases(fp, q, small, cfg.bias_steps, cfg.bias_lr,
                                                                          show_progress)
        metrics["bias_seconds"] = time.perf_counter() - t_step
        measured("bias_", q)
    metrics["calibration_seconds"] = time.perf_counter() - t0 - evaluating[0]
    if evaluate is not None:
        metrics["evaluation_seconds"] = evaluating[0]
    masked = [m for m in q.modules() if isinstance(m, QuantLayer) and m.weight_mask is not None]
    if masked:
        with torch.no_grad():
            for m in masked:  # pruned weights exactly zero in the stored weight too
                m.layer.weight.mul_(m.weight_mask)
        metrics["sparse_pattern_kept"] = float(all(bool((m.quantized_weight()[~m.weight_mask] == 0).all())
                                                   for m in masked))
    fp_bits, q_bits = size_bits(fp), size_bits(q)
    metrics.update({"fp32_bytes": fp_bits / 8, "quantized_bytes": q_bits / 8,
                    "size_fraction_of_fp32": q_bits / fp_bits})
    macs = layer_macs(fp, names, example)
    metrics["bops_fraction_of_fp32"] = model_bops(q, macs) / model_bops(fp, macs)
    params = {n: q.get_submodule(n).layer.weight.numel() for n in chosen}
    by_layer = {r["layer"]: r for r in report.adaquant}
    # AdaQuant's errors are for the bits it ran at (with bit_candidates: the highest candidate)
    report.layers = [{"layer": n, "params": params[n], **plan[n],
                      **{("adaquant_w_bits" if k == "w_bits" else k): v for k, v in by_layer.get(n, {}).items()
                         if k not in ("layer", "a_bits")}} for n in chosen]
    report.transform = {"attention": attention, "folded": folded, "layers": plan, "tensor_quant": tensor_quant,
                        "residual_bits": tensor_bits[0], "matmul_bits": tensor_bits[1],
                        "input_shape": list(input_shape) if input_shape else None}
    return q, report


def _budget(cfg: QuantizeConfig, fp: nn.Module, q: nn.Module, names: list[str], plan: dict,
            example: B.Batch) -> tuple[Budget, dict[str, int]]:
    """The program's cost table and constraint for the layers ``names`` (``q``: every one at the highest
    candidate), and every layer's MACs."""
    candidates = sorted(set(cfg.bit_candidates))
    params = {n: fp.get_submodule(n).weight.numel() for n in names}
    macs = layer_macs(fp, [n for n, _ in quantizable_layers(fp)], example)
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
    return Budget(cfg, cost, reference, fixed, params), macs


def _check_feasible(cfg: QuantizeConfig, budget: Budget) -> None:
    limit, smallest = getattr(cfg, budget.key), budget.smallest()
    if cfg.max_loss is None and limit < smallest:
        candidates = sorted(set(cfg.bit_candidates))
        raise ValueError(f"{budget.key} {limit} {budget.unit} is infeasible: the smallest feasible {budget.key} with "
                         f"bit_candidates {[precision_label(b) for b in candidates]} is {smallest} — fix: raise "
                         f"--{budget.key.replace('_', '-')} to at least {smallest} or add lower bit candidates")


def check_budget(model: nn.Module, calib: Any, config: QuantizeConfig,
                 sparse_layers: Optional[dict[str, str]] = None) -> None:
    """Raise the ValueError ``quantize`` would raise for a budget no allocation of ``bit_candidates``
    meets — without calibrating anything (a pipeline checks this before its first stage starts)."""
    if not config.bit_candidates:
        return
    setup = _setup(model, calibration_batches(calib, config, 0, torch.device("cpu")), config, torch.device("cpu"),
                   sparse_layers, lambda _msg: None)
    _check_feasible(config, _budget(config, setup.fp, setup.q, _free(config, setup.chosen, setup.names), setup.plan,
                                    setup.example)[0])


def _free(cfg: QuantizeConfig, chosen: list[str], names: list[str]) -> list[str]:
    """The layers whose precision the program chooses (first and last stay at first_last_bits when set)."""
    return [n for n in chosen if n not in {names[0], names[-1]} or not cfg.first_last_bits]


def _mixed_precision(cfg: QuantizeConfig, fp: nn.Module, q: nn.Module, names: list[str], plan: dict, batches,
                     sensing, example: B.Batch, seed: int, report: QuantizeReport, evaluate: Optional[Measure],
                     selection: Optional[tuple[torch.Tensor, torch.Tensor]], log: Callable[[str], None],
                     show_progress: bool = False, votes: Optional[VoteLoss] = None) -> nn.Module:
    """Measure delta-loss per (layer, precision) on the ``sensing`` batches (clean or noisy; with
    ``votes``, the drop of the top-class vote probability over noisy copies), solve the
    integer program, assemble the chosen model (re-solved under a certified constraint; with a sweep,
    every sweep budget solved on the same deltas)."""
    settings = cfg.adaquant_settings() if cfg.method == "adaquant" else None
    candidates = sorted(set(cfg.bit_candidates))
    budget, macs = _budget(cfg, fp, q, names, plan, example)
    cost, params = budget.cost, budget.params
    report.budget_unit = budget.unit
    limit = getattr(cfg, budget.key)
    _check_feasible(cfg, budget)  # known before measuring anything
    constraint = cfg.certified_constraint()
    dloss, layers = measure_deltas(fp, q, names, candidates, batches, cfg.weight_range, settings,
                                   int(cfg.cache_budget_mb * 2**20), seed, measure_batches=sensing,
                                   show_progress=show_progress, loss=votes)
    if cfg.sensitivity == "noisy":
        log(f"layer sensitivities measured on calibration images with Gaussian noise sigma {cfg.sigma}")
    elif cfg.sensitivity == "votes":
        log(f"layer sensitivities: drop of the top-class vote probability over {cfg.sensitivity_copies} noisy "
            f"copies (sigma {cfg.sigma}) of each calibration image")
    if constraint is not None:
        alloc = _certified_allocation(cfg, fp, q, dloss, layers, budget, limit, constraint, selection, seed, report,
                                      log)
    elif cfg.max_loss is None:
        alloc = allocate_bits(dloss, cost, budget=budget.to_program(limit))
    else:
        alloc = allocate_bits(dloss, cost, max_loss=cfg.max_loss)
    base, q = q, assemble(q, alloc, layers)
    if cfg.sweep:
        report.pareto = _sweep(cfg, fp, base, dloss, budget, layers, macs, evaluate, log)
    for n, bits in alloc.choice.items():
        plan[n]["w_bits"] = bits
        if bits == FP16:
            plan[n]["a_bits"] = FP16
    report.bit_allocation = [{"layer": n, "params": params[n], "macs": macs[n], "bits": alloc.choice[n],
                              "precision": precision_label(alloc.choice[n]),
                              **{f"dloss_{precision_label(b)}": dloss[n][b] for b in candidates},
                              "cost": cost[n][alloc.choice[n]], "cost_kind": cfg.cost} for n in names]
    report.metrics.update({"ip_solve_seconds": alloc.solve_seconds, "ip_predicted_dloss": alloc.delta_loss,
                           "ip_average_bits": sum(alloc.choice[n] * params[n] for n in names) / sum(params.values()),
                           f"ip_{budget.key}": budget.of(alloc.cost), f"ip_{budget.key}_asked": limit})
    log(f"mixed precision ({alloc.status}, {alloc.solve_seconds:.2f} s): {budget.key} {budget.of(alloc.cost):.4g} "
        f"{budget.unit} (asked: {limit}); bits " + " ".join(precision_label(b) for b in alloc.choice.values()))
    return q


def _certified_allocation(cfg: QuantizeConfig, fp: nn.Module, q: nn.Module, dloss: dict, layers: dict,
                          budget: Budget, limit: float, constraint: tuple, selection: tuple, seed: int,
                          report: QuantizeReport, log: Callable[[str], None]) -> Allocation:
    """The bounded re-solve loop of robust_allocation.py: the smallest program solution (from the
    user's budget up) whose certified robustness on the selection subset meets the constraint."""
    device = next(q.parameters()).device
    images, labels = selection
    images = images.to(device)
    with torch.no_grad():
        num_classes = fp(images[:1]).shape[1]

    def certify(model: nn.Module) -> Robustness:
        return certify_subset(model, images, labels, num_classes, cfg.sigma, cfg.selection_n0, cfg.selection_n,
                              cfg.selection_alpha, seed)

    kind, a, b = constraint
    reference = Constraint(kind, a, b, certify(fp))
    log(f"certified constraint on {len(labels)} selection images (n = {cfg.selection_n}): {reference.describe()}")
    solved: dict[tuple, Allocation] = {}

    def solve(value: float) -> tuple[dict, float]:
        alloc = allocate_bits(dloss, budget.cost, budget=budget.to_program(value))
        solved[tuple(sorted(alloc.choice.items()))] = alloc
        return alloc.choice, budget.of(alloc.cost)

    largest = budget.of(sum(max(c.values()) for c in budget.cost.values()))
    extra = (reference.radius,) if reference.radius is not None else ()
    fp_size = size_bits(fp)
    try:
        chosen, rounds = search(solve, lambda choice: certify(assemble(q, solved[tuple(sorted(choice.items()))],
                                                                       layers)),
                                reference, limit, max(largest, limit), cfg.max_rounds, log)
    except NoFeasibleChoice as err:
        deficit = err.args[0]
        if kind == "acr":
            best = f"its ACR loss is {a + deficit:.4f} — fix: allow --max-acr-loss {a + deficit:.4f} or more"
        else:
            best = f"its certified accuracy at r = {a:g} is {b - deficit:.3f} — fix: ask for at most {b - deficit:.3f}"
        raise ValueError(f"{reference.describe()} cannot be met on the selection subset: even at the largest "
                         f"{budget.key} ({largest:.4g} {budget.unit}) {best}, or add a higher-precision candidate "
                         "(fp16)") from None
    fp_figures = reference.reference.figures(extra)
    report.robust_rounds = [
        {"round": i + 1, budget.key: r.value, "achieved": r.achieved,
         "size_fraction_of_fp32": size_bits(assemble(q, solved[tuple(sorted(r.choice.items()))], layers)) / fp_size,
         **r.robustness.figures(extra), "acr_loss": fp_figures["acr"] - r.robustness.acr(),
         "holds": r.holds, "chosen": r is chosen, "bits": " ".join(precision_label(v) for v in r.choice.values())}
        for i, r in enumerate(rounds)]
    report.metrics.update({"robust_rounds": float(len(rounds)), **{f"selection_fp_{k}": v for k, v in
                                                                    fp_figures.items()}})
    if chosen is None:
        raise ValueError(f"{reference.describe()} is violated at {budget.key} {limit} and max_rounds "
                         f"{cfg.max_rounds} allows no re-solve — fix: raise --max-rounds (e.g. 4) or the budget")
    report.metrics.update({f"selection_{k}": v for k, v in chosen.robustness.figures(extra).items()})
    report.metrics["selection_acr_loss"] = fp_figures["acr"] - chosen.robustness.acr()
    log(f"certified constraint holds after {len(rounds)} certified model(s): {budget.key} {chosen.achieved:.4g} "
        f"{budget.unit}, selection ACR {chosen.robustness.acr():.4f} (FP {fp_figures['acr']:.4f})")
    return solved[tuple(sorted(chosen.choice.items()))]


def _sweep(cfg: QuantizeConfig, fp: nn.Module, q: nn.Module, dloss: dict, budget: Budget, layers: dict,
           macs: dict, evaluate: Optional[Measure], log: Callable[[str], None]) -> list[dict]:
    """Solve (and, with ``evaluate``, measure) every sweep budget on the measured deltas: the cost /
    accuracy front."""
    rows = []
    smallest = budget.smallest()
    fp_size, fp_bops = size_bits(fp), model_bops(fp, macs)
    for value in sorted(set(cfg.sweep)):
        if value < smallest:
            log(f"sweep: {budget.key} {value} is below the smallest feasible {smallest}; skipped")
            continue
        alloc: Allocation = allocate_bits(dloss, budget.cost, budget=budget.to_program(value))
        model = assemble(q, alloc, layers)
        rows.append({budget.key: value, "achieved": budget.of(alloc.cost),
                     "size_fraction_of_fp32": size_bits(model) / fp_size,
                     "bops_fraction_of_fp32": model_bops(model, macs) / fp_bops,
                     "average_bits": sum(alloc.choice[n] * budget.params[n] for n in dloss)
                     / sum(budget.params.values()),
                     "predicted_dloss": alloc.delta_loss, **(evaluate(model) if evaluate else {}),
                     "bits": " ".join(precision_label(alloc.choice[n]) for n in dloss)})
    return rows
