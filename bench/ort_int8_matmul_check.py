"""Does ONNX Runtime's fused int8 MatMul on this CPU compute what a Q/DQ file says?

Builds a one-MatMul Q/DQ graph (int8, zero point 0, scale 1, codes at the extremes -128 / 127) twice,
once with the right operand as an input (activation x activation, as in attention) and once as an
initializer (activation x constant weight, as in a Linear layer), runs each in ONNX Runtime with its
default graph optimisations (ORT fuses DQ -> MatMul into MatMulIntegerToFloat) and with
optimisations off (Q/DQ as written), and prints the fused ops and the largest difference. On x86
CPUs with AVX2 but no VNNI, ORT documents that its u8 x s8 kernels can saturate int16 pair sums.

    python bench/ort_int8_matmul_check.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

M, K, N = 32, 64, 32


def graph(b: np.ndarray | None) -> bytes:
    nodes = [helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"]),
             helper.make_node("QuantizeLinear", ["b", "s", "z"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["bd"]),
             helper.make_node("MatMul", ["ad", "bd"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s"), helper.make_tensor("z", TensorProto.INT8, [], [0])]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])]
    if b is None:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [K, N]))
    else:
        inits.append(numpy_helper.from_array(b, "b"))
    g = helper.make_graph(nodes, "int8_matmul", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (M, K)).astype(np.float32)
    b = rng.integers(-128, 128, (K, N)).astype(np.float32)
    a[0], b[:, 0], a[1], b[:, 1] = -128, -128, 127, 127  # the extreme rows / columns
    exact_opts = ort.SessionOptions()
    exact_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    print(f"onnxruntime {ort.__version__}")
    print("| right operand | ops after ORT's optimisations | max abs diff, fused vs as written | max abs result |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, weight in (("input (activation x activation)", None), ("initializer (activation x weight)", b)):
            model = graph(weight)
            feed = {"a": a} if weight is not None else {"a": a, "b": b}
            fused_opts = ort.SessionOptions()
            fused_opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            fused_opts.log_severity_level = 3
            fused = ort.InferenceSession(model, fused_opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
            exact = ort.InferenceSession(model, exact_opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
            ops = ", ".join(n.op_type for n in onnx.load(fused_opts.optimized_model_filepath).graph.node)
            print(f"| {label} | {ops} | {np.abs(fused - exact).max():.6g} | {np.abs(exact).max():.6g} |")


if __name__ == "__main__":
    main()
