"""The export stage: the TensorRT lint against hand-made bad graphs and against our own exports, the
TensorRT-RTX parser and builder on every kind of model the suite makes, engine.json against the
build, config.pbtxt against the ONNX I/O, the registered MLflow version, and the bad inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import deploypipe as dp
from conftest import last_json, run_main
from deploypipe.stages.export.bundle import onnx_io
from deploypipe.stages.export.engine import build_engine, parser_errors, tensorrt_module
from deploypipe.stages.export.trt_lint import lint_onnx

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="the test extra installs tensorrt-rtx-cu12")


# --------------------------------------------------------------------------- hand-made graphs
def conv_qdq_graph(*, zero_point=0, weight_axis=0, weight_type=TensorProto.INT8, bias_qdq=False, block=None,
                   consumer="Conv") -> onnx.ModelProto:
    """x -> Q/DQ (per tensor) -> Conv (or MatMul) with a DQ'd int weight (per channel) [+ a DQ'd bias]."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    inits += [numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
              numpy_helper.from_array(np.array(zero_point, np.int8), "x_zero")]
    nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="x_Q"),
              helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="x_DQ")]
    if consumer == "Conv":
        w_shape, channels = (4, 3, 3, 3), (4 if weight_axis == 0 else 3)
    else:
        w_shape, channels = (12, 6), (6 if weight_axis == 1 else 12)
    if weight_type == TensorProto.INT4:
        w = helper.make_tensor("w_int", TensorProto.INT4, w_shape, rng.integers(-8, 8, np.prod(w_shape)).tolist())
        zero = helper.make_tensor("w_zero", TensorProto.INT4, [channels], [0] * channels)
    else:
        w = numpy_helper.from_array(rng.integers(-127, 128, w_shape).astype(np.int8), "w_int")
        zero = numpy_helper.from_array(np.zeros(channels, np.int8), "w_zero")
    inits += [w, zero, numpy_helper.from_array(np.full(channels, 0.01, np.float32), "w_scale")]
    attrs = {"axis": weight_axis, **({"block_size": block} if block else {})}
    nodes.append(helper.make_node("DequantizeLinear", ["w_int", "w_scale", "w_zero"], ["w"], name="w_DQ", **attrs))
    inputs = ["xd", "w"]
    if bias_qdq:
        inits += [numpy_helper.from_array(np.arange(4, dtype=np.int32), "b_int"),
                  numpy_helper.from_array(np.array(0.0005, np.float32), "b_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_int", "b_scale"], ["b"], name="bias_DQ"))
        inputs.append("b")
    nodes.append(helper.make_node(consumer, inputs, ["y"], name=consumer.lower()))
    x_shape = [1, 3, 8, 8] if consumer == "Conv" else [2, 12]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("kwargs, rule, node", [
    ({"zero_point": 3}, "symmetric", "x_Q"),
    ({"weight_axis": 1}, "weight-axis", "w_DQ"),
    ({"weight_type": TensorProto.INT4}, "int4", "w_DQ"),
    ({"bias_qdq": True}, "bias", "bias_DQ"),
    ({"consumer": "MatMul", "weight_axis": 0}, "weight-axis", "w_DQ"),
    ({"consumer": "MatMul", "weight_axis": 1, "weight_type": TensorProto.INT4}, "int4", "w_DQ"),
])
def test_the_lint_names_the_node_that_breaks_each_rule(kwargs, rule, node):
    findings = lint_onnx(conv_qdq_graph(**kwargs))
    assert (node, rule) in {(f.node, f.rule) for f in findings}, findings
    clean = conv_qdq_graph(consumer=kwargs.get("consumer", "Conv"), weight_axis=1 if kwargs.get("consumer") else 0)
    assert lint_onnx(clean) == []  # the same graph within the rules is clean


def test_int4_blocked_matmul_weights_are_legal():
    model = conv_qdq_graph(consumer="MatMul", weight_axis=0, weight_type=TensorProto.INT4, block=4)
    assert [f for f in lint_onnx(model) if f.rule in ("int4", "weight-axis")] == []


