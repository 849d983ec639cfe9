"""The export stage: the pipeline's model as files that ship (exporter.py), the deploy bundle
(bundle.py) with the model's lineage and its certified accuracy when a certify stage ran before, and
a registered MLflow model version (alias ``candidate``).

Outputs: ``model.onnx``, ``model.cpu.onnx`` (a quantized model: the layout ONNX Runtime's x86 kernels
fuse, cpu_layout.py), ``trt_lint.csv`` (empty when clean), ``latency.csv``, ``engine.plan`` +
``engine.json`` + ``build_log.txt`` (with an engine), ``bundle/`` (Triton model repository entries
and ``model_card.md``). Commands: ``deploypipe export --check FILE.onnx`` (the TensorRT lint alone:
exit 0 clean, 1 with the offending nodes) and ``deploypipe promote NAME VERSION --alias ALIAS``.
"""

from __future__ import annotations

import re

from deploypipe.data import cache_dir
from deploypipe.evaluation import top1_and_loss
from deploypipe.progress import log
from deploypipe.stage import StageContext, StageResult, register

from .bundle import model_card, write_bundle
from .config import ExportConfig
from .exporter import export

HEADLINES = ("test_top1", "size_fraction_of_fp32", "certified_acc_r0.25", "certified_acc_r0.5", "acr",
             "sparse_layer_sparsity", "epochs")


def _lineage(ctx: StageContext) -> list[dict]:
    steps = []
    for stage_id, result in ctx.previous.items():
        figures = {k: result.metrics[k] for k in HEADLINES if k in result.metrics}
        steps.append({"id": stage_id, "stage": stage_id.split("-")[0], "figures": figures})
    return steps


def _certified(ctx: StageContext) -> dict[str, float]:
    """The certified figures of the last certify stage before this one (it certified this model)."""
    for result in reversed(list(ctx.previous.values())):
        if "acr" in result.metrics:
            return {k: v for k, v in result.metrics.items() if k.startswith("certified_acc_r") or k == "acr"}
    return {}


@register("export")
def run(ctx: StageContext, cfg: ExportConfig) -> StageResult:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.name or ctx.record.factory.split(":")[-1])
    sparse = {p for t in ctx.record.transforms if t.get("kind") == "sparsify" for p in t["params"]["layers"].values()}
    test = ctx.data.test
    parity = test.subset(list(range(min(cfg.parity_images, len(test)))))
    backend = cfg.engine_backend if cfg.engine_backend != "auto" else "any"
    report = export(ctx.model, tuple(ctx.data.input_shape), ctx.out_dir, cfg, parity_data=parity,
                    sparse_2_4=sparse == {"2:4"}, timing_cache=cache_dir() / "tensorrt" / f"{backend}.timing",
                    log=lambda msg: log(f"[{ctx.stage_id}] {msg}"))
    metrics = dict(report.metrics)
    metrics["test_top1"], metrics["test_loss"] = top1_and_loss(ctx.model, test, device=ctx.device)
    certified = _certified(ctx)
    metrics.update({f"shipped_{k}": v for k, v in certified.items()})
    ctx.save_table("trt_lint", [{"node": f.node, "op": f.op, "rule": f.rule, "detail": f.detail}
                                for f in report.findings] or [{"node": "", "op": "", "rule": "", "detail": "clean"}])
    ctx.save_table("latency", report.latency)
    facts = {"architecture": ctx.record.factory, "input": f"float32 images {list(ctx.data.input_shape)} in [0, 1] "
             "(the model normalises them)", "classes": ", ".join(ctx.data.classes),
             "ONNX file": f"{report.onnx.stat().st_size / 1024:.0f} KiB, sha256 "
                          f"{report.engine_info['onnx_sha256'][:16] if report.engine_info else 'see engine.json'}",
             "test top-1": f"{100 * metrics['test_top1']:.2f}% ({len(test)} images)"}
    if certified:
        facts["certified accuracy"] = ", ".join(f"{100 * v:.1f}% at r={k.removeprefix('certified_acc_r')}"
                                                for k, v in certified.items() if k != "acr")
        facts["average certified radius"] = f"{certified.get('acr', 0.0):.3f}"
    if report.engine_info:
        i = report.engine_info
        facts["TensorRT engine"] = (f"{i['backend']} {i['version']}, for {i['target']}, {i['plan_bytes'] / 2**20:.1f} "
                                    f"MiB, batch {i['profile']['min']}-{i['profile']['max']}")
    checks = [("ONNX checker and shape inference", True, "passed"),
              ("TensorRT quantization rules (lint)", not report.findings, f"{len(report.findings)} findings"),
              ("ONNX Runtime agrees with PyTorch", metrics.get("onnx_top1_agreement", 0) >= 0.999,
               f"top-1 agreement {metrics.get('onnx_top1_agreement', float('nan')):.4f} on {len(parity)} test images")]
    if report.cpu_onnx is not None:
        agree = report.cpu_parity.get("onnx_top1_agreement", float("nan"))
        kernels = report.integer_kernels.get(report.cpu_onnx.name, {})
        facts["ONNX Runtime CPU file"] = (f"{report.cpu_onnx.name}: {sum(kernels.values())} ops fused into integer "
                                          f"kernels by ONNX Runtime (model.onnx: "
                                          f"{sum(report.integer_kernels.get(report.onnx.name, {}).values())})")
        checks.append(("ONNX Runtime agrees with PyTorch on model.cpu.onnx", agree >= 0.999,
                       f"top-1 agreement {agree:.4f} on {len(parity)} test images"))
    if report.engine_info or report.parser_errors:
        checks.append(("TensorRT's ONNX parser", not report.parser_errors, "parses" if not report.parser_errors
                       else "; ".join(report.parser_errors)[:200]))
    if report.engine_info:
        checks.append(("TensorRT engine built", True, f"{report.engine_info['build_seconds']:.1f} s; not run here "
                       "(a TensorRT runtime needs a GPU)"))
    card = model_card(name, facts, _lineage(ctx), checks, report.latency)
    write_bundle(ctx.out_dir / "bundle", name, report.onnx, report.engine.read_bytes() if report.engine else None,
                 report.engine_info, cfg.engine_profile()[2], card)
    log(f"[{ctx.stage_id}] exported {name}: ONNX" + (f" + {report.engine_info['backend']} engine" if report.engine
                                                     else "") + f"; top-1 {100 * metrics['test_top1']:.2f}%"
        + (f", certified ACR {certified['acr']:.3f}" if "acr" in certified else ""))
    registration = None
    if cfg.register:
        tags = {"onnx_sha256": report.engine_info["onnx_sha256"] if report.engine_info else "",
                "test_top1": f"{metrics['test_top1']:.4f}", "onnx_bytes": str(report.onnx.stat().st_size),
                **({"backend": f"{report.engine_info['backend']} {report.engine_info['version']}",
                    "target": report.engine_info["target"]} if report.engine_info else {"backend": "onnxruntime"}),
                **{k: f"{v:.4f}" for k, v in certified.items()}}
        registration = {"name": cfg.register, "path": "bundle", "tags": tags, "alias": "candidate"}
    return StageResult(metrics=metrics, registration=registration)
