"""Mixed precision: measure each layer's loss increase at each candidate precision, then choose one
precision per layer with the integer program (bit_allocation.py).

Delta-loss (Hubara et al. 2021, §4): start from the model with every candidate layer at the highest
candidate precision; swap *only* layer l to precision p (its own calibration at p: ranges, and
AdaQuant in parallel mode on full-precision inputs); measure the calibration loss; subtract the
base loss. The calibration set is unlabeled, so the loss is KL(softmax(FP logits) || softmax(quantized
logits)) (for other outputs, the relative squared error: ``divergence``). Candidates are weight bit
widths (2..8), the layer's input bits staying as in the base model, and 16 = "keep in FP16"
(weights and inputs rounded to half precision, no integer grid).

Costs per (layer, precision), ``cost_table``:
- ``size``: storage of the layer's weights, bits x parameters (16 for FP16);
- ``bops``: bit operations per image, MACs x weight bits x input bits (FP16: 16 x 16), the measure
  of van Baalen et al. 2020 / Hubara et al. 2021;
- ``latency``: a user-supplied table of measured milliseconds per (layer, precision) — e.g. from
  TensorRT's per-layer profile on the target device — read by ``read_latency_table``.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.batches import Batch, batch_size, call, output_tensor, take, to_device
from deploypipe.kernels.nm_compress import packed_index_bits
from deploypipe.progress import progress

from .adaquant import AdaQuantSettings, adaquant_layer
from .bit_allocation import Allocation
from .calibrate import CacheStats, capture, fit_budget, relu_followers
from .modules import QuantLayer, replace_module
from .quantizer import FP16, RANGE_METHODS


def precision_label(bits: int) -> str:
    return "fp16" if bits == FP16 else f"w{bits}"

def divergence(q_out: torch.Tensor, fp_out: torch.Tensor) -> torch.Tensor:
    """How far a quantized model's output is from the FP one, summed over the batch: KL(softmax(FP) ||
    softmax(quantized)) for a batch of logits (N x K); for any other output (an encoder's N x T x H
    hidden states) each sample's squared error relative to the FP sample's squared norm."""
    if fp_out.dim() == 2:
        return F.kl_div(F.log_softmax(q_out.float(), 1), F.log_softmax(fp_out.float(), 1), log_target=True,
                        reduction="sum")
    err = (q_out.float() - fp_out.float()).pow(2).flatten(1).sum(1)
    return (err / fp_out.float().pow(2).flatten(1).sum(1).clamp_min(1e-12)).sum()


class VoteLoss:
    """The sensitivity "votes": 1 minus the vote probability of each image's smoothed FP top class,
    over noisy copies (``copies``: one batch source per copy, each yielding the calibration images in
    the same order). A layer's delta, this loss with the layer swapped minus the base model's, is the
    drop of the top-class vote probability that randomized smoothing's certificate is built from."""

    def __init__(self, fp: nn.Module, copies: list[Callable[[], Iterable[Batch]]]):
        self.copies = copies
        with torch.no_grad():
            votes = [self._predictions(fp, source) for source in copies]
        k = 1 + max(int(v.max()) for v in votes)
        counts = sum(F.one_hot(v, k) for v in votes)
        self.top = counts.argmax(1)  # ties: the lowest class, as the certificate's argmax

    @staticmethod
    def _predictions(model: nn.Module, source: Callable[[], Iterable[Batch]]) -> torch.Tensor:
        out = []
        for x in source():
            logits = output_tensor(call(model, x))
            if logits.dim() != 2:
                raise ValueError(f"sensitivity votes needs a classifier (N x classes logits), got an output of shape "
                                 f"{tuple(logits.shape)} — fix: use sensitivity noisy")
            out.append(logits.argmax(1))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        hits = sum(int((self._predictions(model, source) == self.top).sum()) for source in self.copies)
        return 1.0 - hits / (len(self.top) * len(self.copies))


