"""Randomized-smoothing certification throughput: deploypipe's certify against the published reference
implementation's algorithm (Cohen et al. 2019, ``code/core.py`` of github.com/locuslab/smoothing), on
the same model, images, n, n0, alpha and batch size.

The reference is imported from the path given with ``--core`` (a checkout's ``code/`` folder), never
copied here. Two adaptations let it run on a machine without a GPU and with today's libraries, both
outside its file: its ``torch.randn_like(..., device='cuda')`` draws on the batch's own device when
CUDA is absent, and ``scipy.stats.binom_test`` (removed from SciPy) / statsmodels' Clopper-Pearson
interval are provided from ``scipy.stats.binomtest`` / the Beta quantile when missing. Its algorithm —
batching, counting, the bound — is untouched.

Reports noise samples per second and seconds per image for each implementation and configuration,
the speed-up, and whether predictions and radii agree (within Monte-Carlo error: different noise).

    python bench/certify_throughput.py --model runs/r20/train/model --core ../smoothing/code --n 100000 --images 3
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report, add_report_argument  # noqa: E402 (after the path insert)


def load_reference(code_dir: Path, device: torch.device):
    """Cohen et al.'s ``Smooth`` class from their core.py, with the two run-time adaptations above."""
    import scipy.stats

    if not hasattr(scipy.stats, "binom_test"):
        scipy.stats.binom_test = lambda k, n, p=0.5: scipy.stats.binomtest(int(k), int(n), p).pvalue
    try:
        importlib.import_module("statsmodels.stats.proportion")
    except ImportError:
        def proportion_confint(count, nobs, alpha=0.05, method="beta"):
            lo = scipy.stats.beta.ppf(alpha / 2, count, nobs - count + 1) if count > 0 else 0.0
            hi = scipy.stats.beta.ppf(1 - alpha / 2, count + 1, nobs - count) if count < nobs else 1.0
            return lo, hi

        for name in ("statsmodels", "statsmodels.stats", "statsmodels.stats.proportion"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["statsmodels.stats.proportion"].proportion_confint = proportion_confint
    sys.path.insert(0, str(code_dir))
    core = importlib.import_module("core")
    if device.type != "cuda":
        proxy = types.ModuleType("torch_on_device")
        proxy.__dict__.update(torch.__dict__)
        proxy.randn_like = lambda t, device=None, **kw: torch.randn_like(t, **kw)
        core.torch = proxy
    return core.Smooth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a saved model/ folder (ideally noise-trained)")
    ap.add_argument("--core", required=True, help="the reference checkout's code/ folder (holds core.py)")
    ap.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--images", type=int, default=3, help="test images (every 20th)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ours", default="onnxruntime,torch,autocast",
                    help="which deploypipe configurations to time beside the reference")
    ap.add_argument("--forward-batch", type=int, default=None,
                    help="deploypipe's forward chunk (default: certify's own, 64 on the CPU)")
    ap.add_argument("--reference-batches", default="",
                    help="also time the reference at these other batch sizes, e.g. 128, comma-separated")
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, "Certify: throughput against Cohen et al.'s core.py").start()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from deploypipe.config import DataSpec
    from deploypipe.data import load_data
    from deploypipe.models import load_model
    from deploypipe.smoothing import CPU_FORWARD_BATCH, certify, image_generator
    from deploypipe.stages.certify.runtime import to_onnxruntime
    from deploypipe.stages.certify.classifier import prepare as _prepare
    from deploypipe.stages.certify.config import CertifyConfig

    model = load_model(args.model).to(device).eval()
    data = load_data(DataSpec(source=args.data))
    index = list(range(0, len(data.test), 20))[: args.images]
    images = [data.test.as_float(data.test.images[i]) for i in index]
    labels = [int(data.test.labels[i]) for i in index]
    samples = args.n0 + args.n

    Smooth = load_reference(Path(args.core), device)
    rows = []

    def measure(name: str, fn) -> None:
        t0 = time.perf_counter()
        out = [fn(i, x) for i, x in zip(index, images)]
        seconds = (time.perf_counter() - t0) / len(images)
        rows.append({"name": name, "s_per_image": seconds, "samples_per_s": samples / seconds, "results": out})
        print(f"  {name}: {seconds:.2f} s/image, {samples / seconds:,.0f} noise samples/s", flush=True)

    reference = Smooth(model, len(data.classes), args.sigma)
    torch.manual_seed(0)
    measure("reference core.py (as published)", lambda i, x: reference.certify(x.to(device), args.n0, args.n, args.alpha, args.batch_size))
    for b in (int(v) for v in args.reference_batches.split(",") if v):
        measure(f"reference core.py at batch {b}", lambda i, x, b=b: reference.certify(x.to(device), args.n0, args.n, args.alpha, b))
    forward = args.forward_batch or (CPU_FORWARD_BATCH if device.type == "cpu" else None)
    wanted = set(args.ours.split(","))
    classifiers = []
    if "torch" in wanted:
        classifiers.append(("deploypipe certify --runtime torch (inference_mode, channels_last)",
                            _prepare(load_model(args.model), CertifyConfig(), device)))
    if "autocast" in wanted:
        classifiers.append(("deploypipe certify --runtime torch --autocast (bfloat16 on CPU)",
                            _prepare(load_model(args.model), CertifyConfig(autocast=True), device)))
    if device.type == "cpu" and "onnxruntime" in wanted:
        probe = torch.stack(images[:8]).repeat_interleave(32, 0)
        probe = probe + args.sigma * torch.randn(probe.shape, generator=torch.Generator().manual_seed(0))
        session, why = to_onnxruntime(load_model(args.model), tuple(data.input_shape), probe)
        print(f"  ONNX Runtime: {why}", flush=True)
        if session is not None:
            classifiers.insert(0, ("deploypipe certify (default on CPU: --runtime auto = ONNX Runtime)", session))
    for label, ours in classifiers:
        measure(label, lambda i, x, ours=ours: (lambda c: (c.prediction, c.radius))(
            certify(ours, x.to(device), args.sigma, args.n0, args.n, args.alpha, len(data.classes), args.batch_size,
                    image_generator(0, i, device), forward)))

    base = rows[0]["s_per_image"]
    print(f"\nmodel `{args.model}`, sigma {args.sigma}, n0 {args.n0}, n {args.n:,}, alpha {args.alpha}, batch "
          f"{args.batch_size} (deploypipe's forward chunk {forward}), {len(images)} test images (every 20th), {args.threads} CPU threads, device {device}\n")
    print("| implementation | s / image | noise samples / s | speed-up | predictions (label) / radii |")
    print("|---|---|---|---|---|")
    for r in rows:
        res = ", ".join(f"{p}({y})/{rad:.3f}" for (p, rad), y in zip(r["results"], labels))
        print(f"| {r['name']} | {r['s_per_image']:.2f} | {r['samples_per_s']:,.0f} | {base / r['s_per_image']:.2f}x | {res} |")
    report.finish()


if __name__ == "__main__":
    main()
