"""TensorRT engines on a GPU: a CIFAR ResNet-20 (FP32, W8A8 Q/DQ), engine latency at batch 1, 8 and 64
against PyTorch CUDA eager (FP32 and FP16 autocast), and the engine's top-1 agreement with PyTorch.

One script for a lent GPU (run it in one call; a few minutes). It needs a TensorRT module on that
machine (``tensorrt`` for datacenter GPUs; an RTX engine does not run on H100/H200); without one it
says so and times PyTorch alone. Random weights unless ``--model`` names a trained model (latency does
not depend on the weights; agreement is measured on random images then). Appends a markdown section
to ``--out``.

    python bench/gpu/export.py --out bench/gpu/RESULTS.md [--model runs/r20/train/model]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from report import markdown_table  # noqa: E402 (after the path insert)


def cuda_ms(fn, repeats: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a saved model folder (default: a random-weight ResNet-20)")
    ap.add_argument("--out", default="bench/gpu/RESULTS.md")
    ap.add_argument("--backend", default="auto", help="auto | tensorrt | tensorrt-rtx")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this script is for a lent GPU")

    import deploypipe as dp
    from deploypipe.stages.export.engine import EngineRunner, build_engine, tensorrt_module
    from deploypipe.zoo import resnet20

    model = dp.load_model(args.model) if args.model else resnet20(num_classes=10)
    model = model.eval()
    shape = (3, 32, 32)
    images = torch.rand(256, *shape)
    variants = {"FP32": model}
    q, _ = dp.quantize(model, images, dp.QuantizeConfig(weight_bits=8, act_bits=8, method="rtn"))
    variants["W8A8"] = q
    try:
        tensorrt_module(args.backend)
        has_trt = True
    except ValueError as err:
        has_trt, why = False, str(err)
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="gpu-export-"))
    for name, net in variants.items():
        path = dp.export_onnx(net, shape, folder / f"{name}.onnx")
        cuda_net = net.cuda()
        row = {"model": name}
        for b in (1, 8, 64):
            x = torch.rand(b, *shape, device="cuda")
            with torch.inference_mode():
                row[f"eager b{b} ms"] = f"{cuda_ms(lambda: cuda_net(x)):.3f}"
                with torch.autocast("cuda", dtype=torch.float16):
                    row[f"eager fp16 b{b} ms"] = f"{cuda_ms(lambda: cuda_net(x)):.3f}"
        if has_trt:
            build = build_engine(path, (1, 8, 64), args.backend)
            runner = EngineRunner(build.plan, args.backend)
            for b in (1, 8, 64):
                row[f"engine b{b} ms"] = f"{runner.latency_ms({'images': torch.rand(b, *shape)}):.3f}"
            with torch.inference_mode():
                want = torch.cat([cuda_net(c.cuda()) for c in images.split(64)]).argmax(1).cpu()
            got = torch.cat([next(iter(runner.run({"images": c}).values())) for c in images.split(64)]).argmax(1).cpu()
            row["engine top-1 agreement %"] = f"{100 * float((got == want).float().mean()):.2f}"
            row["build s"] = f"{build.info['build_seconds']:.1f}"
            row["backend"] = f"{build.info['backend']} {build.info['version']}"
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = markdown_table(columns, [[r.get(c, "–") for c in columns] for r in rows],
                          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}")
    if not has_trt:
        text += f"\nNo engine: {why}\n"
    print(text)
    with open(args.out, "a") as fh:
        fh.write("\n## bench/gpu/export.py\n\n" + text)


if __name__ == "__main__":
    main()
