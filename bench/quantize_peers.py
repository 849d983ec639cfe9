"""Peer post-training INT8 quantizers, run on the same model and calibration set as ours.

``bench/quantize.py`` compares deploypipe's quantizer with these peers in one run. Every peer gets
the FP32 ``torch.nn.Module`` (which takes images in [0, 1] and normalises inside) and the same
calibration images (float32 NCHW in [0, 1]); none sees labels.

- **ONNX Runtime static INT8** (``ort_static_int8``): the model is exported to ONNX (opset 17,
  TorchScript exporter, input ``images``, output ``logits``, dynamic batch), pre-processed with
  ``onnxruntime.quantization.shape_inference.quant_pre_process`` (symbolic shape inference, ONNX
  shape inference and graph optimisation; skipped silently when it fails), then quantized with
  ``onnxruntime.quantization.quantize_static``: QDQ format, per-channel weights, INT8 weights and
  INT8 activations, both symmetric (``WeightSymmetric`` / ``ActivationSymmetric``, TensorRT's
  convention), calibrated by MinMax (default), Entropy or Percentile over the calibration array in
  batches. ``onnx_top1`` scores the result (or any ONNX classifier) with ONNX Runtime on CPU.
- **NNCF** (``nncf_int8``): OpenVINO's Neural Network Compression Framework,
  ``nncf.quantize(model, nncf.Dataset(...))`` with its defaults on CPU: INT8,
  ``QuantizationPreset.PERFORMANCE`` (symmetric weights and activations), per-channel weights
  with min/max ranges, per-tensor activations with the mean over calibration batches of each
  batch's min/max (so the batch size matters), then fast bias correction. It returns the torch
  model with fake-quantize modules inserted (BatchNorm is not folded first: weights are quantized
  before BN), evaluated in PyTorch like ours. Its first use compiles a small C++ extension
  (about a minute; cached under ``~/.cache/torch_extensions``). NNCF is optional: when it is not
  importable ``nncf_int8`` returns None and ``nncf_status`` says why. ``pip install nncf`` (3.4.0)
  pulls no torch, but install it in a separate venv (``--system-site-packages``) anyway so the
  benchmark's own environment stays as it is.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

CalibMethod = Literal["minmax", "entropy", "percentile"]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
OPSET = 17


# --------------------------------------------------------------------------- ONNX Runtime
def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    """Export the FP32 model in eval mode (its training flag is restored afterwards) to ONNX with
    a dynamic batch axis."""
    param = next(model.parameters(), None)
    dummy = torch.zeros((1, *input_shape), dtype=torch.float32,
                        device=param.device if param is not None else "cpu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based export"
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # strided slices stay
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    finally:
        model.train(was_training)
    return path


def _preprocess(fp32: Path, out: Path) -> Path:
    """ORT's recommended pre-quantization pass; returns the input unchanged if the pass fails."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32), str(out))
        return out if out.is_file() else fp32
    except Exception:  # noqa: BLE001 - optional step: symbolic shape inference may not handle every graph
        return fp32