@torch.no_grad()
def calibration_kl(fp: nn.Module, q: nn.Module, batches: Callable[[], Iterable[Batch]]) -> float:
    """The mean ``divergence`` of ``q`` from ``fp`` over the calibration batches (the calibration loss:
    the set is unlabeled)."""
    total, n = 0.0, 0
    for x in batches():
        total += divergence(output_tensor(call(q, x)), output_tensor(call(fp, x))).item()
        n += batch_size(x)
    return total / max(n, 1)


def _layer_at(fp_layer: nn.Module, base: QuantLayer, bits: int, weight_range: str) -> QuantLayer:
    """A fresh quantized copy of the FP layer with weights at ``bits`` (inputs as in the base), or
    the layer kept in FP16 (weights and inputs)."""
    if bits == FP16:
        return QuantLayer(copy.deepcopy(fp_layer), FP16, FP16, sparse=base.sparse)
    q = QuantLayer(copy.deepcopy(fp_layer), bits, base.a_bits, base.a_signed, base.sparse)
    with torch.no_grad():
        q.weight_scale.copy_(RANGE_METHODS[weight_range](q.layer.weight, bits, axis=0))
        q.act_scale.copy_(base.act_scale)
    return q


def measure_deltas(fp: nn.Module, q_base: nn.Module, names: list[str], candidates: list[int],
                   batches: Callable[[], Iterable[Batch]], weight_range: str = "mse",
                   settings: Optional[AdaQuantSettings] = None, cache_budget_bytes: int = 1 << 30,
                   seed: int = 0, measure_batches: Optional[Callable[[], Iterable[Batch]]] = None,
                   show_progress: bool = False, loss: Optional[Callable[[nn.Module], float]] = None
                   ) -> tuple[dict, dict]:
    """Delta-loss table {layer: {bits: dloss}} and the calibrated layer for every (layer, bits).
    The base model has every layer at the highest integer candidate (the FP16 candidate is measured
    against it like the others). Layers are calibrated on ``batches``; the loss is the KL from the FP
    model on ``measure_batches`` (default: the same; the noisy sensitivity passes noised calibration
    images), or ``loss`` (a function of the model, e.g. ``VoteLoss``)."""
    top = max(b for b in candidates if b != FP16)
    measure_batches = measure_batches or batches
    loss = loss or (lambda model: calibration_kl(fp, model, measure_batches))
    base_loss = loss(q_base)
    relus = relu_followers(fp)
    g = torch.Generator().manual_seed(seed)
    stats = CacheStats()
    dloss: dict[str, dict[int, float]] = {}
    layers: dict[tuple[str, int], nn.Module] = {}
    for name in progress(names, total=len(names), description="layer sensitivities", enabled=show_progress):
        base = q_base.get_submodule(name)
        dloss[name] = {top: 0.0}
        layers[name, top] = base
        x = y = None
        for bits in candidates:
            if bits == top:
                continue
            cand = _layer_at(fp.get_submodule(name), base, bits, weight_range)
            if settings is not None and bits != FP16:  # nothing to calibrate in FP16
                if x is None:  # cached once per layer, reused for every precision
                    x, y = capture(fp, name, batches)
                    x, y = fit_budget(x, F.relu(y) if name in relus else y, cache_budget_bytes, name, stats, g)
                adaquant_layer(cand, x, y, relu=name in relus, settings=settings, generator=g)
            replace_module(q_base, name, cand)
            dloss[name][bits] = loss(q_base) - base_loss
            replace_module(q_base, name, base)
            layers[name, bits] = cand
    return dloss, layers


