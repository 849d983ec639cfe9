"""Where the base classifier runs while certifying: PyTorch, or ONNX Runtime on the CPU.

Certification is millions of forward passes of one fixed model, and on a CPU ONNX Runtime runs a
small CIFAR network faster than PyTorch's eager mode (bench/certify_throughput.py measures it).
With ``runtime: auto`` a PyTorch model on the CPU is exported to ONNX (float32, dynamic batch) and
certified in ONNX Runtime if, on noisy copies of test images, the two agree on every prediction and
their logits differ by less than 1e-3 (else it stays in PyTorch, with the reason in the log). The
certificate is for the classifier that ran, so the choice never affects soundness; ``runtime:
torch`` forces PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from pathlib import Path
from typing import Optional

import torch


class OnnxClassifier:
    """An ONNX classifier (input ``images`` in [0, 1], output logits) run by ONNX Runtime on CPU."""

    def __init__(self, source, threads: Optional[int] = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if isinstance(source, bytes):
            self.digest = hashlib.sha256(source).hexdigest()  # which classifier was certified
        else:  # a path: ONNX Runtime reads it (and any external-data files beside it) itself
            self.digest = onnx_file_digest(source)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous()
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0]).to(x.device)


def onnx_file_digest(path) -> str:
    """sha256 over an ONNX file and the external-data files its tensors name (names and bytes): which
    weights were certified, also when they live beside the graph (models over 2 GB, or saved so)."""
    import onnx

    from deploypipe.models import content_hash

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from tensors(g)

    path = Path(path)
    h = hashlib.sha256(content_hash(path).encode())
    graph = onnx.load(str(path), load_external_data=False).graph
    names = sorted({e.value for t in tensors(graph) for e in t.external_data if e.key == "location"})
    for name in names:
        h.update(b"\0" + name.encode() + b"\0")
        if (path.parent / name).is_file():  # missing: ONNX Runtime refuses the file
            h.update(content_hash(path.parent / name).encode())
    return h.hexdigest()


def to_onnxruntime(model: torch.nn.Module, input_shape: tuple[int, ...], probe: torch.Tensor,
                   max_logit_diff: float = 1e-3) -> tuple[Optional[OnnxClassifier], str]:
    """``model`` exported to ONNX and loaded in ONNX Runtime, or (None, why not). ``probe``: a batch of
    inputs (e.g. noisy test images) on which the two must agree."""
    model = model.eval().cpu()
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporter's notes and graph dumps are not the user's business
            torch.onnx.export(model, (torch.rand(2, *input_shape),), buf, opset_version=17, dynamo=False,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        session = OnnxClassifier(buf.getvalue(), torch.get_num_threads())
        got = session(probe)
    except Exception as err:  # an op the exporter or ORT does not know: stay in PyTorch
        return None, f"ONNX export or ONNX Runtime failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    with torch.inference_mode():
        want = model(probe)
    diff = float((got - want).abs().max())
    agree = float((got.argmax(1) == want.argmax(1)).float().mean())
    if agree < 1.0 or diff > max_logit_diff:
        return None, (f"ONNX Runtime's logits differ from PyTorch's by up to {diff:.2g} on {probe.shape[0]} noisy "
                      f"probes (limit {max_logit_diff:g}; top-1 agreement {agree:.4f})")
    return session, f"ONNX Runtime agrees with PyTorch on {probe.shape[0]} noisy probes (max |logit diff| {diff:.1e})"