def test_an_asymmetric_file_from_onnx_runtime_is_rejected_naming_its_nodes(tmp_path):
    """ONNX Runtime's quantize_static with its defaults (QDQ, asymmetric activations, Q/DQ on biases):
    ``deploypipe export --check`` exits 1 and names the nodes; TensorRT-RTX's parser rejects it too."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    torch.onnx.export(net, (torch.rand(1, 3, 8, 8),), str(tmp_path / "f.onnx"), input_names=["images"],
                      output_names=["logits"], dynamo=False, opset_version=17)

    class Reader(CalibrationDataReader):
        def __init__(self):
            g = np.random.default_rng(0)
            self.items = iter([{"images": g.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    code, out, err = run_main("export", "--check", str(tmp_path / "ort.onnx"))
    assert code == 1, err
    assert re.search(r"images_QuantizeLinear \(QuantizeLinear\): symmetric: zero point", out)
    assert "0.bias_DequantizeLinear (DequantizeLinear): bias" in out and "parser" in out
    assert parser_errors(tmp_path / "ort.onnx", trt_rtx)


# --------------------------------------------------------------------------- our own exports
def _models():
    from encoder_models import encoder_classifier
    from deploypipe.zoo import digits_cnn, resnet20

    torch.manual_seed(0)
    return {"cnn": (digits_cnn(), (1, 8, 8)), "resnet": (resnet20(num_classes=10), (3, 16, 16)),
            "transformer": (encoder_classifier(), (1, 8, 8))}


@pytest.mark.parametrize("name", ["cnn", "resnet", "transformer", "sparse-cnn"])
def test_every_export_of_the_suites_models_is_clean_parses_and_builds(name, tmp_path):
    """W8A8 exports (residual Q/DQ in the ResNet, attention Q/DQ in the transformer, 2:4 layers in the
    sparse CNN): the lint is clean, TensorRT-RTX parses and builds, and engine.json says what was built."""
    model, shape = _models()[name.removeprefix("sparse-")]
    sparse = {}
    if name.startswith("sparse"):
        model, report = dp.sparsify(model, [(torch.rand(32, *shape), torch.randint(0, 10, (32,)))],
                                    dp.SparsifyConfig(pattern="2:4", epochs=1, lr=1e-3, channels_last=False))
        sparse = report.layers
    q, report = dp.quantize(model.eval(), torch.rand(64, *shape), dp.QuantizeConfig(weight_bits=8, act_bits=8,
                                                                                     method="rtn"), sparse_layers=sparse)
    if name == "resnet":
        assert any(r["op"] == "add" for r in report.transform["tensor_quant"])
    if name == "transformer":
        assert report.transform["attention"]
    out = dp.export(q, shape, tmp_path, dp.ExportConfig(format="both", batch=[1, 4]), sparse_2_4=bool(sparse))
    assert out.findings == [] and out.parser_errors == []
    info = json.loads((tmp_path / "engine.json").read_text())
    assert info == out.engine_info and info["backend"] == "tensorrt-rtx" and info["strongly_typed"]
    assert info["plan_bytes"] == (tmp_path / "engine.plan").stat().st_size > 0
    assert info["inputs"][0]["name"] == "images" and info["inputs"][0]["shape"] == [-1, *shape]
    assert info["inputs"][0]["profile"] == [[1, *shape], [4, *shape], [4, *shape]]  # min, opt (middle), max
    assert info["outputs"] == [{"name": "logits", "shape": [-1, 10], "dtype": "FLOAT"}]
    import hashlib

    assert info["onnx_sha256"] == hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest()
    assert info["flags"] == (["SPARSE_WEIGHTS"] if sparse else [])
    assert out.parity["onnx_exact_top1_agreement"] == 1.0


def test_a_bad_file_is_rejected_by_the_builder_for_the_stated_reason(tmp_path):
    """INT4 convolution weights: the lint names the rule; TensorRT-RTX parses the file but its builder
    fails on the INT4 weight type of the convolution; the export stage refuses before building."""
    path = tmp_path / "int4conv.onnx"
    onnx.save(conv_qdq_graph(weight_type=TensorProto.INT4), str(path))
    assert [(f.node, f.rule) for f in lint_onnx(path)] == [("w_DQ", "int4")]
    assert "INT4 convolution" in str(lint_onnx(path)[0])
    with pytest.raises((ValueError, RuntimeError), match="dtype|Int4|INT4|type"):
        build_engine(path)
    legal = tmp_path / "int8conv.onnx"
    onnx.save(conv_qdq_graph(), str(legal))
    assert build_engine(legal, profile=(1, 1, 1)).info["plan_bytes"] > 0  # the same graph in INT8 builds


def parse_pbtxt(text: str) -> dict:
    """Triton's config.pbtxt, read back: name, platform, max_batch_size and the I/O blocks."""
    out = {"name": re.search(r'^name: "(.+)"', text, re.M)[1], "platform": re.search(r'^platform: "(.+)"', text, re.M)[1],
           "max_batch_size": int(re.search(r"^max_batch_size: (\d+)", text, re.M)[1])}
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[(.*?)^\]", text, re.M | re.S)[1]
        out[kind] = [{"name": n, "data_type": t, "dims": [int(d) for d in dims.split(",") if d.strip()]}
                     for n, t, dims in re.findall(r'name: "(.+?)"\s+data_type: (\w+)\s+dims: \[(.*?)\]', block)]
    return out


