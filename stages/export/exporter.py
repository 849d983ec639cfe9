"""Export as one call: ``export(model, example, out_dir, config) -> ExportReport``.

Writes ``model.onnx`` (deploypipe.onnx_export: dynamic batch, Q/DQ for a quantized model, FP16 by
cast on request), checks it (``onnx.checker`` with shape inference, the TensorRT lint of trt_lint.py,
ONNX Runtime against PyTorch on ``parity_data``), measures ONNX Runtime's CPU latency against PyTorch
eager at each batch size, and builds a TensorRT engine (``engine.plan`` + ``engine.json`` + the build
log) when asked or when a TensorRT module is installed.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from deploypipe import batches as B
from deploypipe.onnx_export import export_onnx, onnx_parity

from .config import ExportConfig
from .cpu_layout import cpu_file, integer_kernels
from .engine import build_engine, parser_errors, tensorrt_module
from .trt_lint import Finding, lint_onnx


@dataclass
class ExportReport:
    """What ``export`` wrote and found: the files, the lint findings and TensorRT parser errors, the
    ONNX Runtime parity figures, the engine's description (engine.json) and latency rows."""

    onnx: Path
    findings: list[Finding]
    parser_errors: list[str] = field(default_factory=list)
    parity: dict[str, float] = field(default_factory=dict)
    engine: Optional[Path] = None
    engine_info: Optional[dict] = None
    latency: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    cpu_onnx: Optional[Path] = None  # model.cpu.onnx (cpu_layout.py), for a quantized model
    cpu_parity: dict[str, float] = field(default_factory=dict)
    integer_kernels: dict[str, dict[str, int]] = field(default_factory=dict)  # file name -> {op: count} in ORT


