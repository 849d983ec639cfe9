"""N:M patterns on real layers: which weights form a group, which layers can be sparsified, and the
transform record that tells later stages (quantize, export, the checker) what is N:M.

Grouping follows the reduction dimension. Linear (out, in): M consecutive inputs of a row. Conv2d
(out, in, kh, kw): M consecutive input channels at each kernel position — the grouping TensorRT
checks — i.e. rows of the weight permuted to (out, kh, kw, in). ``reduction_view`` gives that
(out, kh·kw·in) matrix, on which every kernel works; for a channels-last conv weight it is a view.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Union

import torch
from torch import nn

from deploypipe.models import register_transform

from .nm_pattern import Pattern

Sparsifiable = Union[nn.Conv2d, nn.Linear]
TRANSFORM_MODULE = __name__


def reduction_view(weight: torch.Tensor) -> torch.Tensor:
    """(out, K) matrix whose rows split into N:M groups: a Linear weight as is, a conv weight as (out, kh, kw, in)."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    raise ValueError(f"no N:M grouping for a weight of shape {tuple(weight.shape)}")


def from_reduction_view(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``reduction_view`` for a weight of ``shape``."""
    if len(shape) == 2:
        return matrix.reshape(shape)
    out, cin, kh, kw = shape
    return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)


def group_size_along_reduction(layer: nn.Module) -> int:
    """The length of the run of consecutive weights a group must fit in (in_features or in_channels)."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def sparsifiable_layers(model: nn.Module) -> list[tuple[str, Sparsifiable]]:
    """Every Linear and (ungrouped) Conv2d, in module order — except the output projection inside an
    nn.MultiheadAttention, whose forward reads that weight directly instead of calling the layer."""
    inside_attention = {f"{n}.{c}" if n else c for n, m in model.named_modules()
                        if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_children()}
    return [(n, m) for n, m in model.named_modules() if n not in inside_attention
            and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))]


def select_sparse_layers(model: nn.Module, ms: Iterable[int], include: Iterable[str] = ("*",),
                         exclude: Iterable[str] = (), keep_first_last: bool = True) -> tuple[list[str], list[dict]]:
    """(chosen layer names, skipped rows {layer, reason}). ``ms``: every group size M the recipe uses."""
    layers = sparsifiable_layers(model)
    edge = {layers[0][0], layers[-1][0]} if layers and keep_first_last else set()
    include, exclude, ms = list(include), list(exclude), sorted(set(ms))
    chosen, skipped = [], []
    for name, layer in layers:
        if not any(fnmatch.fnmatchcase(name, p) for p in include) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            skipped.append({"layer": name, "reason": "not selected by include/exclude"})
        elif name in edge:
            skipped.append({"layer": name, "reason": "first or last layer"})
        elif any(group_size_along_reduction(layer) % m for m in ms):
            what = "in_features" if isinstance(layer, nn.Linear) else "in_channels"
            skipped.append({"layer": name, "reason": f"{what}={group_size_along_reduction(layer)} is not a multiple of "
                                                     f"M={max(ms)}"})
        else:
            chosen.append(name)
    return chosen, skipped


@register_transform("sparsify")
def apply_sparsify_transform(model: nn.Module, params: dict) -> nn.Module:
    """The architecture does not change (pruned weights are zeros in the state dict); the record
    {"layers": {name: "N:M"}} tells later stages which layers must keep their pattern."""
    return model


def sparse_layers_of(record) -> dict[str, Pattern]:
    """{layer: Pattern} of every sparsify transform in a model record (later ones win)."""
    out: dict[str, Pattern] = {}
    for t in getattr(record, "transforms", []):
        if t.get("kind") == "sparsify":
            out.update({name: Pattern.parse(p) for name, p in t["params"]["layers"].items()})
    return out
