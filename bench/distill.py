"""Data pruning with knowledge distillation on CIFAR-10: ResNet-20 students on kept fractions of the
training set, by random / EL2N / forgetting selection, with and without KD from a ResNet-20 teacher
trained on all of it; a full-data student for reference; at the smallest fraction, a smaller teacher
(``--small-teacher``, e.g. the teacher's earlier checkpoint or a ResNet-8) against the full one.

Every cell is one ``python -m deploypipe distill ... --json`` run (wall time and peak memory read
with wait4), with the same epochs for every cell; the scoring cost (EL2N and forgetting train extra
models first) is paid by a method's first cell and reported per method; its other cells read that
cell's scores.csv (``--scores``), the same ranking without training the scoring models again.
Targets (Ben-Baruch et al.'s findings, to confirm or refute): random + KD at 50% within 0.5 pt of
full-data training without KD; KD's gain largest at the smallest fraction; whether the smaller
teacher wins at the smallest fraction.

    python bench/distill.py --teacher runs/r20/train/model --data imagefolder:../shared/data/cifar10 \\
        [--fractions 0.1,0.3,0.5,0.7] [--scores random,el2n,forgetting] [--epochs 15] \\
        [--small-teacher MODEL] [--reference run|teacher] [--equal-steps 0.5] [--finished-only] \\
        [--report docs/benchmarks/distill.md]

``--reference teacher``: the full-data row is the teacher's own ``deploypipe train`` run instead of a
new one, allowed only when that run used this benchmark's recipe (epochs, batch, optimizer, learning
rate and schedule, weight decay, augmentation, data): a distill with KD weight 0 on all the data is
the same training (tests/stages/test_distill.py checks it bit for bit against the Trainer), from
another initialisation. It saves the longest cell on a CPU.

``--equal-steps 0.5``: also random selection at that fraction, with and without KD, trained for
epochs / fraction epochs — as many optimizer steps as the full-data run, instead of the same epochs
(a second table; the main matrix keeps one epochs budget for every cell).

``--finished-only``: report the cells this ``--out`` folder finished before (each still goes through
deploypipe, which checks its settings) and list the others as not run, without starting them — the
whole matrix takes hours on a CPU, so it is measured over several sittings.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import Report, add_report_argument, markdown_table  # noqa: E402 (after the path insert)
from runner import run_deploypipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the teacher: a model folder trained on all the data")
    ap.add_argument("--small-teacher", default=None, help="a smaller / weaker teacher for the smallest fraction")
    ap.add_argument("--student", default="zoo:resnet20")
    ap.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    ap.add_argument("--fractions", default="0.1,0.3,0.5,0.7")
    ap.add_argument("--scores", default="random,el2n,forgetting")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-distill")
    ap.add_argument("--reference", choices=("run", "teacher"), default="run",
                    help="the full-data row: a new run, or the teacher's own training when its recipe is this one")
    ap.add_argument("--equal-steps", default="", metavar="F[,F]",
                    help="fractions also trained (random, KD and not) for epochs / F epochs: the full run's steps")
    ap.add_argument("--finished-only", action="store_true",
                    help="report only the cells finished before in --out; list the others as not run")
    add_report_argument(ap)
    args = ap.parse_args()
    report = Report(args.report, "Distill: data pruning with knowledge distillation, CIFAR-10 ResNet-20").start()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(",")]

    def recipe(epochs: int) -> list[str]:
        return ["--model", args.teacher, "--student", args.student, "--data", args.data, "--epochs", str(epochs),
                "--lr", str(args.lr)]

    common = recipe(args.epochs)
    cells = {}

    def cell(label: str, cell_args: list[str]):
        """One cell's metrics; None when --finished-only and it never finished here."""
        if args.finished_only and not (out / f"{label}.usage.json").is_file():
            print(f"  {label}: not run yet (--finished-only)", file=sys.stderr, flush=True)
            return None
        metrics = run_deploypipe("distill", label, cell_args, out, args.threads)
        if "resuming from the checkpoint" in (out / f"{label}.log").read_text(errors="replace"):
            # its wall clock covers only the last sitting: count the training of every epoch instead
            with open(out / label / "distill" / "epochs.csv") as f:
                metrics["wall_seconds"] = sum(float(row["epoch_seconds"]) for row in csv.DictReader(f))
            metrics["resumed"] = True
        return metrics

    if args.reference == "teacher":
        full = _teacher_as_reference(args)
    else:
        full = cell("full-data", common + ["--keep", "1", "--kd-weight", "0"])
        if full is None:
            raise SystemExit("--finished-only: the full-data cell has not run — fix: run without --finished-only "
                             "or use --reference teacher")
    teacher_top1 = full["teacher_test_top1"]
    scoring = {}  # seconds each method's scores cost, paid once: later cells read its scores.csv
    for score in args.scores.split(","):
        source, scored = None, False
        for f in fractions:
            for kd in ("auto", "0"):
                label = f"{score}-{f:g}-{'kd' if kd == 'auto' else 'nokd'}"
                if scored and source is None and score != "random":  # its scoring cell did not run
                    cells[score, f, kd] = None
                    continue
                how = ["--score", score] if source is None else ["--scores", str(source)]
                cells[score, f, kd] = cell(label, common + how + ["--keep", f"{f:g}", "--kd-weight", kd])
                scored = True
                if source is None and cells[score, f, kd] is not None and score not in scoring:
                    scoring[score] = cells[score, f, kd]["score_seconds"]
                    if score != "random":
                        source = out / label / "distill" / "scores.csv"
    small = None
    if args.small_teacher:
        f = min(fractions)
        small = cell(f"random-{f:g}-small-teacher", [
            "--model", args.small_teacher, "--student", args.student, "--data", args.data, "--epochs",
            str(args.epochs), "--lr", str(args.lr), "--keep", f"{f:g}"])
    steps = {}  # (fraction, kd) -> metrics at epochs / fraction epochs
    for f in [float(x) for x in args.equal_steps.split(",") if x]:
        epochs = round(args.epochs / f)
        for kd in ("auto", "0"):
            steps[f, kd] = cell(f"random-{f:g}-{'kd' if kd == 'auto' else 'nokd'}-{epochs}ep",
                                recipe(epochs) + ["--score", "random", "--keep", f"{f:g}", "--kd-weight", kd])
    (out / "results.json").write_text(json.dumps({"args": vars(args), "full": full, "small": small,
                                                  "cells": {"|".join(map(str, k)): v for k, v in cells.items()},
                                                  "equal_steps": {"|".join(map(str, k)): v for k, v in steps.items()}},
                                                 indent=2, default=str))
    reference = "all data, no KD" + (" (the teacher's own training)" if args.reference == "teacher" else "")
    rows = [[reference, "–", f"{100 * full['test_top1']:.2f}", "–", "–", f"{full['wall_seconds']:.0f}"]]

    def top1(m) -> str:
        return "not run yet" if m is None else f"{100 * m['test_top1']:.2f}"

    def gain(kd, plain) -> str:
        return "–" if kd is None or plain is None else f"{100 * (kd['test_top1'] - plain['test_top1']):+.2f}"

    def wall(m) -> str:
        """The cell's wall time less its scoring (the scoring cost has its own line)."""
        if m is None or m["wall_seconds"] is None:
            return "–"
        if m.get("resumed"):
            return f"{m['wall_seconds']:.0f} †"
        return f"{m['wall_seconds'] - m.get('score_seconds', 0.0):.0f}"

    for score in args.scores.split(","):
        for f in fractions:
            kd, plain = cells[score, f, "auto"], cells[score, f, "0"]
            rows.append([score, f"{100 * f:g}%", top1(kd), top1(plain), gain(kd, plain), wall(kd)])
    columns = ["selection", "kept", "student + KD top-1", "student top-1", "KD gain (pt)",
               "student + KD wall s (no scoring)"]
    print(markdown_table(columns, rows,
                         f"`{args.student}` students, {args.epochs} epochs each; teacher `{args.teacher}` "
                         f"({100 * teacher_top1:.2f}% top-1, all data); test top-1 on all test images"))
    print("Scoring cost, paid once per method before any student trains (the other cells of a method read its "
          "scores.csv through --scores): " + ", ".join(f"{k} {v:.0f} s" for k, v in scoring.items()) + ".")
    if small is not None and cells.get(("random", min(fractions), "auto")) is not None:
        f = min(fractions)
        print(f"At {100 * f:g}% kept (random), KD from the smaller teacher `{args.small_teacher}` "
              f"({100 * small['teacher_test_top1']:.2f}%): {100 * small['test_top1']:.2f}%, against "
              f"{100 * cells['random', f, 'auto']['test_top1']:.2f}% from the full teacher.")
    if steps:
        rows = []
        for f in sorted({f for f, _ in steps}):
            kd, plain = steps[f, "auto"], steps[f, "0"]
            rows.append(["random", f"{100 * f:g}%", str(round(args.epochs / f)), top1(kd), top1(plain),
                         gain(kd, plain), wall(kd)])
        print(markdown_table(["selection", "kept", "epochs", "student + KD top-1", "student top-1", "KD gain (pt)",
                              "student + KD wall s"], rows,
                             f"The same optimizer steps as the full-data run ({args.epochs} epochs on all data): "
                             f"epochs / kept fraction on the kept set"))
    if any(m is not None and m.get("resumed") for m in [*cells.values(), *steps.values(), small]):
        print("† Resumed from its checkpoint after an interruption: the sum of its epoch times (training and the "
              "per-epoch test evaluation), because its wall clock covers only the last sitting.")
    findings = []
    if cells.get(("random", 0.5, "auto")) is not None:
        gap = cells["random", 0.5, "auto"]["test_top1"] - full["test_top1"]
        findings.append(f"random 50% + KD: {100 * cells['random', 0.5, 'auto']['test_top1']:.2f}% against "
                        f"{100 * full['test_top1']:.2f}% on all data without KD ({100 * gap:+.2f} pt, target >= -0.5)")
    if steps.get((0.5, "auto")) is not None:
        gap = steps[0.5, "auto"]["test_top1"] - full["test_top1"]
        findings.append(f"with the full run's optimizer steps ({round(args.epochs / 0.5)} epochs): "
                        f"{100 * steps[0.5, 'auto']['test_top1']:.2f}% ({100 * gap:+.2f} pt)")
    for score in args.scores.split(","):
        gains = {f: cells[score, f, "auto"]["test_top1"] - cells[score, f, "0"]["test_top1"] for f in fractions
                 if cells[score, f, "auto"] is not None and cells[score, f, "0"] is not None}
        if len(gains) > 1:
            best = max(gains, key=gains.get)
            verdict = "largest at the smallest fraction" if best == min(gains) else \
                f"largest at {100 * best:g}%, not at the smallest fraction"
            if len(gains) < len(fractions):
                verdict += f" of those run ({', '.join(f'{100 * f:g}%' for f in gains)})"
            print(f"KD's gain ({score}): " + ", ".join(f"{100 * g:+.2f} pt at {100 * f:g}%" for f, g in gains.items())
                  + f" — {verdict} (the paper: largest at the smallest fraction).")
            findings.append(f"KD gain ({score}) {verdict}")
    if small is not None and cells.get(("random", min(fractions), "auto")) is not None:
        f = min(fractions)
        diff = small["test_top1"] - cells["random", f, "auto"]["test_top1"]
        findings.append(f"at {100 * f:g}% the smaller teacher {'wins' if diff > 0 else 'loses'} ({100 * diff:+.2f} pt)")
    report.finish(headline="; ".join(findings) or None)


