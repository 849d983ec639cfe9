"""The deploy bundle: a Triton Inference Server model repository entry per format and a model card.

    bundle/
      <name>/1/model.plan       + <name>/config.pbtxt          (platform tensorrt_plan)
      <name>_onnx/1/model.onnx  + <name>_onnx/config.pbtxt     (platform onnxruntime_onnx)
      model_card.md

``config.pbtxt`` carries the real I/O names, data types and dims (without the batch dimension, which
``max_batch_size`` stands for), read from the ONNX file or the engine.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

# ONNX element type names (and TensorRT's) -> Triton data types
TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "HALF": "TYPE_FP16", "BFLOAT16": "TYPE_BF16",
                "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8",
                "BOOL": "TYPE_BOOL", "DOUBLE": "TYPE_FP64"}


def onnx_io(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs of an ONNX file: name, element type name, shape (-1 for dynamic)."""
    import onnx
    from onnx import TensorProto

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}

    def describe(v) -> dict:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return {"name": v.name, "dtype": TensorProto.DataType.Name(t.elem_type), "shape": shape}

    return [describe(v) for v in graph.input if v.name not in inits], [describe(v) for v in graph.output]


def triton_config(name: str, platform: str, inputs: list[dict], outputs: list[dict], max_batch: int) -> str:
    """A Triton ``config.pbtxt``: the batch dimension of every tensor is ``max_batch_size``'s."""
    def block(kind: str, tensors: list[dict]) -> str:
        items = []
        for t in tensors:
            dims = ", ".join(str(d) for d in t["shape"][1:])
            items.append(f'  {{\n    name: "{t["name"]}"\n    data_type: {TRITON_TYPES.get(t["dtype"], "TYPE_FP32")}\n'
                         f"    dims: [ {dims} ]\n  }}")
        return f"{kind} [\n" + ",\n".join(items) + "\n]\n"

    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
            + block("input", inputs) + block("output", outputs))


def write_bundle(folder: Path, name: str, onnx_path: Path, plan: Optional[bytes], engine_info: Optional[dict],
                 max_batch: int, card: str) -> list[Path]:
    """Write the bundle (module docstring); returns the model repository entries written."""
    entries = []
    if plan is not None:
        entry = folder / name
        (entry / "1").mkdir(parents=True, exist_ok=True)
        (entry / "1" / "model.plan").write_bytes(plan)
        (entry / "config.pbtxt").write_text(triton_config(name, "tensorrt_plan", engine_info["inputs"],
                                                          engine_info["outputs"], max_batch))
        entries.append(entry)
    entry = folder / (f"{name}_onnx" if plan is not None else name)
    (entry / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(onnx_path, entry / "1" / "model.onnx")
    for extra in onnx_path.parent.glob(onnx_path.name + ".data"):  # external weights travel with the file
        shutil.copy(extra, entry / "1" / extra.name)
    inputs, outputs = onnx_io(onnx_path)
    (entry / "config.pbtxt").write_text(triton_config(entry.name, "onnxruntime_onnx", inputs, outputs, max_batch))
    entries.append(entry)
    (folder / "model_card.md").write_text(card)
    return entries


def model_card(name: str, facts: dict, lineage: list[dict], checks: list[tuple[str, bool, str]],
               latency: list[dict]) -> str:
    """A markdown model card: what the model is, the stages that made it, its figures, the checks."""
    lines = [f"# {name}", "", "## The model", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    lines += ["", "## How it was made", "", "| stage | what it did | figures |", "|---|---|---|"]
    for step in lineage:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in step["figures"].items())
        lines.append(f"| {step['id']} | {step['stage']} | {figures} |")
    if latency:
        lines += ["", "## Latency (median ms per batch, this machine's CPU)", "",
                  "| runtime | " + " | ".join(f"batch {r['batch']}" for r in latency) + " |",
                  "|---|" + "---|" * len(latency)]
        for runtime in [k for k in latency[0] if k != "batch"]:
            lines.append(f"| {runtime} | " + " | ".join(f"{r[runtime]:.2f}" for r in latency) + " |")
    lines += ["", "## Checks", ""]
    lines += [f"- [{'x' if ok else ' '}] {what}: {detail}" for what, ok, detail in checks]
    return "\n".join(lines) + "\n"