@torch.no_grad()
def layer_macs(model: nn.Module, names: list[str], example: tuple[int, ...] | Batch) -> dict[str, int]:
    """Multiply-accumulates per sample of each named Conv2d / Linear (or QuantLayer): output
    elements x reduction size (weight elements per output channel). ``example``: an input shape (one
    image of that shape is fed) or a batch, whose first sample is fed."""
    out: dict[str, int] = {}
    hooks = []
    for name in names:
        m = model.get_submodule(name)
        weight = m.layer.weight if isinstance(m, QuantLayer) else m.weight
        per_output = weight[0].numel()
        hooks.append(m.register_forward_hook(
            lambda _m, _i, o, name=name, k=per_output: out.__setitem__(name, o[0].numel() * k)))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    if isinstance(example, (tuple, list)) and all(isinstance(d, int) for d in example):
        example = torch.zeros(1, *example)
    try:
        call(model, to_device(take(example, slice(0, 1)), param.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


def model_bops(model: nn.Module, macs: dict[str, int]) -> float:
    """Bit operations per image of the Conv/Linear layers named in ``macs``: MACs x weight bits x
    input bits, float layers counted at 32 x 32 and FP16 ones at 16 x 16."""
    total = 0.0
    for name, n in macs.items():
        m = model.get_submodule(name)
        w, a = (m.w_bits or 32, m.a_bits or 32) if isinstance(m, QuantLayer) else (32, 32)
        total += n * w * a
    return total


def read_latency_table(path: str) -> dict[tuple[str, int], float]:
    """A CSV with columns ``layer,bits,ms`` (bits: 2..8, or 16 / fp16): {(layer, bits): ms}."""
    import csv

    fix = "give a CSV with header layer,bits,ms and one row per layer and candidate precision (bits 2..8 or fp16)"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ValueError(f"cannot read the latency table '{path}': {err.strerror or err} — fix: {fix}") from None
    table = {}
    for i, row in enumerate(rows, start=2):
        try:
            bits = str(row["bits"]).strip().lower()
            table[row["layer"].strip(), FP16 if bits in ("fp16", "16") else int(bits)] = float(row["ms"])
        except (KeyError, ValueError, TypeError, AttributeError):
            raise ValueError(f"latency table '{path}' line {i} is not layer,bits,ms: {row} — fix: {fix}") from None
    if not table:
        raise ValueError(f"latency table '{path}' has no rows — fix: {fix}")
    return table


def cost_table(kind: str, fp: nn.Module, names: list[str], candidates: list[int], a_bits: dict[str, Optional[int]],
               macs: Optional[dict[str, int]] = None, latency: Optional[dict[tuple[str, int], float]] = None,
               sparse: Optional[dict[str, str]] = None) -> dict[str, dict[int, float]]:
    """{layer: {precision: cost}} for ``kind`` size | bops | latency (see the module docstring);
    ``a_bits`` are each layer's input bits (None = float, counted as 32). An N:M layer (``sparse``:
    {layer: "N:M"}) stores N values and their positions (ceil(log2 M) bits) per M weights, and
    multiplies only its N kept weights of every M."""
    table: dict[str, dict[int, float]] = {}
    for n in names:
        table[n] = {}
        pattern = (sparse or {}).get(n)
        keep, m = map(int, pattern.split(":")) if pattern else (1, 1)
        for b in candidates:
            if kind == "size":
                bits = packed_index_bits(keep, m, b) if pattern else b
                table[n][b] = float(bits * fp.get_submodule(n).weight.numel())
            elif kind == "bops":
                table[n][b] = float(keep / m * macs[n] * b * (FP16 if b == FP16 else (a_bits[n] or 32)))
            elif kind == "latency":
                if (n, b) not in latency:
                    raise ValueError(f"the latency table has no entry for layer {n} at {precision_label(b)} — fix: "
                                     "add a row 'layer,bits,ms' for every layer the program chooses for and every "
                                     "candidate precision")
                table[n][b] = latency[n, b]
            else:
                raise ValueError(f"unknown cost {kind!r}")
    return table


def assemble(q_base: nn.Module, allocation: Allocation, layers: dict) -> nn.Module:
    """A copy of the base model with each layer at its chosen precision."""
    model = copy.deepcopy(q_base)
    for name, bits in allocation.choice.items():
        replace_module(model, name, copy.deepcopy(layers[name, bits]))
    return model


