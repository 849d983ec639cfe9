"""TensorRT engines from the exported ONNX file, with whichever TensorRT module is installed.

- ``tensorrt`` (TensorRT 10/11): engines for datacenter and workstation NVIDIA GPUs; needs NVIDIA's
  package index to install.
- ``tensorrt_rtx`` (TensorRT for RTX, ``pip install tensorrt-rtx-cu12``): builds on any machine, also
  without a GPU; its engines run on RTX GPUs (not on H100/H200).

The network is strongly typed (precisions come from the graph's Q/DQ nodes and casts, as TensorRT 11
requires), with one optimization profile over the batch dimension, a workspace limit, a timing cache
kept between builds, and ``SPARSE_WEIGHTS`` when layers are 2:4. ``EngineBuild.info`` is what
``engine.json`` records. ``EngineRunner`` runs a plan on a CUDA device (TensorRT's runtime needs one):
inputs bound by tensor name, timed on a CUDA stream.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL = ("install one: pip install tensorrt-rtx-cu12==1.7.1.116 (builds engines on any machine, for RTX GPUs), "
           "or TensorRT 10/11 from NVIDIA's index (pip install tensorrt) on a machine with an NVIDIA GPU")


def tensorrt_module(backend: str = "auto") -> tuple[Any, str]:
    """(module, backend name) of the TensorRT to build with: ``auto`` takes TensorRT, then TensorRT-RTX."""
    names = list(BACKENDS) if backend == "auto" else [backend]
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"unknown engine backend {name!r} — fix: use auto, tensorrt or tensorrt-rtx")
        try:
            return importlib.import_module(BACKENDS[name]), name
        except ImportError:
            continue
    what = "no TensorRT module is installed" if backend == "auto" else f"{backend} is not installed"
    raise ValueError(f"{what} — fix: {INSTALL}")


def _logger(trt, messages: list[str]):
    """A TensorRT logger that keeps its messages (for the build log) instead of printing them."""
    class Keep(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            messages.append(f"[{str(severity).split('.')[-1]}] {msg}")

    return Keep()


def network_flags(trt) -> int:
    """Strongly typed when the module offers it (TensorRT 10 and later; the only mode of TensorRT 11)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def parser_errors(path: str | Path, trt) -> list[str]:
    """TensorRT's ONNX parser on the file: one line per error, naming its node; empty when it parses."""
    log: list[str] = []
    logger = _logger(trt, log)
    network = trt.Builder(logger).create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(path)):
        return []
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() if hasattr(e, "node_name") else f"node {e.node()}"
        out.append(f"{node}: {e.desc().splitlines()[0]}")
    return out


@dataclass
class EngineBuild:
    plan: bytes
    info: dict
    log: list[str] = field(default_factory=list)


def _dims(shape) -> list[int]:
    return [int(d) for d in shape]


def build_engine(onnx_path: str | Path, profile: tuple[int, int, int] = (1, 8, 64), backend: str = "auto",
                 workspace_mb: int = 1024, timing_cache: Optional[Path] = None, sparse_weights: bool = False,
                 sequence: tuple[int, int, int] = (1, 128, 512)) -> EngineBuild:
    """Build a strongly typed engine from ``onnx_path`` (see the module docstring). ``profile``: the
    min / opt / max batch; ``sequence``: the same for any other dynamic dimension (token inputs)."""
    lo, opt, hi = profile
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"the optimization profile min {lo} / opt {opt} / max {hi} is not ordered — fix: give "
                         "1 <= min <= opt <= max, e.g. --profile 1,8,64")
    trt, name = tensorrt_module(backend)
    messages: list[str] = []
    logger = _logger(trt, messages)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [f"{parser.get_error(i).desc().splitlines()[0]}" for i in range(parser.num_errors)]
        raise ValueError(f"{name}'s ONNX parser rejects {onnx_path}: {'; '.join(errors)[:400]} — fix: export a "
                         "TensorRT-legal Q/DQ graph (deploypipe export --check FILE names the offending nodes)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    flags = []
    if sparse_weights and hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        flags.append("SPARSE_WEIGHTS")
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    prof = builder.create_optimization_profile()
    inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = _dims(t.shape)
        shapes = []
        for pick, seq in zip((lo, opt, hi), sequence):
            shapes.append(tuple((pick if axis == 0 else seq) if d < 0 else d for axis, d in enumerate(dims)))
        prof.set_shape(t.name, *shapes)
        inputs.append({"name": t.name, "shape": dims, "dtype": str(t.dtype).split(".")[-1],
                       "profile": [list(s) for s in shapes]})
    config.add_optimization_profile(prof)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        errors = [m for m in messages if m.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
        raise RuntimeError(f"{name} could not build an engine from {onnx_path}: {'; '.join(errors)[:500]}")
    plan = bytes(memoryview(plan))
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    outputs = [{"name": network.get_output(i).name, "shape": _dims(network.get_output(i).shape),
                "dtype": str(network.get_output(i).dtype).split(".")[-1]} for i in range(network.num_outputs)]
    info = {"backend": name, "version": trt.__version__, "target": _target(trt, name, config),
            "onnx_sha256": hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest(), "inputs": inputs,
            "outputs": outputs, "profile": {"min": lo, "opt": opt, "max": hi}, "flags": flags,
            "strongly_typed": bool(network_flags(trt)), "workspace_mb": workspace_mb,
            "build_seconds": seconds, "plan_bytes": len(plan),
            "sparse_layers": [m for m in messages if "sparse" in m.lower()]}
    return EngineBuild(plan, info, messages)


def _target(trt, name: str, config) -> str:
    """What the engine runs on: an RTX engine's compute capabilities, or the build GPU's architecture."""
    if name == "tensorrt-rtx":
        caps = [str(config.get_compute_capability(i)).split(".")[-1] for i in range(config.num_compute_capabilities)]
        return "RTX GPUs (" + (", ".join(caps) if caps else "compute capabilities chosen by TensorRT-RTX") + ")"
    try:
        import torch

        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    except Exception:  # no CUDA device visible: TensorRT would have failed to build already
        return "the build machine's GPU"


class EngineRunner:
    """A serialized engine on a CUDA device: ``run(feeds)`` binds every input and output by tensor
    name (torch tensors on the device) and ``latency_ms(feeds)`` times ``execute_async_v3`` on a CUDA
    stream. Needs a CUDA GPU and the TensorRT runtime the plan was built with."""

    def __init__(self, plan: bytes, backend: str = "auto"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("running a TensorRT engine needs a CUDA GPU — fix: run on a machine with an NVIDIA "
                             "GPU, or check the ONNX file in ONNX Runtime instead")
        trt, _ = tensorrt_module(backend)
        self.trt, self.torch = trt, torch
        self.engine = trt.Runtime(_logger(trt, [])).deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.stream = torch.cuda.Stream()

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        for name in self.inputs:
            x = torch.as_tensor(feeds[name]).cuda().contiguous()
            feeds[name] = x
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = {}
        for name in self.names:
            if name in self.inputs:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return outputs

    def latency_ms(self, feeds: dict[str, Any], repeats: int = 50, warmup: int = 10) -> float:
        """Median milliseconds of one execution (CUDA events on the engine's stream)."""
        torch = self.torch
        for _ in range(warmup):
            self.run(feeds)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.context.execute_async_v3(self.stream.cuda_stream)
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))
