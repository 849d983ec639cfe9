"""Export of a CIFAR-10 ResNet-20: FP32, W8A8, W4A8 (4-bit weights on the INT8 grid) and 2:4 + W8A8.

For each variant, through ``deploypipe.export``: the ONNX file's size, ONNX Runtime's CPU latency at
batch 1 and 64 against PyTorch eager (the same model, the same threads), its top-1 agreement with
PyTorch on every test image, and the TensorRT-RTX build (seconds, engine size) when tensorrt_rtx is
installed. Quantized variants use round-to-nearest with MSE ranges on the 1,024 calibration images
(export speed does not depend on how the scales were found; bench/quantize.py measures accuracy).
The target: the INT8 file in ONNX Runtime at least 2x PyTorch eager FP32 throughput at batch 64, with
top-1 agreement >= 99.9%.

    python bench/export.py --model runs/r20/train/model --data imagefolder:../shared/data/cifar10 \\
        [--sparse runs/r20-24/sparsify/model] [--report docs/benchmarks/export.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import Report, add_report_argument, markdown_table  # noqa: E402 (after the path insert)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the FP32 model folder (a train stage's output)")
    ap.add_argument("--sparse", default=None, help="a 2:4 sparsify stage's model folder (else: that row is left out)")
    ap.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30, help="timed passes per batch size (median)")
    ap.add_argument("--out", default=None, help="folder for the exported files (default: a temporary one)")
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, "Export: CIFAR-10 ResNet-20 in ONNX Runtime and TensorRT-RTX").start()

    import torch

    import deploypipe as dp
    from deploypipe.config import DataSpec
    from deploypipe.data import load_data
    from deploypipe.evaluation import top1_and_loss
    from deploypipe.models import read_record

    torch.set_num_threads(args.threads)
    data = load_data(DataSpec(source=args.data, calib_size=1024))
    calib = [x for x, _ in data.calib.batches(256)]
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-export-"))
    variants = {"FP32": (dp.load_model(args.model), None, {})}
    for name, bits, unsigned in (("W8A8", 8, False), ("W4A8", 4, False), ("W8A8 unsigned", 8, True)):
        q, _ = dp.quantize(dp.load_model(args.model), calib, dp.QuantizeConfig(
            weight_bits=bits, act_bits=8, method="rtn", unsigned_activations=unsigned))
        variants[name] = (q, bits, {})
    if args.sparse:
        record = read_record(args.sparse)
        layers = {n: p for t in record.transforms if t.get("kind") == "sparsify" for n, p in t["params"]["layers"].items()}
        q, _ = dp.quantize(dp.load_model(args.sparse), calib, dp.QuantizeConfig(weight_bits=8, act_bits=8, method="rtn"),
                           sparse_layers=layers)
        variants["2:4 + W8A8"] = (q, 8, layers)
    rows, fp32_b64 = [], None
    for name, (model, bits, sparse) in variants.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        cfg = dp.ExportConfig(format="auto", batch=[1, 64], latency_repeats=args.repeats,
                              parity_images=len(data.test))
        r = dp.export(model, tuple(data.input_shape), out / name.replace(" ", "").replace(":", "-").replace("+", "_"),
                      cfg, parity_data=data.test, sparse_2_4=bool(sparse))
        lat = {row["batch"]: row for row in r.latency}
        if name == "FP32":
            fp32_b64 = lat[64]["pytorch_eager_ms"]
        rows.append([name, f"{r.onnx.stat().st_size / 1024:.0f}", f"{lat[1]['pytorch_eager_ms']:.2f}",
                     f"{lat[1]['onnxruntime_ms']:.2f}", f"{lat[64]['pytorch_eager_ms']:.1f}",
                     f"{lat[64]['onnxruntime_ms']:.1f}", f"{fp32_b64 / lat[64]['onnxruntime_ms']:.2f}x",
                     f"{100 * r.parity['onnx_top1_agreement']:.2f}",
                     f"{r.engine_info['build_seconds']:.1f}" if r.engine_info else "–",
                     f"{r.engine_info['plan_bytes'] / 1024:.0f}" if r.engine_info else "–",
                     "clean" if not r.findings else f"{len(r.findings)} findings",
                     *_cpu_columns(r, lat, fp32_b64), f"{100 * top1_and_loss(model, data.test)[0]:.2f}"])
    rows.append(_ort_peer(out, data, calib, variants["FP32"][0], args, fp32_b64))
    columns = ["model", "ONNX KiB", "PyTorch eager b1 ms", "ONNX Runtime b1 ms", "PyTorch eager b64 ms",
               "ONNX Runtime b64 ms", "ORT b64 throughput / eager FP32", "ORT top-1 agreement %",
               "TensorRT-RTX build s", "engine KiB", "TensorRT lint", "ORT integer kernels (model.onnx / .cpu.onnx)",
               "model.cpu.onnx KiB", "model.cpu.onnx b64 ms", "cpu file b64 throughput / eager FP32",
               "cpu file top-1 agreement %", "PyTorch test top-1 %"]
    print(markdown_table(columns, rows, f"`{args.model}` on `{args.data}`, {len(data.test)} test images, "
                                        f"{args.threads} CPU threads, median of {args.repeats} passes"))
    print("Quantized rows: round-to-nearest with MSE ranges, first and last layer 8-bit; W4A8's 4-bit weights ship "
          "on the INT8 grid with the same scales (exact), so they run as INT8. TensorRT-RTX engines are built on this "
          "CPU for RTX GPUs and not run here (no GPU); bench/gpu/export.py times engines on a GPU.")
    print("Peer row: ONNX Runtime's own `quantize_static` on the FP32 file (QDQ format, per-channel int8 weights, "
          "asymmetric uint8 activations calibrated on the same 1,024 images, a Q after every op): the layout ONNX "
          "Runtime's x86 kernels fuse into QLinearConv/QLinearAdd. TensorRT refuses it (non-zero zero points, "
          "`deploypipe export --check` names the nodes). Our TensorRT files (model.onnx) put symmetric int8 Q/DQ on "
          "layer inputs as TensorRT wants (Clip, ReLU and Add sit between a Conv and the next Q), so ONNX Runtime "
          "fuses few of them and runs the rest in float with Q/DQ around it.")
    print("`W8A8 unsigned`: quantized with `unsigned_activations` (post-ReLU inputs on the UINT8 grid [0, 255], "
          "zero point 0, so ONNX Runtime drops the ReLU in front of their Q; a residual add's identity-shortcut "
          "input on the grid of the conv that reads the same tensor, so the add fuses into QLinearAdd). "
          "model.cpu.onnx: the export stage's file for ONNX Runtime on CPUs, the same Q/DQ without the Clips that "
          "keep INT8 codes off -128, one Q/DQ where the exporter wrote two identical ones, INT8 weight "
          "initializers (stages/export/cpu_layout.py); TensorRT's file is model.onnx.")
    int8, cpu = next(r for r in rows if r[0] == "W8A8"), next(r for r in rows if r[0] == "W8A8 unsigned")
    report.finish(headline=f"W8A8 in ONNX Runtime on the CPU at batch 64: {cpu[14]} PyTorch eager FP32 throughput "
                           f"with model.cpu.onnx of the unsigned-activation model (agreement {cpu[15]}%), {int8[6]} "
                           f"with the TensorRT-layout file (target 2x, agreement >= 99.9%)")


def _cpu_columns(r, lat: dict, fp32_b64: float) -> list[str]:
    """Integer kernels ONNX Runtime fused, and the CPU file's latency and agreement (quantized rows)."""
    kernels = [str(sum(r.integer_kernels.get(f, {}).values())) for f in ("model.onnx", "model.cpu.onnx")]
    if r.cpu_onnx is None:
        return [kernels[0], "–", "–", "–", "–"]
    ms = lat[64]["onnxruntime_cpu_file_ms"]
    return [" / ".join(kernels), f"{r.cpu_onnx.stat().st_size / 1024:.0f}", f"{ms:.1f}", f"{fp32_b64 / ms:.2f}x",
            f"{100 * r.cpu_parity['onnx_top1_agreement']:.2f}"]


