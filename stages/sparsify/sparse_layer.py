"""A Linear or Conv2d that trains N:M-sparse: its forward multiplies with W_eff from the fused kernel
(deploypipe.kernels.effective_weight), at the pattern, α and λ the recipe sets for the current step."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.kernels.dispatch import Backend
from deploypipe.kernels.effective_weight import nm_weight
from deploypipe.kernels.nm_mask import nm_mask

from .patterns import Pattern, from_reduction_view, reduction_view
from .schedules import SparseState

Layer = Union[nn.Conv2d, nn.Linear]


class NMSparse(nn.Module):
    fx_leaf = True

    def __init__(self, layer: Layer, backend: Backend = "auto"):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"NMSparse wraps Conv2d or Linear, not {type(layer).__name__}")
        self.layer, self.backend = layer, backend
        self.sparse_state: Optional[SparseState] = None  # None or phase "dense": the dense layer

    def effective_weight(self) -> torch.Tensor:
        w, state = self.layer.weight, self.sparse_state
        if state is None or state.pattern is None:
            return w
        w_eff, _ = nm_weight(reduction_view(w), state.pattern.n, state.pattern.m, state.alpha, state.lam, self.backend)
        return from_reduction_view(w_eff, w.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)

    def extra_repr(self) -> str:
        s = self.sparse_state
        return "dense" if s is None or s.pattern is None else f"{s.pattern}, alpha={s.alpha:.3g}, lambda={s.lam:.3g}"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def wrap_sparse(model: nn.Module, names: list[str], backend: Backend = "auto") -> dict[str, NMSparse]:
    wrapped = {}
    for name in names:
        wrapped[name] = NMSparse(model.get_submodule(name), backend)
        _replace(model, name, wrapped[name])
    return wrapped


@torch.no_grad()
def harden(model: nn.Module, wrapped: dict[str, NMSparse], pattern: Pattern) -> None:
    """Put the plain layers back with the pruned weights set to exactly zero (target pattern)."""
    for name, sparse in wrapped.items():
        w = sparse.layer.weight
        mask = nm_mask(reduction_view(w.detach()), pattern.n, pattern.m, sparse.backend)
        w.mul_(from_reduction_view(mask.to(w.dtype), w.shape))
        _replace(model, name, sparse.layer)


def set_state(wrapped: dict[str, NMSparse], state: SparseState) -> None:
    for sparse in wrapped.values():
        sparse.sparse_state = state
