"""ONNX Q/DQ export: the graph follows the explicit-quantization rules (symmetric, per-channel
weights on axis 0, Q/DQ on layer inputs, none on biases, opset >= 13), and ONNX Runtime agrees with
the PyTorch fake-quant model — a CNN and a transformer encoder, at 8 and below 8 bits."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from deploypipe.config import DataSpec
from deploypipe.data import load_data
from deploypipe.stages.quantize.calibrate import init_ranges
from deploypipe.stages.quantize.modules import fold_batchnorm, quantizable_layers, wrap_layers
from deploypipe.onnx_export import export_onnx, onnx_parity
from deploypipe.zoo import digits_cnn, vit_tiny


def quantized(model, w_bits, a_bits, data):
    torch.manual_seed(0)
    fp = model.eval()
    fold_batchnorm(fp)
    names = [n for n, _ in quantizable_layers(fp)]
    q = wrap_layers(copy.deepcopy(fp), {n: {"w_bits": w_bits, "a_bits": a_bits} for n in names}).eval()
    init_ranges(fp, q, names, lambda: (x for x, _ in data.calib.batches(64)), "mse", "mse")
    return q, names


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(source="digits", calib_size=128, limit_test=200))


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 4), (3, 8)])
def test_cnn_export_follows_the_rules_and_matches_onnxruntime(tmp_path, digits, w_bits, a_bits):
    q, names = quantized(digits_cnn(), w_bits, a_bits, digits)
    path = export_onnx(q, digits.input_shape, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 13
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 2 * len(names)  # input + weight per layer
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    consts.update({i.name: numpy_helper.to_array(i) for i in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not np.any(consts[node.input[2]])  # zero point 0: symmetric
            scale = consts[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.size > 1:
                assert axis == 0  # per output channel
        if node.op_type in ("Conv", "Gemm"):
            producers = {o: n.op_type for n in model.graph.node for o in n.output}
            assert producers[node.input[0]] == "DequantizeLinear" and producers[node.input[1]] == "DequantizeLinear"
            if len(node.input) > 2:
                assert producers.get(node.input[2]) != "DequantizeLinear"  # no Q/DQ on biases
    parity = onnx_parity(q, path, digits.test)
    assert parity["onnx_top1_agreement"] >= 0.99
    assert parity["onnx_images_logits_differ"] <= 0.05  # the rest agree to 1e-3 in every logit


def test_transformer_encoder_export_matches_onnxruntime(tmp_path, digits):
    vit = vit_tiny(num_classes=10, in_channels=1, mean=(0.3,), std=(0.4,), image_size=8, patch=4, dim=32, depth=2,
                   heads=2, mlp_dim=64)
    q, names = quantized(vit, 4, 8, digits)
    path = export_onnx(q, digits.input_shape, tmp_path / "vit.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 2 * len(names) and "MatMul" in ops
    parity = onnx_parity(q, path, digits.test)
    assert parity["onnx_top1_agreement"] >= 0.99 and parity["onnx_images_logits_differ"] <= 0.05
