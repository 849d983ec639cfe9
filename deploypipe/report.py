"""The pipeline report: every model a pipeline produced, side by side, with what each step gained in
size and speed and lost in accuracy and certified radius.

One row per artifact, in pipeline order: the input model (when the pipeline starts from a saved
model), each stage that hands on a model (train, distill, sparsify, quantize), and the export's
ONNX file. A certify (or evaluate) stage adds its figures to the model it received; export's
``shipped_`` certificates belong to the exported file. Figures the stages measured are taken from
their result.json as they are (top-1, certified accuracy, ACR, ONNX Runtime latency); what no stage
measures is measured here on the saved model: parameters, deployed bytes (``storage_bytes``: quantized
weights at their bits), bit operations per image and PyTorch CPU latency at batch 1 (a quantized
model runs as fake-quantized float in PyTorch: its speed shows in the export row).

Writes ``report.md``, ``report.csv`` and ``report.png`` (size against top-1 and against certified
accuracy) into the pipeline folder.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

CERTIFIED = ("certified_acc_r0.25", "certified_acc_r0.5", "acr")
COLUMNS = ("artifact", "stage", "params", "bytes", "file_bytes", "gbops", "latency_ms", "runtime", "top1", *CERTIFIED)


@dataclass
class Row:
    artifact: str
    stage: str
    path: Optional[Path] = None   # the saved model folder (None: the ONNX row)
    figures: dict = field(default_factory=dict)


def _result(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None


def collect(pipeline_dir: Path) -> tuple[list[Row], dict]:
    """The artifacts of a finished (or partly finished) pipeline folder, with the stages' own figures."""
    config = yaml.safe_load((pipeline_dir / "pipeline.yaml").read_text())
    rows: list[Row] = []
    model = config.get("model")
    spec = Path(str(model.get("spec") if isinstance(model, dict) else model))
    if (spec / "model.json").is_file():
        rows.append(Row("input", "input", spec))
    tracking = {}
    for entry in config["stages"]:
        sid = entry["id"]
        stage = next(k for k in entry if k != "id")
        done = _result(pipeline_dir / sid)
        if done is None:
            continue
        tracking = {k: done[k] for k in ("pipeline_run_id", "tracking_uri") if k in done} or tracking
        m = done.get("metrics", {})
        current = rows[-1] if rows else None
        if current is not None and "top1" not in current.figures:  # the stage measured its input's top-1
            for key in ("fp_top1", "teacher_test_top1", "dense_top1"):
                if key in m:
                    current.figures["top1"] = m[key]
                    break
        if stage == "certify" and current is not None:
            current.figures.update({k: m[k] for k in CERTIFIED if k in m})
            current.figures["certified_images"] = m.get("images")
        elif stage == "evaluate" and current is not None:
            current.figures.setdefault("top1", m.get("test_top1"))
        elif stage == "export":
            row = Row(f"{sid} (ONNX)", stage, None, {
                "file_bytes": m.get("onnx_bytes"), "latency_ms": m.get("onnxruntime_ms_b1"), "runtime": "ONNX Runtime",
                "top1": m.get("test_top1"), **{k: m[f"shipped_{k}"] for k in CERTIFIED if f"shipped_{k}" in m}})
            if current is not None:
                row.figures.update({k: current.figures.get(k) for k in ("params", "bytes", "gbops")})
            rows.append(row)
        elif done.get("model"):
            rows.append(Row(sid, stage, pipeline_dir / sid / "model", {"top1": m.get("test_top1")}))
    return rows, tracking


def measure(rows: list[Row], trusted=()) -> None:
    """Parameters, deployed bytes, bit operations and PyTorch CPU latency (batch 1) of each saved model
    (a user factory a model folder names must be in ``trusted``, as for ``load_model``)."""
    from .evaluation import bit_operations, latency_ms, parameter_count, storage_bytes
    from .models import load_model, read_record

    for i, row in enumerate(rows):
        if row.path is None:
            continue
        model = load_model(row.path, trusted=trusted)
        shape = tuple(read_record(row.path).input_shape)
        row.figures.update(params=parameter_count(model), bytes=storage_bytes(model),
                           gbops=bit_operations(model, shape) / 1e9,
                           latency_ms=latency_ms(model, shape, 1, repeats=20)["median"], runtime="PyTorch CPU")
        if i + 1 < len(rows) and rows[i + 1].path is None:  # the export row after it: same network
            rows[i + 1].figures.update({k: row.figures[k] for k in ("params", "bytes", "gbops")})