def _calibration_reader(calib: np.ndarray, batch_size: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Feeds ``calib`` to the calibrator in batches of ``batch_size``."""

        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

        def rewind(self) -> None:
            data = np.ascontiguousarray(calib, dtype=np.float32)
            self._batches = (data[i:i + batch_size] for i in range(0, len(data), batch_size))

    return ArrayReader()


@contextmanager
def _calibration_threads(threads: int | None) -> Iterator[None]:
    """Cap the intra-op threads of the session ORT's calibrator runs. ``quantize_static`` has no
    option for it, so ``CalibraterBase.create_inference_session`` is replaced for the duration by
    the same code plus the thread count (nothing is replaced when ``threads`` is None)."""
    if threads is None:
        yield
        return
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibraterBase

    original = CalibraterBase.create_inference_session

    def create_inference_session(self: CalibraterBase) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                  providers=self.execution_providers)

    CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = original


def ort_static_int8(model: nn.Module, input_shape: tuple[int, int, int], calib: np.ndarray, workdir: Path,
                    per_channel: bool = True, method: CalibMethod = "minmax", batch_size: int = 64,
                    name: str = "model", threads: int | None = None,
                    extra_options: dict[str, Any] | None = None, num_bins: int | None = None,
                    quiet: bool = True) -> Path:
    """Quantize ``model`` with ONNX Runtime's static INT8 PTQ (QDQ, symmetric INT8 weights and
    activations) calibrated on ``calib`` (float32 NCHW in [0, 1]); returns the quantized ONNX path.

    Files written under ``workdir``: ``{name}.fp32.onnx``, ``{name}.pre.onnx`` (when pre-processing
    works) and ``{name}.int8.{method}.onnx``. ``threads`` caps the intra-op threads of the
    calibration session (None: ONNX Runtime's default, all cores); ``extra_options`` adds to or
    overrides the ``quantize_static`` extra options (e.g. ``{"CalibPercentile": 99.99}``);
    ``quiet`` swallows what the entropy / percentile calibrators print.

    ``num_bins`` sets the histogram size of the entropy / percentile calibrators (None: ORT's
    defaults, 128 / 2048). ``quantize_static`` does not forward it, and with its 128 bins against
    128 quantized bins the entropy search has a single candidate, the whole range, so "entropy"
    then gives MinMax's ranges; ``num_bins=2048`` (TensorRT's histogram size) makes it a real KL
    search. When set, the calibration runs here (same calibrator, same data) and its ranges reach
    ``quantize_static`` through a calibration cache, ``{name}.calib.{method}.json``.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method '{method}' (use {', '.join(methods)})")
    if calib.ndim != 4 or tuple(calib.shape[1:]) != tuple(input_shape):
        raise ValueError(f"calibration array has shape {calib.shape}, expected (N, {', '.join(map(str, input_shape))})")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, input_shape, workdir / f"{name}.fp32.onnx")
    source = _preprocess(fp32, workdir / f"{name}.pre.onnx")
    out = workdir / f"{name}.int8.{method}.onnx"
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, **(extra_options or {})}
    reader = _calibration_reader(calib, batch_size)
    cache: Path | None = None
    with _calibration_threads(threads), redirect_stdout(io.StringIO()) if quiet else nullcontext():
        if num_bins is not None and method != "minmax":
            cache = workdir / f"{name}.calib.{method}.json"
            _calibrate_to_cache(source, reader, methods[method], num_bins, extra, cache)
        quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], extra_options=extra,
                        calibration_providers=["CPUExecutionProvider"], calibration_cache_path=cache)
    return out


def _calibrate_to_cache(model: Path, reader: Any, method: Any, num_bins: int, extra: dict[str, Any],
                        cache: Path) -> None:
    """Run ORT's histogram calibrator with ``num_bins`` bins and save its ranges to ``cache`` in
    the format ``quantize_static(calibration_cache_path=...)`` reads. The calibrator options that
    ``quantize_static`` would pass on (symmetric range, percentile) are passed on here too."""
    import tempfile

    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    options: dict[str, Any] = {"num_bins": num_bins}
    for key, option in (("CalibTensorRangeSymmetric", "symmetric"), ("CalibPercentile", "percentile")):
        if key in extra:
            options[option] = extra[key]
    with tempfile.TemporaryDirectory(prefix="ort.calib.") as tmp:
        calibrator = create_calibrator(model, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=method, providers=["CPUExecutionProvider"],
                                       extra_options=options)
        reader.rewind()
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator


def ort_session(path: Path, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (1 by default, to stay polite
    on a shared machine)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_logits(path: Path, images: np.ndarray, batch_size: int = 256, threads: int = 1) -> np.ndarray:
    """Logits of an ONNX classifier on float32 NCHW ``images``, in ONNX Runtime on CPU."""
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    data = np.ascontiguousarray(images, dtype=np.float32)
    return np.concatenate([session.run(None, {name: data[i:i + batch_size]})[0]
                           for i in range(0, len(data), batch_size)])


def onnx_top1(path: Path, images: np.ndarray, labels: np.ndarray, batch_size: int = 256, threads: int = 1) -> float:
    """Top-1 accuracy (0..1) of an ONNX classifier in ONNX Runtime on CPU."""
    logits = onnx_logits(path, images, batch_size, threads)
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def count_qdq(path: Path) -> dict[str, int]:
    """Number of QuantizeLinear / DequantizeLinear nodes in an ONNX file (0 and 0 when FP32)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}


# --------------------------------------------------------------------------- NNCF
def nncf_status() -> str:
    """"nncf X.Y.Z" when NNCF imports, else "nncf not installed: <reason>" (or "nncf broken: ...")."""
    try:
        import nncf
    except ImportError as err:
        return f"nncf not installed: {err}"
    except Exception as err:  # noqa: BLE001 - imports but fails to initialise (e.g. against this torch)
        return f"nncf broken: {type(err).__name__}: {err}"
    return f"nncf {nncf.__version__}"


class _Root(nn.Module):
    """A plain root module around the model. NNCF registers its hook storage as a child of the root
    module, which an ``nn.Sequential`` root would then call as one of its layers."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def nncf_int8(model: nn.Module, calib: torch.Tensor | np.ndarray, batch_size: int = 64,
              subset_size: int | None = None, fast_bias_correction: bool = True) -> nn.Module | None:
    """Quantize ``model`` with ``nncf.quantize`` (default INT8 preset, CPU) calibrated on ``calib``
    (float32 NCHW in [0, 1]); returns the quantized torch model (eval mode), or None when NNCF is
    not importable (see ``nncf_status``); errors inside NNCF propagate. The input model is left
    untouched; the result wraps a copy of it (NNCF's hooks hang on the wrapper).

    ``subset_size`` (in images) defaults to all calibration images (NNCF's own default is 300).
    """
    try:
        import nncf
    except Exception:  # noqa: BLE001 - same cases as nncf_status
        return None

    data = torch.as_tensor(calib, dtype=torch.float32).cpu()
    batches = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    # subset_size counts dataset items (batches here), so convert from images
    images = len(data) if subset_size is None else min(subset_size, len(data))
    subset = max(1, -(-images // batch_size))
    net = _Root(copy.deepcopy(model).eval().cpu())
    quantized = nncf.quantize(net, nncf.Dataset(batches), subset_size=subset,
                              fast_bias_correction=fast_bias_correction)
    return quantized.eval()


# --------------------------------------------------------------------------- smoke demo
if __name__ == "__main__":
    import tempfile
    import time

    from deploypipe.config import DataSpec
    from deploypipe.data import load_data
    from deploypipe.zoo import digits_cnn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    splits = load_data(DataSpec(source="digits", calib_size=256))
    shape = splits.input_shape
    calib = splits.calib.as_float(splits.calib.images).numpy()
    x = splits.test.as_float(splits.test.images).numpy()
    y = splits.test.labels.numpy()
    net = digits_cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for xb, yb in splits.train.batches(64, shuffle=True, generator=g):  # one epoch: enough for a smoke test
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    print(f"digits_cnn FP32 (torch): top-1 {(ref.argmax(1) == y).mean():.4f}, max |logit| {np.abs(ref).max():.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for method, bins in (("minmax", None), ("entropy", None), ("entropy", 2048), ("percentile", None)):
            t0 = time.perf_counter()
            q = ort_static_int8(net, shape, calib, Path(tmp), method=method, threads=1, num_bins=bins)
            secs = time.perf_counter() - t0
            out = onnx_logits(q, x)
            label = method + ("" if bins is None else f"/{bins}")
            print(f"ORT int8 {label:12s}: {count_qdq(q)}, pre-processed {(Path(tmp) / 'model.pre.onnx').is_file()}, "
                  f"{secs:.1f}s; top-1 {onnx_top1(q, x, y):.4f}, max |int8 - fp32| {np.abs(out - ref).max():.4f}, "
                  f"argmax agreement {(out.argmax(1) == ref.argmax(1)).mean():.4f}")
        fp32 = onnx_logits(Path(tmp) / "model.fp32.onnx", x)
        print(f"ONNX FP32 vs torch: max |diff| {np.abs(fp32 - ref).max():.2e}")
    print(nncf_status())
    t0 = time.perf_counter()
    qnet = nncf_int8(net, calib)
    if qnet is not None:
        with torch.no_grad():
            out = qnet(torch.from_numpy(x)).numpy()
        print(f"NNCF int8: {time.perf_counter() - t0:.1f}s; top-1 {(out.argmax(1) == y).mean():.4f}, "
              f"max |int8 - fp32| {np.abs(out - ref).max():.4f}, argmax agreement {(out.argmax(1) == ref.argmax(1)).mean():.4f}")
