"""Calibration: capture a layer's inputs and outputs on the calibration images, initialise ranges,
and run AdaQuant layer by layer over a whole model.

Caching is one layer at a time (never all layers' activations at once), under a byte budget: when
a layer's inputs and outputs for the whole calibration set would exceed it, a seeded random subset
of the samples is kept (the paper optimises on ~1,000 samples; a few hundred still work).

Modes (Hubara et al. 2021, §3):
- parallel: every layer sees inputs from the full-precision model; layers are independent.
- sequential: layer l sees inputs produced by the already-quantized layers before it; the target
  stays the full-precision output. Better for a fixed allocation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.batches import Batch, call
from deploypipe.progress import progress

from .adaquant import AdaQuantSettings, adaquant_layer
from .fx_trace import LeafTracer
from .modules import QuantLayer
from .quantizer import FP16, RANGE_METHODS
from .tensor_ops import tensor_quantizers


def relu_followers(model: nn.Module) -> set[str]:
    """Names of modules whose only consumer is a ReLU (module, function or method), looking through
    Identity modules (batch norms folded away), found by fx."""
    import torch.fx

    try:
        graph = LeafTracer().trace(model)
    except Exception:
        return set()
    modules = dict(model.named_modules())

    def is_relu(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), nn.ReLU)
        if node.op == "call_function":
            return node.target in (F.relu, torch.relu)
        return node.op == "call_method" and node.target in ("relu", "relu_")

    def only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
        user = next(iter(node.users)) if len(node.users) == 1 else None
        while user is not None and user.op == "call_module" and isinstance(modules.get(user.target), nn.Identity):
            user = next(iter(user.users)) if len(user.users) == 1 else None
        return user

    found = set()
    for node in graph.nodes:
        if node.op == "call_module":
            user = only_user(node)
            if user is not None and is_relu(user):
                found.add(node.target)
    return found


@dataclass
class CacheStats:
    peak_bytes: int = 0
    subsampled_layers: list[str] = field(default_factory=list)


class _Captured(Exception):
    """Raised by the recording hook to stop a forward pass once the layer's tensors are in hand."""


@torch.no_grad()
def run_until(model: nn.Module, module_name: str, batches: Callable[[], Iterable[Batch]],
              record: Callable[[tuple, torch.Tensor], None]) -> None:
    """Run every batch through ``model`` (eval mode); ``record(inputs, output)`` sees each call of the
    submodule. A pass stops at the submodule (the layers after it are not run) once the first batch
    has shown that it is called once per pass; a submodule called several times (shared) sees whole
    passes."""
    calls, stop = [0], [False]

    def hook(_m, inputs, output):
        record(inputs, output)
        calls[0] += 1
        if stop[0]:
            raise _Captured

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        model.eval()
        for i, batch in enumerate(batches()):
            try:
                call(model, batch)
            except _Captured:
                pass
            if i == 0:
                stop[0] = calls[0] == 1  # called once per pass: later passes can stop right there
    finally:
        handle.remove()


@torch.no_grad()
def capture(model: nn.Module, module_name: str, batches: Callable[[], Iterable[Batch]],
            want_output: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inputs (and outputs) of one submodule over all calibration batches (any batch a model takes:
    deploypipe.batches), every call kept; each pass stops at the submodule (``run_until``)."""
    xs, ys = [], []

    def record(inputs, output):  # clones: an in-place op downstream (ReLU(inplace=True)) would change them
        xs.append(inputs[0].detach().clone())
        if want_output:
            ys.append(output.detach().clone())

    run_until(model, module_name, batches, record)
    return torch.cat(xs), (torch.cat(ys) if want_output else None)


def fit_budget(x: torch.Tensor, y: torch.Tensor, budget_bytes: int, name: str, stats: CacheStats,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    per_sample = (x[0].numel() * x.element_size()) + (y[0].numel() * y.element_size())
    keep = max(1, min(len(x), budget_bytes // max(per_sample, 1)))
    if keep < len(x):
        idx = torch.randperm(len(x), generator=generator)[:keep]
        x, y = x[idx], y[idx]
        stats.subsampled_layers.append(name)
    stats.peak_bytes = max(stats.peak_bytes, x.numel() * x.element_size() + y.numel() * y.element_size())
    return x, y


@torch.no_grad()
def init_ranges(fp_model: nn.Module, q_model: nn.Module, names: list[str], batches: Callable[[], Iterable[Batch]],
                weight_method: str = "mse", act_method: str = "mse", percentile: float = 99.99) -> None:
    """Weight scales from the weights; activation scales from the FP model's inputs to each layer."""
    for name in names:
        q: QuantLayer = q_model.get_submodule(name)
        w_kw = {"percentile": percentile} if weight_method == "percentile" else {}
        a_kw = {"percentile": percentile} if act_method == "percentile" else {}
        if q.w_bits and q.w_bits != FP16:
            q.weight_scale.copy_(RANGE_METHODS[weight_method](q.layer.weight, q.w_bits, axis=0, **w_kw))
        if q.a_bits and q.a_bits != FP16:
            x, _ = capture(fp_model, name, batches, want_output=False)
            q.act_scale.copy_(RANGE_METHODS[act_method](x, q.a_bits, signed=q.a_signed, **a_kw))


@torch.no_grad()
def init_tensor_ranges(fp_model: nn.Module, q_model: nn.Module, batches: Callable[[], Iterable[Batch]],
                       method: str = "mse", percentile: float = 99.99) -> list[str]:
    """Scales of the residual-add / matmul quantizers (tensor_ops.ActQuant) from the FP model's
    tensors at the same places (``fp_model`` carries disabled copies of them)."""
    kw = {"percentile": percentile} if method == "percentile" else {}
    done = []
    for name, q in tensor_quantizers(q_model):
        if q.bits:
            x, _ = capture(fp_model, name, batches, want_output=False)
            q.scale.copy_(RANGE_METHODS[method](x, q.bits, signed=q.signed, **kw))
            done.append(name)
    return done


def adaquant_model(fp_model: nn.Module, q_model: nn.Module, names: list[str],
                   batches: Callable[[], Iterable[Batch]], mode: str = "parallel",
                   settings: Optional[AdaQuantSettings] = None, cache_budget_bytes: int = 1 << 30,
                   seed: int = 0, show_progress: bool = False) -> tuple[list[dict], CacheStats]:
    """AdaQuant every named layer of ``q_model`` (a quantized copy of ``fp_model`` with the same
    module names); returns one table row per layer and the cache statistics."""
    if mode not in ("parallel", "sequential"):
        raise ValueError(f"mode must be parallel or sequential, got {mode}")
    relus = relu_followers(fp_model)
    stats, rows = CacheStats(), []
    g = torch.Generator().manual_seed(seed)
    for name in progress(names, total=len(names), description=f"AdaQuant ({mode})", enabled=show_progress):
        q: QuantLayer = q_model.get_submodule(name)
        x_fp, y = capture(fp_model, name, batches)
        x = capture(q_model, name, batches, want_output=False)[0] if mode == "sequential" else x_fp
        del x_fp
        relu = name in relus
        if relu:
            y = F.relu(y)
        x, y = fit_budget(x, y, cache_budget_bytes, name, stats, g)
        res = adaquant_layer(q, x, y, relu=relu, settings=settings, generator=g)
        rows.append({"layer": name, "w_bits": q.w_bits, "a_bits": q.a_bits, "relu_target": relu,
                     "samples": len(x), "mse_rtn": res.mse_rtn, "mse_adaquant": res.mse_adaquant,
                     "steps": res.steps, "seconds": res.seconds})
        del x, y
    return rows, stats
