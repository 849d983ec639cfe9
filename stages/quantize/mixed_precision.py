"""Mixed precision: measure each layer's loss increase at each candidate precision, then choose one
precision per layer with the integer program (bit_allocation.py).

Delta-loss (Hubara et al. 2021, §4): start from the model with every candidate layer at the highest
candidate precision; swap *only* layer l to precision p (its own calibration at p: ranges, and
AdaQuant in parallel mode on full-precision inputs); measure the calibration loss; subtract the
base loss. The calibration set is unlabeled, so the loss is KL(softmax(FP logits) || softmax(quantized
logits)). Candidates are weight bit widths (2..8); the layer's input bits stay as in the base model.

Cost is the storage of the layer's weights in bits (bits x parameters).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adaquant import AdaQuantSettings, adaquant_layer
from .bit_allocation import Allocation
from .calibrate import CacheStats, capture, fit_budget, relu_followers
from .modules import QuantLayer, replace_module
from .quantizer import RANGE_METHODS

@torch.no_grad()
def calibration_kl(fp: nn.Module, q: nn.Module, batches: Callable[[], Iterable[torch.Tensor]]) -> float:
    total, n = 0.0, 0
    for x in batches():
        total += F.kl_div(F.log_softmax(q(x), 1), F.log_softmax(fp(x), 1), log_target=True, reduction="sum").item()
        n += len(x)
    return total / max(n, 1)


def _layer_at(fp_layer: nn.Module, base: QuantLayer, bits: int, weight_range: str) -> QuantLayer:
    """A fresh quantized copy of the FP layer with weights at ``bits`` (inputs as in the base)."""
    q = QuantLayer(copy.deepcopy(fp_layer), bits, base.a_bits, base.a_signed)
    with torch.no_grad():
        q.weight_scale.copy_(RANGE_METHODS[weight_range](q.layer.weight, bits, axis=0))
        q.act_scale.copy_(base.act_scale)
    return q


def measure_deltas(fp: nn.Module, q_base: nn.Module, names: list[str], candidates: list[int],
                   batches: Callable[[], Iterable[torch.Tensor]], weight_range: str = "mse",
                   settings: Optional[AdaQuantSettings] = None, cache_budget_bytes: int = 1 << 30,
                   seed: int = 0) -> tuple[dict, dict]:
    """Delta-loss table {layer: {bits: dloss}} and the calibrated layer for every (layer, bits)."""
    top = max(candidates)
    base_loss = calibration_kl(fp, q_base, batches)
    relus = relu_followers(fp)
    g = torch.Generator().manual_seed(seed)
    stats = CacheStats()
    dloss: dict[str, dict[int, float]] = {}
    layers: dict[tuple[str, int], nn.Module] = {}
    for name in names:
        base = q_base.get_submodule(name)
        dloss[name] = {top: 0.0}
        layers[name, top] = base
        x = y = None
        for bits in candidates:
            if bits == top:
                continue
            cand = _layer_at(fp.get_submodule(name), base, bits, weight_range)
            if settings is not None:
                if x is None:  # cached once per layer, reused for every precision
                    x, y = capture(fp, name, batches)
                    x, y = fit_budget(x, F.relu(y) if name in relus else y, cache_budget_bytes, name, stats, g)
                adaquant_layer(cand, x, y, relu=name in relus, settings=settings, generator=g)
            replace_module(q_base, name, cand)
            dloss[name][bits] = calibration_kl(fp, q_base, batches) - base_loss
            replace_module(q_base, name, base)
            layers[name, bits] = cand
    return dloss, layers


def weight_costs(fp: nn.Module, names: list[str], candidates: list[int]) -> dict[str, dict[int, float]]:
    return {n: {b: float(b * fp.get_submodule(n).weight.numel()) for b in candidates} for n in names}


def assemble(q_base: nn.Module, allocation: Allocation, layers: dict) -> nn.Module:
    """A copy of the base model with each layer at its chosen precision."""
    model = copy.deepcopy(q_base)
    for name, bits in allocation.choice.items():
        replace_module(model, name, copy.deepcopy(layers[name, bits]))
    return model


