"""ONNX export of a quantized model with QuantizeLinear/DequantizeLinear, and its parity check in
ONNX Runtime.

Follows TensorRT's explicit-quantization rules where our fake-quant model defines them: symmetric
(zero point 0), weights per output channel (axis 0), activations per tensor, Q/DQ on the inputs of
Conv/Gemm/MatMul layers that were quantized, never on biases; opset 17. Weights below 8 bits ship on
the INT8 grid with the same scale (exact), activations below 8 bits as INT8 after a Clip (exact).
Not yet: Q/DQ on residual-add inputs and on attention's batched matmuls (our fake-quant model does
not quantize them either, so adding them would break parity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploypipe.data import ImageSet

OPSET = 17


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Write ``model`` (images [0, 1] NCHW -> logits) as ONNX with a dynamic batch dimension."""
    path = Path(path)
    model = model.eval().cpu()
    example = torch.rand(2, *input_shape)
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), opset_version=OPSET, dynamo=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return path


def onnx_parity(model: nn.Module, path: str | Path, data: ImageSet, batch_size: int = 256) -> dict[str, float]:
    """Top-1 agreement, the largest logit difference, and the share of images whose logits differ by
    more than 1e-3 between PyTorch and ONNX Runtime on ``data``. A different summation order can move
    a value across a rounding boundary of a coarse activation grid; that flips one code by a whole
    step, so a few images may differ visibly while the predictions agree."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.eval().cpu()
    agree, n, max_diff, differing = 0, 0, 0.0, 0
    with torch.no_grad():
        for x, _ in data.batches(batch_size):
            ours = model(x).numpy()
            theirs = session.run(["logits"], {"images": x.numpy()})[0]
            agree += int((ours.argmax(1) == theirs.argmax(1)).sum())
            n += len(x)
            per_image = np.abs(ours - theirs).max(1)
            max_diff = max(max_diff, float(per_image.max()))
            differing += int((per_image > 1e-3).sum())
    return {"onnx_top1_agreement": agree / max(n, 1), "onnx_max_abs_logit_diff": max_diff,
            "onnx_images_logits_differ": differing / max(n, 1)}
