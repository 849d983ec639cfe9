"""Is a model N:M? The checker counts, per layer, the groups of M consecutive weights along the
reduction dimension that hold more than N non-zeros. It reads deploypipe models (the effective,
quantized weight of a quantized layer) and ONNX files (weights of Conv, Gemm and MatMul, also behind a
DequantizeLinear), so the engine file a user ships can be checked, not only the PyTorch model.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn


from .patterns import Pattern, group_size_along_reduction, reduction_view


def violating_groups(matrix: torch.Tensor, pattern: Pattern) -> tuple[int, int]:
    """(groups with more than N non-zeros, groups) of an (out, K) matrix; K must be a multiple of M."""
    if matrix.shape[1] % pattern.m:
        raise ValueError(f"reduction size {matrix.shape[1]} is not a multiple of M={pattern.m}")
    nonzero = (matrix.reshape(-1, pattern.m) != 0).sum(1)
    return int((nonzero > pattern.n).sum()), nonzero.numel()


def _row(name: str, matrix: torch.Tensor, shape, pattern: Pattern) -> dict:
    bad, groups = violating_groups(matrix, pattern)
    return {"layer": name, "shape": "x".join(map(str, shape)), "pattern": str(pattern), "groups": groups,
            "violating_groups": bad, "sparsity": float((matrix == 0).float().mean()), "ok": bad == 0}


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer computes with: a quantized layer's fake-quantized weight, else its weight."""
    if hasattr(layer, "quantized_weight"):
        return layer.quantized_weight().detach()
    return layer.weight.detach()


def check_model(model: nn.Module, patterns: dict[str, Pattern]) -> list[dict]:
    """One row per named layer (a QuantLayer counts by its own name)."""
    rows = []
    for name, pattern in patterns.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer '{name}' to check — fix: "
                             "check the layer names (deploypipe check-sparsity lists the eligible ones)") from None
        w = effective_weight(layer)
        run = w.shape[1]  # input channels of a conv, in_features of a linear
        if run % pattern.m:
            raise ValueError(f"layer '{name}' has {run} inputs per group run, not a multiple of M={pattern.m} — fix: "
                             "check it with a pattern whose M divides it, or leave it out with --layers")
        rows.append(_row(name, reduction_view(w), tuple(w.shape), pattern))
    return rows


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, Linear or ungrouped Conv2d) in module order; a quantized layer by its own name."""
    quantized = {n for n, m in model.named_modules() if hasattr(m, "quantized_weight")}
    out = []
    for name, module in model.named_modules():
        if name in quantized:
            out.append((name, module.layer))
        elif name.rpartition(".")[0] not in quantized and (
                isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            out.append((name, module))
    return out


def eligible_model_layers(model: nn.Module, pattern: Pattern, include: Iterable[str] = ("*",),
                          keep_first_last: bool = True) -> dict[str, Pattern]:
    """Layers a pattern can apply to, minus the first and last (the stage keeps those dense)."""
    layers = weight_layers(model)
    if keep_first_last:
        layers = layers[1:-1]
    include = list(include)
    return {n: pattern for n, layer in layers if any(fnmatch.fnmatchcase(n, p) for p in include)
            and group_size_along_reduction(layer) % pattern.m == 0}


# --------------------------------------------------------------------------- ONNX
def onnx_weights(path: Path) -> list[tuple[str, torch.Tensor, int]]:
    """(initializer name, (out, K) reduction matrix, length of a run of consecutive inputs — a conv's
    input channels, else K) for every Conv / Gemm / MatMul weight, in graph order.
    A Q/DQ weight is read from its stored initializer: zero point 0 maps zero to zero, so the stored
    and the effective weight have the same zeros."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure: not a readable ONNX file
        raise ValueError(f"'{path}' is not a readable ONNX file ({type(err).__name__}) — fix: "
                         "give the .onnx file an export wrote") from None
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: node for node in model.graph.node for o in node.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        # through Q/DQ (zero point 0 keeps zeros zero), Identity and Cast back to the stored weight
        while name not in inits and name in producers and producers[name].op_type in (
                "DequantizeLinear", "QuantizeLinear", "Identity", "Cast"):
            name = producers[name].input[0]
        if name not in inits:
            continue
        w = torch.from_numpy(numpy_helper.to_array(inits[name]).astype(np.float32))
        if node.op_type == "Conv" and w.dim() == 4:
            matrix, run = reduction_view(w), w.shape[1]
        elif node.op_type == "Gemm" and w.dim() == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            matrix = w if trans_b else w.T
            run = matrix.shape[1]
        elif node.op_type == "MatMul" and w.dim() == 2:
            matrix = w.T  # x @ W with W (K, out)
            run = matrix.shape[1]
        else:
            continue
        out.append((name, matrix.contiguous(), run))
    return out


def check_onnx(path: Path, pattern: Pattern, include: Iterable[str] = ("*",),
               keep_first_last: bool = True) -> list[dict]:
    weights = onnx_weights(path)
    if keep_first_last:
        weights = weights[1:-1]
    include = list(include)
    return [_row(name, matrix, tuple(matrix.shape), pattern) for name, matrix, run in weights
            if any(fnmatch.fnmatchcase(name, p) for p in include) and run % pattern.m == 0]


def check_path(path: str | Path, pattern: Optional[Pattern], include: Iterable[str] = ("*",)) -> list[dict]:
    """Check a saved deploypipe model folder (its recorded sparse layers, or every eligible layer for
    ``pattern``) or an ONNX file (every eligible weight, ``pattern`` required)."""
    from deploypipe.models import is_model_dir, load_model, read_record

    from .patterns import sparse_layers_of

    path = Path(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ValueError(f"ONNX file '{path}' does not exist — fix: "
                             "give the path of an exported model (.onnx)")
        if pattern is None:
            raise ValueError("checking an ONNX file needs the pattern — fix: "
                             "add --pattern N:M, e.g. --pattern 2:4")
        return check_onnx(path, pattern, include)
    if not is_model_dir(path):
        raise ValueError(f"'{path}' is neither a saved deploypipe model folder nor an .onnx file — fix: "
                         "give <out>/<stage>/model (it holds model.json) or a .onnx file")
    model = load_model(path)
    recorded = sparse_layers_of(read_record(path))
    if pattern is None and not recorded:
        raise ValueError(f"the model in '{path}' records no N:M layers — fix: "
                         "add --pattern N:M to check every eligible layer")
    patterns = ({n: (pattern or p) for n, p in recorded.items() if any(fnmatch.fnmatchcase(n, i) for i in include)}
                if recorded else eligible_model_layers(model, pattern, include))
    return check_model(model, patterns)
