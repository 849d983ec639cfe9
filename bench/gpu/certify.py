"""Randomized-smoothing certification speed on a GPU: CIFAR ResNet-110 (Cohen et al.'s base
classifier) at n = 100,000, deploypipe against the reference implementation's algorithm.

One script for a lent GPU (run it in one call; about 2 minutes). For a few CIFAR-sized images (random
pixels unless ``--data`` is given: the time per image does not depend on the weights or the image):
- the reference ``Smooth.certify`` of Cohen et al.'s ``core.py`` (imported from ``--core``, never
  copied), float32, batch ``--batch-size``;
- deploypipe's ``certify`` in float32 (inference_mode, channels_last) and under autocast (float16
  for the base classifier; noise and x + noise float32);
each timed with CUDA synchronisation, as seconds per image and noise samples per second. The target
of issue 4: at most 1 s per image at n = 100,000 (the paper: about 15 s on an RTX 2080 Ti).
Appends a markdown section (card, date, numbers) to ``--out``.

    python bench/gpu/certify.py --core ../smoothing/code --out bench/gpu/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from certify_throughput import load_reference  # noqa: E402 (after the path insert)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--core", required=True, help="the reference checkout's code/ folder (holds core.py)")
    ap.add_argument("--model", default="zoo:resnet110", help="zoo:NAME or a saved model folder")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--big-batch", type=int, default=10_000, help="also time deploypipe at this batch size")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--out", default="bench/gpu/RESULTS.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this script is for a lent GPU")
    device = torch.device("cuda")
    from deploypipe.models import is_model_dir, load_model
    from deploypipe.smoothing import certify, image_generator
    from deploypipe.stages.certify.classifier import prepare as _prepare
    from deploypipe.stages.certify.config import CertifyConfig
    from deploypipe.zoo import ZOO

    def fresh():
        if is_model_dir(args.model):
            return load_model(args.model)
        torch.manual_seed(0)
        return ZOO[args.model.removeprefix("zoo:")]()

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 32, generator=g).to(device) for _ in range(args.images)]
    rows = []

    def timed(name: str, fn, batch: int) -> None:
        fn(images[0])  # warm-up (cuDNN autotuning, allocator)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in images:
            fn(x)
        torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / len(images)
        rows.append((name, batch, s, (args.n0 + args.n) / s))
        print(f"  {name} (batch {batch}): {s:.3f} s/image", flush=True)

    Smooth = load_reference(Path(args.core), device)
    reference = Smooth(fresh().to(device).eval(), 10, args.sigma)
    timed("reference core.py", lambda x: reference.certify(x, args.n0, args.n, 0.001, args.batch_size), args.batch_size)
    for label, cfg in [("deploypipe, float32", CertifyConfig(runtime="torch")),
                       ("deploypipe, autocast float16", CertifyConfig(runtime="torch", autocast=True))]:
        model = _prepare(fresh(), cfg, device)
        for batch in dict.fromkeys([args.batch_size, args.big_batch]):
            timed(label, lambda x, m=model, b=batch: certify(m, x, args.sigma, args.n0, args.n, 0.001, 10, b,
                                                             image_generator(0, 0, device)), batch)
    base = rows[0][2]
    lines = [f"\n## Certify: {args.model}, n = {args.n:,} — {torch.cuda.get_device_name()} — "
             f"{datetime.date.today().isoformat()}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}; {args.images} images; times include noise "
             "generation, the forward passes, counting and the Clopper-Pearson bound.", "",
             "| implementation | batch | s / image | noise samples / s | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {b} | {s:.3f} | {r:,.0f} | {base / s:.1f}x |" for n, b, s, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
