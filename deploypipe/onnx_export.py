"""ONNX export of any model deploypipe makes, and its parity check in ONNX Runtime; shared by the
quantize stage (its Q/DQ file) and the export stage.

A quantized model writes its own QuantizeLinear/DequantizeLinear nodes (the quantize stage's layers
switch to an export form under ``torch.onnx.is_in_onnx_export()``) and puts its weights on their
grids first (modules with a ``snap_to_grid()`` method), following TensorRT's explicit-quantization
rules: symmetric (zero point 0), weights per output channel (axis 0), activations per tensor, Q/DQ
on the inputs of Conv/Gemm/MatMul and of residual adds, never on biases; opset 17.

Inputs are named after the example batch: ``images`` for an image tensor, the keys of a dict batch
(``input_ids``, ``attention_mask``, ...) otherwise. The batch dimension is dynamic, and so is the
sequence dimension of integer (token) inputs. The output is ``logits`` for an image classifier, else
``output`` (for a Hugging Face model: its ``logits`` or ``last_hidden_state``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from . import batches as B
from .data import ImageSet

OPSET = 17


class _Positional(nn.Module):
    """A model called with keyword tensors (or one tensor), seen by the exporter as positional inputs
    and one output tensor."""

    def __init__(self, model: nn.Module, names: list[str] | None):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args))) if self.names else self.model(*args)
        return B.output_tensor(out)


def _on_grid(model: nn.Module) -> nn.Module:
    """A CPU copy whose quantized weights (and biases) sit on their grids: plain Q/DQ on them is exact."""
    model = copy.deepcopy(model).eval().cpu()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "snap_to_grid"):
                m.snap_to_grid()
    return model


def export_onnx(model: nn.Module, example: B.Batch | tuple[int, ...], path: str | Path) -> Path:
    """Write ``model`` as ONNX (a copy: the model itself is not touched). ``example``: a batch the
    model takes (image tensor, (input, target) tuple or dict of keyword tensors), or an image shape
    C x H x W (images in [0, 1] -> logits).

    >>> import torch, tempfile, pathlib
    >>> from deploypipe import export_onnx
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> path = export_onnx(net, torch.rand(2, 3, 2, 2), pathlib.Path(tempfile.mkdtemp()) / "net.onnx")
    >>> path.name
    'net.onnx'
    """
    path = Path(path)
    if isinstance(example, (tuple, list)) and all(isinstance(d, int) for d in example):
        example = torch.rand(2, *example)
    args, kwargs = B.model_inputs(example)
    names = list(kwargs) if kwargs else None
    tensors = [t.cpu() for t in (kwargs.values() if kwargs else args)]
    inputs = names or ["images"]
    net = _Positional(_on_grid(model), names)
    with torch.no_grad():
        out = net(*tensors)
    output = "logits" if out.dim() == 2 else "output"
    tokens = any(not torch.is_floating_point(t) and t.dim() >= 2 for t in tensors)
    axes = {n: ({0: "batch", 1: "sequence"} if not torch.is_floating_point(t) and t.dim() >= 2 else {0: "batch"})
            for n, t in zip(inputs, tensors)}
    axes[output] = {0: "batch", 1: "sequence"} if tokens and out.dim() >= 3 else {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-level branches: the parity check decides
        torch.onnx.export(net, tuple(tensors), str(path), opset_version=OPSET, dynamo=False,
                          input_names=inputs, output_names=[output], dynamic_axes=axes)
    return path


def _feeds(batch: B.Batch) -> dict[str, np.ndarray]:
    args, kwargs = B.model_inputs(batch)
    return {k: v.cpu().numpy() for k, v in kwargs.items()} if kwargs else {"images": args[0].cpu().numpy()}


def onnx_parity(model: nn.Module, path: str | Path, data: ImageSet | Iterable[Any], batch_size: int = 256,
                exact_images: int = 1000) -> dict[str, float]:
    """Compare the PyTorch model with the ONNX file in ONNX Runtime on ``data`` (an ImageSet or any
    batches the model takes), twice:

    - as ORT deploys it (all graph optimisations, every sample): ORT fuses DQ -> Conv/MatMul -> Q
      into integer kernels and rounds the bias to the int32 grid of s_x * s_w (our model does too),
      so values can still move by a code step where float sums differ: ``onnx_top1_agreement``,
      ``onnx_max_abs_logit_diff``, ``onnx_images_logits_differ`` (share with a logit off by > 1e-3);
    - as the file's arithmetic (graph optimisations off, Q/DQ executed as written; the first
      ``exact_images`` samples, since unoptimised ORT is slow): ``onnx_exact_top1_agreement``,
      ``onnx_exact_max_abs_logit_diff``.

    For an output that is not a batch of logits (an encoder's hidden states) the top-1 agreement is
    replaced by the mean cosine similarity of each sample's output (``onnx_cosine``,
    ``onnx_exact_cosine``).
    """
    import onnxruntime as ort

    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # the caller's model stays where it is
    was_training = model.training
    model.eval()
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = {"": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
                "exact_": ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])}
    agree = dict.fromkeys(sessions, 0.0)
    seen = dict.fromkeys(sessions, 0)
    max_diff = dict.fromkeys(sessions, 0.0)
    differing, logits = 0, True
    batches = data.batches(batch_size) if isinstance(data, ImageSet) else B.as_batches(data, batch_size)()
    with torch.no_grad():
        for batch in batches:
            ours = B.output_tensor(B.call(model, B.to_device(batch, "cpu"))).float().numpy()
            logits = ours.ndim == 2
            n = ours.shape[0]
            for key, session in sessions.items():
                if key and seen[key] >= exact_images:
                    continue
                theirs = session.run(None, _feeds(batch))[0]
                if logits:
                    agree[key] += float((ours.argmax(1) == theirs.argmax(1)).sum())
                else:
                    a, b = ours.reshape(n, -1), theirs.reshape(n, -1)
                    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
                    agree[key] += float(cos.sum())
                seen[key] += n
                per_sample = np.abs(ours - theirs).reshape(n, -1).max(1)
                max_diff[key] = max(max_diff[key], float(per_sample.max()))
                if not key:
                    differing += int((per_sample > 1e-3).sum())
    model.train(was_training)
    out = {"onnx_images_logits_differ": differing / max(seen[""], 1)}
    for key in sessions:
        out[f"onnx_{key}{'top1_agreement' if logits else 'cosine'}"] = agree[key] / max(seen[key], 1)
        out[f"onnx_{key}max_abs_logit_diff" if logits else f"onnx_{key}max_abs_diff"] = max_diff[key]
    return out
