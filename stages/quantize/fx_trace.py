"""torch.fx tracing for the quantize stage: modules that set ``fx_leaf = True`` (our quantized
layers, the rewritten attention) are kept whole instead of traced through — their insides branch on
input properties that fx cannot follow, and the quantizers inside them are already in place."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(getattr(m, "fx_leaf", False)) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """A GraphModule of ``model`` (raises what fx raises for untraceable models)."""
    graph = LeafTracer().trace(model)
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