@pytest.mark.usefixtures("cli_store")
def test_train_quantize_certify_export_bundles_and_registers(tmp_path):
    """A pipeline ending in export: the bundle's config.pbtxt matches the ONNX file's I/O, the model card
    names the certified accuracy, and the registered version carries its tags and alias candidate;
    ``deploypipe promote`` moves production onto it."""
    (tmp_path / "p.yaml").write_text("""
name: ship
model: zoo:digits_cnn
data: {source: digits, limit_train: 400, limit_test: 100, calib_size: 64}
stages:
  - train: {epochs: 2, batch_size: 64, lr: 0.05, noise_sigma: 0.12}
  - quantize: {weight_bits: 8, act_bits: 8, method: rtn}
  - certify: {sigma: 0.12, n0: 20, n: 100, alpha: 0.01, num_images: 6}
  - export: {register: digits-demo, batch: [1, 16]}
""")
    code, out, err = run_main("run", "p.yaml", "--json", cwd=tmp_path)
    assert code == 0, err[-2000:]
    stage = last_json(out)["stages"][3]
    folder = tmp_path / stage["dir"]
    inputs, outputs = onnx_io(folder / "model.onnx")
    for entry, platform in (("digits_cnn", "tensorrt_plan"), ("digits_cnn_onnx", "onnxruntime_onnx")):
        cfg = parse_pbtxt((folder / "bundle" / entry / "config.pbtxt").read_text())
        assert cfg["name"] == entry and cfg["platform"] == platform and cfg["max_batch_size"] == 16
        assert [(t["name"], t["dims"]) for t in cfg["input"]] == [(t["name"], t["shape"][1:]) for t in inputs]
        assert [(t["name"], t["dims"]) for t in cfg["output"]] == [(t["name"], t["shape"][1:]) for t in outputs]
        assert {t["data_type"] for t in cfg["input"] + cfg["output"]} == {"TYPE_FP32"}
    assert (folder / "bundle" / "digits_cnn" / "1" / "model.plan").read_bytes() == (folder / "engine.plan").read_bytes()
    card = (folder / "bundle" / "model_card.md").read_text()
    certify = last_json(out)["stages"][2]["metrics"]
    assert f"average certified radius**: {certify['acr']:.3f}" in card and "| quantize |" in card
    assert stage["metrics"]["shipped_acr"] == pytest.approx(certify["acr"])
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    version = client.get_model_version_by_alias("digits-demo", "candidate")
    result = json.loads((folder / "result.json").read_text())
    assert str(version.version) == result["registered_version"] == "1" and version.run_id == stage["run_id"]
    assert version.tags["backend"].startswith("tensorrt-rtx") and len(version.tags["onnx_sha256"]) == 64
    assert float(version.tags["test_top1"]) == pytest.approx(stage["metrics"]["test_top1"], abs=1e-4)
    assert float(version.tags["acr"]) == pytest.approx(certify["acr"], abs=1e-4)
    assert version.source.endswith("/bundle")
    code, out, err = run_main("promote", "digits-demo", "1", "--alias", "production", cwd=tmp_path)
    assert code == 0, err
    assert str(client.get_model_version_by_alias("digits-demo", "production").version) == "1"
    code, _, err = run_main("promote", "digits-demo", "7", cwd=tmp_path)
    assert code == 2 and "no version 7" in err