def _teacher_as_reference(args) -> dict:
    """The teacher's train-stage run as the full-data, no-KD row: its test top-1 and wall time, after
    checking that it trained with this benchmark's recipe."""
    import yaml

    from deploypipe.config import DataSpec
    from deploypipe.stages.distill.config import DistillConfig

    stage_dir = Path(args.teacher).resolve().parent
    config, result = stage_dir / "config.yaml", stage_dir / "result.json"
    pipeline = stage_dir.parent / "pipeline.yaml"
    if not (config.is_file() and result.is_file() and pipeline.is_file()):
        raise SystemExit(f"--reference teacher: {stage_dir} is not a train stage's output folder (config.yaml, "
                         "result.json, ../pipeline.yaml) — fix: use --reference run")
    train = (yaml.safe_load(config.read_text()) or {}).get("train")
    if train is None:
        raise SystemExit(f"--reference teacher: {stage_dir} holds no train stage — fix: use --reference run")
    want = DistillConfig(keep=[1.0], epochs=args.epochs, lr=args.lr)
    recipe = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "label_smoothing",
              "augment", "channels_last")
    differ = [k for k in recipe if train.get(k) != getattr(want, k)]
    differ += [k for k in ("noise_sigma", "consistency", "warmup_epochs") if train.get(k)]
    data = (yaml.safe_load(pipeline.read_text()) or {}).get("data") or {}

    def where(spec: str) -> str:
        kind, _, path = spec.partition(":")
        return f"{kind}:{Path(path).resolve()}" if path else spec

    if where(data.get("source", "")) != where(args.data):
        differ.append(f"data ({data.get('source')})")
    split = DataSpec(source=args.data).model_dump(exclude={"source"})  # the cells' split: the defaults
    differ += [f"data {k}" for k, v in split.items() if data.get(k, v) != v]
    if differ:
        raise SystemExit(f"--reference teacher: the teacher was trained with another recipe ({', '.join(differ)}) "
                         "— fix: use --reference run")
    metrics = json.loads(result.read_text())["metrics"]
    print(f"  full-data: the teacher's own training ({metrics['test_top1']:.4f} top-1, "
          f"{metrics['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    return {"test_top1": metrics["test_top1"], "teacher_test_top1": metrics["test_top1"],
            "wall_seconds": metrics["train_seconds"], "score_seconds": 0.0}


if __name__ == "__main__":
    main()
