"""ONNX export of a quantized model with QuantizeLinear/DequantizeLinear, and its parity check in
ONNX Runtime.

Follows TensorRT's explicit-quantization rules where our fake-quant model defines them: symmetric
(zero point 0), weights per output channel (axis 0), activations per tensor, Q/DQ on the inputs of
Conv/Gemm/MatMul layers that were quantized, never on biases; opset 17. Weights below 8 bits ship on
the INT8 grid with the same scale (exact), activations below 8 bits as INT8 after a Clip (exact).
Residual-add inputs and attention matmul inputs get Q/DQ too (tensor_ops.py quantizes them in the
fake-quant model, so the file and the model compute the same thing).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploypipe.data import ImageSet

from .modules import QuantLayer
from .quantizer import FP16

OPSET = 17


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Write ``model`` (images [0, 1] NCHW -> logits) as ONNX with a dynamic batch dimension."""
    path = Path(path)
    model = copy.deepcopy(model).eval().cpu()
    with torch.no_grad():  # weights (and biases) onto their grids: plain Q/DQ on them is exact
        for m in model.modules():
            if isinstance(m, QuantLayer) and m.w_bits and m.w_bits != FP16:
                if m.layer.bias is not None:
                    m.layer.bias.copy_(m.quantized_bias())
                m.layer.weight.copy_(m.quantized_weight())
    example = torch.rand(2, *input_shape)
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), opset_version=OPSET, dynamo=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return path


def onnx_parity(model: nn.Module, path: str | Path, data: ImageSet, batch_size: int = 256,
                exact_images: int = 1000) -> dict[str, float]:
    """Compare the PyTorch fake-quant model with the ONNX file in ONNX Runtime on ``data``, twice:

    - as ORT deploys it (all graph optimisations, every image): ORT fuses DQ -> Conv/MatMul -> Q
      into integer kernels and rounds the bias to the int32 grid of s_x * s_w (our model does too),
      so values can still move by a code step where float sums differ: ``onnx_top1_agreement``,
      ``onnx_max_abs_logit_diff``, ``onnx_images_logits_differ`` (share with a logit off by > 1e-3);
    - as the file's arithmetic (graph optimisations off, Q/DQ executed as written; the first
      ``exact_images`` images, since unoptimised ORT is slow): ``onnx_exact_top1_agreement``,
      ``onnx_exact_max_abs_logit_diff``.
    """
    import onnxruntime as ort

    model = model.eval().cpu()
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = {"": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
                "exact_": ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])}
    agree = dict.fromkeys(sessions, 0)
    seen = dict.fromkeys(sessions, 0)
    max_diff = dict.fromkeys(sessions, 0.0)
    differing = 0
    with torch.no_grad():
        for x, _ in data.batches(batch_size):
            ours = model(x).numpy()
            for key, session in sessions.items():
                if key and seen[key] >= exact_images:
                    continue
                theirs = session.run(["logits"], {"images": x.numpy()})[0]
                agree[key] += int((ours.argmax(1) == theirs.argmax(1)).sum())
                seen[key] += len(x)
                per_image = np.abs(ours - theirs).max(1)
                max_diff[key] = max(max_diff[key], float(per_image.max()))
                if not key:
                    differing += int((per_image > 1e-3).sum())
    out = {"onnx_images_logits_differ": differing / max(seen[""], 1)}
    for key in sessions:
        out[f"onnx_{key}top1_agreement"] = agree[key] / max(seen[key], 1)
        out[f"onnx_{key}max_abs_logit_diff"] = max_diff[key]
    return out