@pytest.mark.parametrize("args, expected", [
    (["--model", "zoo:digits_cnn", "--format", "tensorrt", "--engine-backend", "tensorrt"], "pip install"),
    (["--model", "zoo:digits_cnn", "--profile", "8,4,64"], "profile [8, 4, 64] is not min,opt,max"),
    (["--check", "missing.onnx"], "does not exist"),
    (["--model", "encoder_models:NoExport"], "cannot be exported to ONNX"),
])
def test_bad_export_input_exits_2_with_one_line_and_nothing_written(tmp_path, cli_store, args, expected):
    code, _, err = run_main("export", *args, "--out", "x", cwd=tmp_path)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "x" / "export").exists()


def test_running_an_engine_needs_a_gpu():
    from deploypipe.stages.export.engine import EngineRunner

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench/gpu/export.py runs engines")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        EngineRunner(b"")
    assert tensorrt_module("auto")[1] in ("tensorrt", "tensorrt-rtx")


# --------------------------------------------------------------------------- the ONNX Runtime CPU file
def _clip_q_graph(lo_steps: float, hi_steps: float, zero_type=TensorProto.INT8) -> onnx.ModelProto:
    """x -> Clip(lo * s, hi * s) -> Q(s, zero 0) -> DQ -> y, s = 0.1."""
    inits = [numpy_helper.from_array(np.array(lo_steps * 0.1, np.float32), "lo"),
             numpy_helper.from_array(np.array(hi_steps * 0.1, np.float32), "hi"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             helper.make_tensor("z", zero_type, [], [0])]
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("lo, hi, zero_type, dropped", [(-127, 127, TensorProto.INT8, 1), (-7, 7, TensorProto.INT8, 0),
                                                         (0, 127, TensorProto.UINT8, 0)])
def test_the_cpu_file_drops_only_the_int8_grid_clip_and_moves_only_the_lowest_code(tmp_path, lo, hi, zero_type,
                                                                                  dropped):
    import onnxruntime as ort

    from deploypipe.stages.export.cpu_layout import cpu_file

    onnx.save(_clip_q_graph(lo, hi, zero_type), str(tmp_path / "a.onnx"))
    assert cpu_file(tmp_path / "a.onnx", tmp_path / "b.onnx") == dropped
    assert sum(n.op_type == "Clip" for n in onnx.load(str(tmp_path / "b.onnx")).graph.node) == 1 - dropped
    x = np.array([-20.0, -12.76, -12.74, -3.33, 0.04, 13.0], np.float32)  # in steps of 0.1: -200, -127.6, -127.4, ...
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for f in ("a.onnx", "b.onnx"))
    if dropped:  # the full INT8 container: below -127.5 steps the code is -128, not -127; all else equal
        np.testing.assert_allclose(a, [-12.7, -12.7, -12.7, -3.3, 0.0, 12.7], rtol=1e-6)
        np.testing.assert_allclose(b, [-12.8, -12.8, -12.7, -3.3, 0.0, 12.7], rtol=1e-6)
    else:
        np.testing.assert_array_equal(a, b)


