"""How much of a full-image classifier survives each way of showing it a DRS half-image.

A model trained on full images (e.g. the dense ResNet-20 that bench/certify.py fine-tunes into base
classifiers) is scored, without any training, on the test images as they are, on each side's packed
C x H x W/2 half-image (``diagonal_split``, what ``train --drs-side`` feeds by default), and on each
side's half-image filled back into the full grid (``grid_fill``, what ``train --drs-input full``
feeds). Top-1 on clean images and under one seeded draw of Gaussian noise per sigma (added to the
half-image, as the certify stage does). The closer a view is to the full image, the more of the
model's features a noise fine-tuning starts from.

    python bench/drs_inputs.py --model runs/models/resnet20-dense --data imagefolder:../shared/data/cifar10
"""

from __future__ import annotations

from pathlib import Path

import sys

import argparse

import torch

from deploypipe.config import DataSpec
from deploypipe.data import diagonal_split, load_data
from deploypipe.models import load_model
from deploypipe.stages.train.side_input import grid_fill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report, add_report_argument  # noqa: E402 (after the path insert)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a saved full-image model folder")
    ap.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    ap.add_argument("--limit-test", type=int, default=2000, help="test images (a seeded subset; 0 = all)")
    ap.add_argument("--sigmas", default="0.18,0.36", help="noise levels for the noisy columns")
    ap.add_argument("--threads", type=int, default=2)
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, 'DRS side inputs: what a full-image model makes of each view').start()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    test = load_data(DataSpec(source=args.data, limit_test=args.limit_test or None)).test
    x, y = test.as_float(test.images), test.labels
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    views = {"full image": (None, False)}  # name: (side, filled back into the grid)
    for side, name in enumerate(("left", "right")):
        views[f"{name} half, packed (C x H x W/2)"] = (side, False)
        views[f"{name} half, grid-filled (C x H x W)"] = (side, True)

    def top1(view: str, sigma: float) -> float:
        side, fill = views[view]
        g = torch.Generator().manual_seed(0)
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(x), 250):
                h = x[i:i + 250] if side is None else diagonal_split(x[i:i + 250])[side]
                if sigma > 0:
                    h = h + sigma * torch.randn(h.shape, generator=g)
                correct += (model(grid_fill(h, side) if fill else h).argmax(1) == y[i:i + 250]).sum().item()
        return correct / len(x)

    print(f"`{args.model}` on {len(x)} test images, top-1 (%); noise drawn on what the view keeps\n")
    print("| view | clean | " + " | ".join(f"σ {s:g}" for s in sigmas) + " |")
    print("|---|---|" + "---|" * len(sigmas))
    for view in views:
        row = [top1(view, s) for s in [0.0, *sigmas]]
        print(f"| {view} | " + " | ".join(f"{100 * a:.2f}" for a in row) + " |", flush=True)
    report.finish()


if __name__ == "__main__":
    main()
