"""Check a ``deploypipe certify`` result against the published reference implementation (Cohen et al.
2019, ``code/core.py`` of github.com/locuslab/smoothing) on the same model, images, sigma, n0, n,
alpha and batch size.

Reads the certify output folder (``certify.csv`` + ``config.yaml``), runs the reference's
``Smooth.certify`` on the same test images (seeded with ``torch.manual_seed(seed)``; its noise comes
from the global generator, ours from per-image generators, so the two agree within Monte-Carlo error,
not bit for bit), and prints:

- certified accuracy at each radius for both, with the paired Monte-Carlo error of the difference
  (sqrt(discordant images) / images) and the difference in those units;
- per-image agreement of predictions and the mean |radius difference|;
- the soundness check of every deploypipe radius, recomputed independently with SciPy from the
  logged vote count: radius <= sigma * norm.ppf(beta.ppf(alpha, k, n - k + 1)).

The reference is imported from the path given with ``--core`` with the run-time adaptations of
``certify_throughput.load_reference`` (never copied here).

    python bench/certify_vs_reference.py --certify runs/c/certify --model runs/noise/train/model --core ../smoothing/code
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from certify_throughput import load_reference  # noqa: E402 (after the path insert)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report, add_report_argument  # noqa: E402 (after the path insert)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--certify", required=True, help="a certify stage output folder (certify.csv, config.yaml)")
    ap.add_argument("--model", required=True, help="the model folder that was certified")
    ap.add_argument("--core", required=True, help="the reference checkout's code/ folder (holds core.py)")
    ap.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-csv", help="keep the reference's per-image results here; when the file exists, "
                    "read them back instead of rerunning the reference")
    add_report_argument(ap)
    args = ap.parse_args()
    report_file = Report(args.report, "Certify: deploypipe against Cohen et al.'s core.py on the same images").start()
    torch.set_num_threads(args.threads)
    from scipy import stats

    from deploypipe.config import DataSpec
    from deploypipe.data import load_data
    from deploypipe.models import load_model

    folder = Path(args.certify)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())["certify"]
    if cfg["method"] != "rs":
        raise SystemExit("the reference implements RS only")
    with open(folder / "certify.csv", newline="") as fh:
        ours = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    sigma, n0, n, alpha, batch = cfg["sigma"], cfg["n0"], cfg["n"], cfg["alpha"], cfg["batch_size"]

    bad = 0
    for r in ours:
        k = int(r["count"])
        bound = stats.beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0
        sound = sigma * stats.norm.ppf(bound) if bound > 0.5 else 0.0
        bad += r["radius"] > sound + 1e-9
    print(f"soundness: {len(ours) - bad}/{len(ours)} deploypipe radii <= sigma * Phi^-1(Clopper-Pearson lower bound) "
          "recomputed with SciPy from the logged vote counts")

    saved = Path(args.reference_csv) if args.reference_csv else None
    if saved and saved.is_file():
        with open(saved, newline="") as fh:
            cached = list(csv.DictReader(fh))
        if [int(c["index"]) for c in cached] != [int(r["index"]) for r in ours]:
            raise SystemExit(f"{saved} holds other images than {folder / 'certify.csv'}")
        ref = [{"prediction": int(c["prediction"]), "radius": float(c["radius"]), "correct": int(c["correct"])} for c in cached]
        seconds = float(cached[0]["seconds_per_image"])
        report(args, cfg, ours, ref, seconds)
        report_file.finish()
        return
    model = load_model(args.model).eval()
    data = load_data(DataSpec(source=args.data))
    Smooth = load_reference(Path(args.core), torch.device("cpu"))
    smooth = Smooth(model, data.num_classes, sigma)
    torch.manual_seed(args.seed)
    ref, t0 = [], time.perf_counter()
    for i, r in enumerate(ours):
        idx = int(r["index"])
        x = data.test.as_float(data.test.images[idx:idx + 1])[0]
        with torch.no_grad():
            pred, radius = smooth.certify(x, n0, n, alpha, batch)
        ref.append({"prediction": pred, "radius": float(radius), "correct": int(pred == int(r["label"]))})
        print(f"  reference {i + 1}/{len(ours)}: image {idx} -> {pred} r={radius:.3f} "
              f"(deploypipe {int(r['prediction'])} r={r['radius']:.3f})", flush=True)
    seconds = (time.perf_counter() - t0) / len(ours)
    if saved:
        with open(saved, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["index", "prediction", "radius", "correct", "seconds_per_image"])
            writer.writeheader()
            writer.writerows({"index": int(r["index"]), **x, "seconds_per_image": seconds} for r, x in zip(ours, ref))
    report(args, cfg, ours, ref, seconds)
    report_file.finish()


def report(args, cfg: dict, ours: list[dict], ref: list[dict], seconds: float) -> None:
    sigma, n0, n, alpha, batch = cfg["sigma"], cfg["n0"], cfg["n"], cfg["alpha"], cfg["batch_size"]
    N = len(ours)
    print(f"\nmodel `{args.model}`, {N} test images, sigma {sigma}, n0 {n0}, n {n:,}, alpha {alpha}, batch {batch}; "
          f"reference {seconds:.2f} s/image, deploypipe {sum(r['seconds'] for r in ours) / N:.2f} s/image\n")
    print("| radius | deploypipe | reference core.py | difference | paired MC error | difference / error |")
    print("|---|---|---|---|---|---|")
    for radius in cfg["radii"]:
        a = [int(o["correct"] and o["radius"] >= radius) for o in ours]
        b = [int(x["correct"] and x["radius"] >= radius) for x in ref]
        discordant = sum(x != y for x, y in zip(a, b))
        err = math.sqrt(discordant) / N
        diff = (sum(a) - sum(b)) / N
        print(f"| {radius:g} | {100 * sum(a) / N:.1f}% | {100 * sum(b) / N:.1f}% | {100 * diff:+.1f} pt | "
              f"{100 * err:.1f} pt | {diff / err if err else 0.0:+.2f} |")
    acr_a = sum(o["radius"] for o in ours if o["correct"]) / N
    acr_b = sum(x["radius"] for x in ref if x["correct"]) / N
    same = sum(int(o["prediction"]) == x["prediction"] for o, x in zip(ours, ref))
    both = [(o["radius"], x["radius"]) for o, x in zip(ours, ref) if int(o["prediction"]) == x["prediction"] >= 0]
    mad = sum(abs(p - q) for p, q in both) / max(len(both), 1)
    print(f"\nACR: deploypipe {acr_a:.3f}, reference {acr_b:.3f}; same prediction (abstentions included) on {same}/{N} "
          f"images; mean |radius difference| where both certify the same class: {mad:.4f}")


if __name__ == "__main__":
    main()