def _fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key == "params":
        return f"{int(value):,}"
    if key in ("bytes", "file_bytes"):
        return f"{value / 1024:,.1f} KiB"
    if key == "gbops":
        return f"{value:.3g}"
    if key == "latency_ms":
        return f"{value:.2f}"
    if key in ("top1", "certified_acc_r0.25", "certified_acc_r0.5"):
        return f"{100 * value:.2f}%"
    if key == "acr":
        return f"{value:.3f}"
    return str(value)


def _delta(key: str, now, before) -> str:
    if now is None or before is None:
        return ""
    if key in ("bytes", "file_bytes", "gbops", "latency_ms", "params"):
        return f" ({now / before:.2f}×)" if before else ""
    if key in ("top1", "certified_acc_r0.25", "certified_acc_r0.5"):
        return f" ({100 * (now - before):+.2f} pt)"
    if key == "acr":
        return f" ({now - before:+.3f})"
    return ""


def render(rows: list[Row], name: str) -> str:
    heads = {"artifact": "artifact", "stage": "stage", "params": "parameters", "bytes": "size",
             "file_bytes": "file",
             "gbops": "GBOPs / image", "latency_ms": "CPU latency b1 (ms)", "runtime": "runtime",
             "top1": "clean top-1", "certified_acc_r0.25": "certified @0.25", "certified_acc_r0.5": "certified @0.5",
             "acr": "ACR"}
    lines = [f"# Pipeline report: {name}", "",
             "Each model the pipeline produced; in brackets the change against the row before it (its input). "
             "Certified figures are those of the certify stage that received the model (or the export's shipped "
             "file), on the images it certified. Size: the network's deployed storage (quantized weights at their "
             "bits; a sparsified float model as stored, dense); file: the exported file as written.", "",
             "| " + " | ".join(heads[c] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for i, row in enumerate(rows):
        before = rows[i - 1].figures if i else {}
        cells = [row.artifact, row.stage]
        for key in COLUMNS[2:]:
            value = row.figures.get(key)
            comparable = key != "latency_ms" or row.figures.get("runtime") == before.get("runtime")
            cells.append(value if key == "runtime" and value else _fmt(key, value) + (
                _delta(key, value, before.get(key)) if comparable else ""))
        lines.append("| " + " | ".join(cells) + " |")
    images = sorted({int(r.figures["certified_images"]) for r in rows if r.figures.get("certified_images")})
    if images:
        lines += ["", f"Certified on {', '.join(map(str, images))} test images."]
    return "\n".join(lines) + "\n"


def figure(rows: list[Row], name: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    markers = "osD^vP*X"
    for ax, key, label in ((axes[0], "top1", "clean top-1 (%)"),
                           (axes[1], "certified_acc_r0.25", "certified accuracy at r = 0.25 (%)")):
        shown = 0
        for i, r in enumerate(rows):  # one colour and marker per artifact, the same in both panels
            if r.figures.get("bytes") and r.figures.get(key) is not None:
                ax.plot(r.figures["bytes"] / 1024, 100 * r.figures[key], markers[i % len(markers)], color=f"C{i}",
                        markersize=9 - i % 3, alpha=0.85, label=r.artifact)
                shown += 1
        ax.set_xscale("log")
        ax.set(xlabel="deployed size (KiB, log scale)", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        if shown:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no certified model in this pipeline", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(f"{name}: every artifact, size against accuracy")
    return fig


def write_report(pipeline_dir: Path | str, trusted=()) -> list[Path]:
    """Collect, measure, and write report.md / report.csv / report.png into the pipeline folder;
    returns the files written (none when the folder holds no finished stage)."""
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "pipeline.yaml").is_file():
        raise ValueError(f"{pipeline_dir} is not a pipeline folder (no pipeline.yaml) — fix: give the folder "
                         "'deploypipe run' wrote (its --out)")
    rows, _ = collect(pipeline_dir)
    if not rows:
        return []
    measure(rows, trusted)
    name = yaml.safe_load((pipeline_dir / "pipeline.yaml").read_text()).get("name", pipeline_dir.name)
    md, table, png = (pipeline_dir / f"report.{ext}" for ext in ("md", "csv", "png"))
    md.write_text(render(rows, name))
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*COLUMNS, "certified_images"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"artifact": r.artifact, "stage": r.stage,
                             **{k: r.figures.get(k) for k in (*COLUMNS[2:], "certified_images")}})
    figure(rows, name).savefig(png, dpi=120, bbox_inches="tight")
    return [md, table, png]