def _ort_peer(out: Path, data, calib, fp32_model, args, fp32_b64: float) -> list:
    """ONNX Runtime's quantize_static on the FP32 file, timed and checked like the other rows."""
    import time

    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import deploypipe as dp

    src = out / "FP32" / "model.onnx"
    pre, dst = out / "ort_peer_pre.onnx", out / "ort_peer_qdq_u8.onnx"
    quant_pre_process(str(src), str(pre))
    name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    batches = iter([{name: x.numpy()} for x in calib])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    ms = {}
    for b in (1, 64):
        x = np.random.default_rng(0).random((b, *data.input_shape), dtype=np.float32)
        for _ in range(3):
            sess.run(None, {name: x})
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            times.append(1000 * (time.perf_counter() - t0))
        ms[b] = float(np.median(times))
    agree = dp.onnx_parity(fp32_model, dst, data.test)["onnx_top1_agreement"]  # against the FP32 model
    from deploypipe.stages.export.cpu_layout import integer_kernels
    from deploypipe.stages.export.trt_lint import lint_onnx

    findings = lint_onnx(str(dst))
    return ["ORT quantize_static (peer, uint8 asymmetric)", f"{dst.stat().st_size / 1024:.0f}", "–", f"{ms[1]:.2f}",
            "–", f"{ms[64]:.1f}", f"{fp32_b64 / ms[64]:.2f}x", f"{100 * agree:.2f} (vs FP32)", "–", "–",
            f"{len(findings)} findings", str(sum(integer_kernels(dst).values())), "–", "–", "–", "–", "–"]


if __name__ == "__main__":
    main()