def _twin_quantizer_graph() -> onnx.ModelProto:
    """x -> Q/DQ (s 0.1) -> Conv (INT8 per-channel weight, Q/DQ on a float initializer) -> + the same
    x through a second, identical Q/DQ (other constant names), and a third Q/DQ on x at another
    scale -> y = conv + dq2 + dq3."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4, 3, 3)).astype(np.float32)
    ws = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    inits = [*(numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s1", 0.1), ("s2", 0.1), ("s3", 0.07))),
             *(helper.make_tensor(z, TensorProto.UINT8, [], [0]) for z in ("z1", "z2", "z3")),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             helper.make_tensor("wz", TensorProto.INT8, [4], [0] * 4)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["qw"], axis=0),
             helper.make_node("DequantizeLinear", ["qw", "ws", "wz"], ["dw"], axis=0),
             helper.make_node("Conv", ["d1", "dw"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["x", "s2", "z2"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"]),
             helper.make_node("QuantizeLinear", ["x", "s3", "z3"], ["q3"]),
             helper.make_node("DequantizeLinear", ["q3", "s3", "z3"], ["d3"]),
             helper.make_node("Add", ["c", "d2"], ["a"]), helper.make_node("Add", ["a", "d3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_cpu_file_keeps_one_of_identical_quantizers_and_stores_int8_weights(tmp_path):
    import onnxruntime as ort

    from deploypipe.stages.export.cpu_layout import cpu_file

    onnx.save(_twin_quantizer_graph(), str(tmp_path / "a.onnx"))
    cpu_file(tmp_path / "a.onnx", tmp_path / "b.onnx")
    b = onnx.load(str(tmp_path / "b.onnx"))
    qs = [n for n in b.graph.node if n.op_type == "QuantizeLinear"]
    # the twin Q (same tensor, same scale and zero point) and its DQ are gone; the other scale stays;
    # the weight's Q became its INT8 initializer
    assert sorted(n.input[1] for n in qs) == ["s1", "s3"]
    assert sum(n.op_type == "DequantizeLinear" for n in b.graph.node) == 3
    inits = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert "w" not in inits and inits["qw"].dtype == np.int8
    w = numpy_helper.to_array(next(i for i in _twin_quantizer_graph().graph.initializer if i.name == "w"))
    ws = inits["ws"].reshape(4, 1, 1, 1)
    np.testing.assert_array_equal(inits["qw"], np.clip(np.rint(w / ws), -128, 127).astype(np.int8))
    x = np.random.default_rng(1).uniform(-1, 3, size=(1, 4, 5, 5)).astype(np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graphs as written
    ya, yb = (ort.InferenceSession(str(tmp_path / f), plain, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
              for f in ("a.onnx", "b.onnx"))
    np.testing.assert_array_equal(ya, yb)


def test_the_cpu_file_lets_onnx_runtime_fuse_a_quantized_resnet(tmp_path):
    """A ResNet quantized with unsigned post-ReLU inputs: ONNX Runtime fuses the convolutions of
    model.cpu.onnx into QLinearConv (not those of the TensorRT file), and both agree with PyTorch."""
    from deploypipe.zoo import resnet20

    torch.manual_seed(0)
    model = resnet20(num_classes=10).eval()
    q, _ = dp.quantize(model, torch.rand(64, 3, 16, 16), dp.QuantizeConfig(weight_bits=8, act_bits=8, method="rtn",
                                                                           unsigned_activations=True))
    out = dp.export(q, (3, 16, 16), tmp_path, dp.ExportConfig(format="auto", batch=[4]),
                    parity_data=[torch.rand(64, 3, 16, 16)])
    # UINT8 activations break TensorRT's rules: format auto (TensorRT-RTX installed) skips the engine, no error
    assert out.findings and out.engine is None and not (tmp_path / "engine.plan").exists()
    assert out.cpu_onnx == tmp_path / "model.cpu.onnx" and out.cpu_onnx.is_file()
    fused = out.integer_kernels["model.cpu.onnx"].get("QLinearConv", 0)
    assert fused >= 18 > out.integer_kernels["model.onnx"].get("QLinearConv", 0), out.integer_kernels
    # the 7 identity-shortcut adds read the conv's grid; the last one feeds the pooling, not a Q: 6 fuse
    assert out.integer_kernels["model.cpu.onnx"].get("QLinearAdd", 0) >= 6, out.integer_kernels
    assert out.cpu_onnx.stat().st_size < out.onnx.stat().st_size / 2.5  # INT8 weight initializers
    assert out.cpu_parity["onnx_top1_agreement"] >= 0.98 and out.metrics["cpu_file_ort_integer_kernels"] >= 18
    assert "onnxruntime_cpu_file_ms" in out.latency[0]