class HalfPrecision(nn.Module):
    """A float model run in float16: float inputs are cast on the way in, the output back to float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        def cast(t):
            return t.half() if isinstance(t, torch.Tensor) and torch.is_floating_point(t) else t

        out = B.output_tensor(self.model(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()}))
        return out.float()


def is_quantized(model: nn.Module) -> bool:
    return any(hasattr(m, "snap_to_grid") for m in model.modules())


def _at_batch(example: B.Batch, batch: int) -> B.Batch:
    """``example``'s first sample repeated ``batch`` times (the latency inputs)."""
    one = B.take(example, slice(0, 1))
    if isinstance(one, torch.Tensor):
        return one.repeat(batch, *[1] * (one.dim() - 1))
    args, kwargs = B.model_inputs(one)
    if kwargs:
        return {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in kwargs.items()}
    return args[0].repeat(batch, *[1] * (args[0].dim() - 1))


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure_latency(model: nn.Module, onnx_path: Path, example: B.Batch, batches: list[int], repeats: int,
                    threads: Optional[int] = None, cpu_path: Optional[Path] = None) -> list[dict]:
    """Median ms per forward pass at each batch size: ONNX Runtime (CPU) on the file (and on
    ``cpu_path``, the CPU layout, when given), PyTorch eager on the model (CPU, inference mode, the
    same threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    cpu_session = (ort.InferenceSession(str(cpu_path), options, providers=["CPUExecutionProvider"])
                   if cpu_path is not None else None)
    names = [i.name for i in session.get_inputs()]
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    rows = []
    for b in batches:
        batch = _at_batch(example, b)
        args, kwargs = B.model_inputs(batch)
        feeds = {n: t.numpy() for n, t in zip(names, kwargs.values() if kwargs else args)}
        with torch.inference_mode():
            eager = _median_ms(lambda: B.call(model, batch), repeats)
        rows.append({"batch": b, "onnxruntime_ms": _median_ms(lambda: session.run(None, feeds), repeats),
                     "pytorch_eager_ms": eager})
        if cpu_session is not None:
            rows[-1]["onnxruntime_cpu_file_ms"] = _median_ms(lambda: cpu_session.run(None, feeds), repeats)
    model.train(was_training)
    return rows


def export(model: nn.Module, example: B.Batch | tuple[int, ...], out_dir: str | Path,
           config: Optional[ExportConfig] = None, *, parity_data: Any = None, sparse_2_4: bool = False,
           timing_cache: Optional[Path] = None, log: Callable[[str], None] = lambda _msg: None) -> ExportReport:
    """Export ``model`` into ``out_dir`` (see the module docstring) and return what was found.

    ``example``: a batch the model takes, or an image shape C x H x W. ``parity_data``: batches (or an
    ImageSet) on which ONNX Runtime must agree with PyTorch (default: ``example``). ``sparse_2_4``: the
    model has 2:4 layers (the builder may use sparse kernels with ``sparse_weights`` auto).

    >>> import tempfile, torch
    >>> from deploypipe import export, ExportConfig
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    >>> report = export(net, torch.rand(4, 3, 2, 2), tempfile.mkdtemp(), ExportConfig(format="onnx", batch=[1, 4]))
    >>> report.findings, report.parity["onnx_top1_agreement"], [r["batch"] for r in report.latency]
    ([], 1.0, [1, 4])
    """
    cfg = config or ExportConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(example, (tuple, list)) and all(isinstance(d, int) for d in example):
        example = torch.rand(2, *example)
    quantized = is_quantized(model)
    if quantized and cfg.precision != "as-quantized":
        raise ValueError(f"the model is quantized; precision {cfg.precision} is for a float model — fix: export it "
                         "with precision as-quantized, or export the float model it was made from")
    net = HalfPrecision(copy.deepcopy(model).cpu()) if cfg.precision == "fp16" else model
    try:
        path = export_onnx(net, example, out / "model.onnx")
    except Exception as err:  # an op the exporter does not know, a Python-side branch it cannot trace, ...
        raise ValueError(f"the model cannot be exported to ONNX ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''}) — fix: replace the operation the "
                         "exporter names, or export the model before the stage that added it") from None
    import onnx

    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path))  # fills in value_info, fails on inconsistent shapes
    report = ExportReport(onnx=path, findings=lint_onnx(path))
    for f in report.findings:
        log(f"TensorRT lint: {f}")
    parity_on = parity_data if parity_data is not None else [example]
    report.parity = onnx_parity(net, path, parity_on, exact_images=min(cfg.parity_images, 1000))
    report.integer_kernels[path.name] = integer_kernels(path)
    if quantized and cfg.cpu_file:
        report.cpu_onnx = out / "model.cpu.onnx"
        dropped = cpu_file(path, report.cpu_onnx)
        report.cpu_parity = onnx_parity(net, report.cpu_onnx, parity_on, exact_images=min(cfg.parity_images, 1000))
        report.integer_kernels[report.cpu_onnx.name] = integer_kernels(report.cpu_onnx)
        log(f"{report.cpu_onnx.name} for ONNX Runtime on CPUs ({dropped} grid Clips dropped): "
            f"{_kernels(report.integer_kernels[report.cpu_onnx.name])} (model.onnx: "
            f"{_kernels(report.integer_kernels[path.name])}); top-1 agreement with PyTorch "
            f"{report.cpu_parity['onnx_top1_agreement']:.4f}")
    report.latency = measure_latency(net, path, example, cfg.batch, cfg.latency_repeats, cpu_path=report.cpu_onnx)
    try:
        trt, backend = tensorrt_module(cfg.engine_backend)
    except ValueError:
        if cfg.format in ("tensorrt", "both"):
            raise
        trt = None
    if trt is not None:
        report.parser_errors = parser_errors(path, trt)
    wants = cfg.wants_engine(trt is not None)
    if wants and cfg.format == "auto" and (report.findings or report.parser_errors):
        log(f"no TensorRT engine: {path.name} breaks TensorRT's rules ({len(report.findings)} lint findings, "
            f"{len(report.parser_errors)} parser errors; format auto builds one only for a legal file)")
        wants = False
    if wants:
        if report.findings or report.parser_errors:
            problems = [str(f) for f in report.findings] + report.parser_errors
            raise ValueError(f"{path} breaks TensorRT's rules, no engine built: {'; '.join(problems)[:600]} — fix: "
                             "export a symmetric Q/DQ graph (deploypipe's quantize stage writes one)")
        sparse = cfg.sparse_weights == "on" or (cfg.sparse_weights == "auto" and sparse_2_4)
        build = build_engine(path, cfg.engine_profile(), cfg.engine_backend, cfg.workspace_mb, timing_cache, sparse)
        report.engine = out / "engine.plan"
        report.engine.write_bytes(build.plan)
        report.engine_info = build.info
        (out / "engine.json").write_text(json.dumps(build.info, indent=2))
        (out / "build_log.txt").write_text("\n".join(build.log) + "\n")
        log(f"{build.info['backend']} {build.info['version']} built {report.engine.name} "
            f"({build.info['plan_bytes'] / 2**20:.1f} MiB) in {build.info['build_seconds']:.1f} s")
    report.metrics = _metrics(report, quantized)
    return report


def _kernels(ops: dict[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in ops.items()) + " fused" if ops else "no integer kernels fused"


def _metrics(r: ExportReport, quantized: bool) -> dict[str, float]:
    m = {k: float(v) for k, v in r.parity.items()}
    m["ort_integer_kernels"] = float(sum(r.integer_kernels.get(r.onnx.name, {}).values()))
    if r.cpu_onnx is not None:
        m.update({f"cpu_file_{k}": float(v) for k, v in r.cpu_parity.items()})
        m["cpu_file_ort_integer_kernels"] = float(sum(r.integer_kernels.get(r.cpu_onnx.name, {}).values()))
    m.update({"onnx_bytes": float(r.onnx.stat().st_size), "trt_lint_findings": float(len(r.findings)),
              "trt_parser_errors": float(len(r.parser_errors)), "quantized": float(quantized)})
    for row in r.latency:
        b = row["batch"]
        m[f"onnxruntime_ms_b{b}"], m[f"pytorch_eager_ms_b{b}"] = row["onnxruntime_ms"], row["pytorch_eager_ms"]
        m[f"onnxruntime_speedup_b{b}"] = row["pytorch_eager_ms"] / max(row["onnxruntime_ms"], 1e-9)
        if "onnxruntime_cpu_file_ms" in row:
            m[f"onnxruntime_cpu_file_ms_b{b}"] = row["onnxruntime_cpu_file_ms"]
            m[f"onnxruntime_cpu_file_speedup_b{b}"] = (row["pytorch_eager_ms"]
                                                       / max(row["onnxruntime_cpu_file_ms"], 1e-9))
    if r.engine_info:
        m["engine_bytes"] = float(r.engine_info["plan_bytes"])
        m["engine_build_seconds"] = float(r.engine_info["build_seconds"])
    return m
