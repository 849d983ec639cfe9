"""Robustness-aware bit allocation: does choosing precisions for the smoothed classifier keep more
certified radius than choosing them on clean calibration KL, at the same size?

A base classifier trained with Gaussian noise (sigma) is quantized to mixed precision, weight
candidates {2, 3, 4, 8} (first and last layer at 8 bits, inputs at 8 bits), at each size budget, four
ways:
- clean:   layer deltas = calibration KL on clean images (today's default);
- noisy:   layer deltas = KL on calibration images noised at sigma (``sensitivity noisy``);
- votes:   layer deltas = drop of the FP top-class vote probability over 16 noisy copies of each
  calibration image (``sensitivity votes``);
- constrained: noisy deltas plus ``max_acr_loss`` checked by certifying on a held-out selection subset
  of the training data (re-solved with a larger budget while it is violated; never the test split).
All four calibrate the same way (round-to-nearest with MSE ranges on calibration images noised at
sigma, ``calib_noise_sigma``); only the choice differs. Each model (and the FP32 one) is then certified
on the same test images with the same noise (Cohen et al.'s CERTIFY); the paired ACR difference
noisy - clean (votes - clean, constrained - clean) has its standard error over images.

    python bench/robust_alloc.py --model runs/r20-noise/train/model --data imagefolder:../shared/data/cifar10 \\
        [--sigma 0.25] [--budgets 0.10 0.13] [--images 500] [--n 10000] [--device cuda] \\
        [--report docs/benchmarks/robust_alloc.md]

Every model's certificates are saved in ``--out`` as soon as they are done and read back on a rerun
with the same settings, so the full-scale run (500 images at n = 10,000: about 5 million forward
passes per model, about an hour per model on 2 CPU cores, where the model sees the noisy copies in
chunks of 64) can be spread over several sittings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report, add_report_argument, markdown_table  # noqa: E402 (after the path insert)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder trained with Gaussian noise at --sigma")
    ap.add_argument("--data", required=True, help="e.g. imagefolder:../shared/data/cifar10")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.10, 0.13])
    ap.add_argument("--candidates", default="2,3,4,8")
    ap.add_argument("--max-acr-loss", type=float, default=0.05)
    ap.add_argument("--images", type=int, default=500, help="test images certified (every k-th of the test split)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--calib-size", type=int, default=1024, help="calibration images (all three choices share them)")
    ap.add_argument("--selection-images", type=int, default=200)
    ap.add_argument("--selection-n", type=int, default=1000)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: quantization, evaluation and certification")
    ap.add_argument("--out", default="runs/bench-robust-alloc",
                    help="certificates per model (JSON, one subfolder per test setting), read back on a rerun")
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, "Robustness-aware bit allocation: clean KL vs noisy KL vs vote drop vs certified "
                                 "constraint").start()

    import torch

    from deploypipe.config import DataSpec
    from deploypipe.data import load_data
    from deploypipe.evaluation import top1_and_loss
    from deploypipe.models import load_model, read_record, save_model
    from deploypipe.smoothing import ABSTAIN, Smoothed
    from deploypipe.stages.quantize.config import QuantizeConfig
    from deploypipe.stages.quantize.ptq import quantize
    from deploypipe.stages.quantize.modules import TRANSFORM_MODULE

    torch.manual_seed(0)
    data = load_data(DataSpec(source=args.data, calib_size=args.calib_size))
    device = torch.device(args.device)
    fp = load_model(args.model).eval().to(device)
    record = read_record(args.model)
    step = max(1, len(data.test) // args.images)
    test_idx = torch.arange(0, len(data.test), step)[:args.images]
    test = data.test.subset(test_idx)
    held = data.held_out(args.selection_images, 0)
    selection = (held.as_float(held.images), held.labels)
    calib = [(x, y) for x, y in data.calib.batches(256)]
    setting = f"{Path(args.model).parent.parent.name}-sigma{args.sigma}-n{args.n}-n0{args.n0}-a{args.alpha}-" \
              f"i{len(test)}-calib{args.calib_size}-sel{args.selection_images}x{args.selection_n}"
    out = Path(args.out) / (setting + ("" if device.type == "cpu" else f"-{device.type}"))  # noise drawn on device
    out.mkdir(parents=True, exist_ok=True)

    def certify(model, name):
        """The certificates of ``model`` on the test images (read back when ``name`` was certified before;
        an interrupted one goes on from its last group of 10 images: image i's noise depends on i only)."""
        path, partial = out / f"{name}.json", out / f"{name}.partial.json"
        if path.is_file():
            return json.loads(path.read_text())
        done = json.loads(partial.read_text()) if partial.is_file() else {"rows": [], "seconds": 0.0}
        rows, before = done["rows"], done["seconds"]
        t0 = time.perf_counter()
        smoothed = Smoothed(model.eval(), data.num_classes, args.sigma, batch_size=1000, seed=0, device=device)
        for start in range(len(rows), len(test), 10):
            xs = test.as_float(test.images[start:start + 10])
            certs = smoothed.certify_batch(xs, args.n0, args.n, args.alpha,
                                           indices=list(range(start, start + len(xs))))
            for c, y in zip(certs, test.labels[start:start + 10].tolist()):
                rows.append({"correct": c.prediction != ABSTAIN and c.prediction == y, "radius": c.radius})
            seconds = before + time.perf_counter() - t0
            partial.write_text(json.dumps({"rows": rows, "seconds": seconds}))
            print(f"  certify {name}: {len(rows)}/{len(test)} images, {seconds:.0f} s", file=sys.stderr, flush=True)
        result = {"rows": rows, "seconds": before + time.perf_counter() - t0}
        path.write_text(json.dumps(result))
        partial.unlink(missing_ok=True)
        return result

    def summary(rows):
        radii = [r["radius"] if r["correct"] else 0.0 for r in rows]
        certified = {f"ca{r}": sum(1 for x in rows if x["correct"] and x["radius"] >= r) / len(rows)
                     for r in (0.25, 0.5)}
        return {"acr": sum(radii) / len(radii), **certified, "radii": radii}

    def paired(a, b):
        d = [x - y for x, y in zip(a, b)]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        return mean, se

    fp_top1, _ = top1_and_loss(fp, data.test, device=device)
    fp_cert = summary(certify(fp, "fp32")["rows"])
    candidates = [int(b) for b in args.candidates.split(",")]
    table, notes = [], []
    columns = ["budget", "choice", "size (of FP32)", "avg bits", "clean top-1", "cert. acc r=0.25", "cert. acc r=0.5",
               "ACR", "ACR vs clean (paired ± SE)", "rounds", "quantize s"]
    table.append(["—", "FP32", "1.000", "32", f"{100 * fp_top1:.2f}%", f"{100 * fp_cert['ca0.25']:.1f}%",
                  f"{100 * fp_cert['ca0.5']:.1f}%", f"{fp_cert['acr']:.3f}", "", "", ""])
    headline_diffs, agreement = [], []
    for budget in args.budgets:
        base = dict(weight_bits=8, act_bits=8, method="rtn", bit_candidates=candidates, budget=budget,
                    calib_noise_sigma=args.sigma, export_onnx=False, sigma=args.sigma,
                    selection_images=args.selection_images, selection_n=args.selection_n)
        variants = {"clean": {}, "noisy": {"sensitivity": "noisy"}, "votes": {"sensitivity": "votes"},
                    "constrained": {"sensitivity": "noisy", "max_acr_loss": args.max_acr_loss}}
        results, layers = {}, {}
        for name, extra in variants.items():
            key = f"{name}-loss{args.max_acr_loss}-b{budget}" if name == "constrained" else f"{name}-b{budget}"
            cell = out / f"{key}.cell.json"  # a quantized cell is read back on a rerun
            saved = out / f"{key}.model"  # and its model, until its certificates are done
            if cell.is_file():
                c = json.loads(cell.read_text())
                if not (out / f"{key}.json").is_file():
                    certify(load_model(saved).to(device), key)
            else:
                t0 = time.perf_counter()
                q, rep = quantize(fp, calib, QuantizeConfig(**base, **extra), seed=0, device=device,
                                  selection=selection if "max_acr_loss" in extra else None,
                                  log=lambda msg: print(f"  [{name} {budget}] {msg}", file=sys.stderr, flush=True))
                seconds = time.perf_counter() - t0
                top1, _ = top1_and_loss(q, data.test, device=device)
                save_model(q, record.with_transform("quantize", TRANSFORM_MODULE, rep.transform), saved)
                c = {"size": rep.metrics["size_fraction_of_fp32"], "avg_bits": rep.metrics["ip_average_bits"],
                     "top1": top1, "seconds": seconds, "rounds": rep.robust_rounds,
                     "selection_fp_acr": rep.metrics.get("selection_fp_acr"), "layers": rep.bit_allocation}
                cell.write_text(json.dumps(c))
                certify(q, key)
            cert = summary(certify(None, key)["rows"])
            results[name] = cert
            layers[name] = c.get("layers")
            diff = ("" if name == "clean" else
                    "{:+.4f} ± {:.4f}".format(*paired(cert["radii"], results["clean"]["radii"])))
            if name != "clean":
                headline_diffs.append((budget, name, *paired(cert["radii"], results["clean"]["radii"])))
            table.append([f"{budget:g}", name, f"{c['size']:.4f}", f"{c['avg_bits']:.2f}", f"{100 * c['top1']:.2f}%",
                          f"{100 * cert['ca0.25']:.1f}%", f"{100 * cert['ca0.5']:.1f}%", f"{cert['acr']:.3f}", diff,
                          str(len(c["rounds"])) if c["rounds"] else "", f"{c['seconds']:.0f}"])
            if c["rounds"]:
                notes.append(markdown_table(
                    ["round", "budget asked", "achieved", "selection ACR", "ACR loss", "holds", "chosen"],
                    [[r["round"], f"{r['budget']:.4f}", f"{r['achieved']:.4f}", f"{r['acr']:.3f}",
                      f"{r['acr_loss']:+.3f}", r["holds"], r["chosen"]] for r in c["rounds"]],
                    f"Re-solve rounds at budget {budget:g} (selection subset: {args.selection_images} training "
                    f"images outside the calibration set, n = {args.selection_n}; FP32 selection ACR "
                    f"{c['selection_fp_acr']:.3f})"))
        for name in ("noisy", "votes"):
            if layers.get("clean") and layers.get(name):
                agreement.append(_agreement(budget, name, layers["clean"], layers[name], candidates))
    print(markdown_table(columns, table, f"{type(fp).__name__} from {args.model}, sigma = {args.sigma}: {len(test)} "
                                         f"test images (every {step}-th), n = {args.n}, n0 = {args.n0}, "
                                         f"alpha = {args.alpha}; {args.calib_size} calibration images"))
    for note in notes:
        print(note)
    if agreement:
        print(markdown_table(
            ["budget", "deltas", "Spearman rho with clean KL, all (layer, bits)", "rho per candidate (layers ranked)",
             "layers whose bits differ", "program layers"], agreement,
            "Do the robustness-aware deltas rank the choices differently from the clean ones? (the program's "
            "objective is the sum of the chosen deltas, so equal rankings give the same allocation)"))
    print("ACR vs clean: the mean over the same test images (same noise) of the radius difference, 0 when not "
          "certified correct, with its standard error. Size: deployed storage (storage_bytes: weights at "
          "their bits with their 32-bit scales, every other parameter and buffer at its dtype) as a fraction of FP32.")
    parts = [f"{name} {d:+.3f} ± {se:.3f} at budget {b:g}" for b, name, d, se in headline_diffs]
    report.finish(headline=f"robustness-aware bit allocation ({len(test)} test images, n = {args.n}), ACR minus the "
                           f"clean-KL choice's: {'; '.join(parts)} (constrained: ACR loss <= {args.max_acr_loss} on "
                           "the selection subset, may grow the size)")


def _agreement(budget: float, name: str, clean: list[dict], noisy: list[dict], candidates: list[int]) -> list:
    """Rank agreement of the clean and the ``name`` delta tables, and how many layers the two choices differ on."""
    from scipy.stats import spearmanr

    from deploypipe.stages.quantize.mixed_precision import precision_label

    keys = [f"dloss_{precision_label(b)}" for b in candidates]
    a = [row[k] for row in clean for k in keys]
    b = [row[k] for row in noisy for k in keys]
    per = ", ".join(f"{precision_label(bits)}-bit {spearmanr([r[k] for r in clean], [r[k] for r in noisy])[0]:.3f}"
                    for bits, k in zip(candidates, keys) if bits != max(candidates))  # top: delta ~0 everywhere
    differ = sum(c["bits"] != n["bits"] for c, n in zip(clean, noisy))
    label = {"noisy": "noisy KL", "votes": "vote drop"}[name]
    return [f"{budget:g}", label, f"{spearmanr(a, b)[0]:.3f}", per, str(differ), str(len(clean))]


if __name__ == "__main__":
    main()
