"""``deploypipe certify-merge``: combine the outputs of sharded certify runs (``--shard i/k``, one per
job-array task or torchrun rank) into the metrics and plot of the unsharded run.

Under torchrun (``torchrun --nproc-per-node K -m deploypipe certify ... --out runs/c``) rank r writes
``runs/c/rank<r>/certify`` with shard r/K (recorded in its result.json); merge those folders.

Each shard folder is a certify stage output (``certify.csv`` + ``config.yaml``). The shards must
share every setting but ``shard``, have certified the same seed, data and classifiers (their
``provenance.json``: weight hashes), be the k different shards of one split, and together hold each
image of it once; the noise of an image depends only on (seed, image index), so the merged CSV equals
the unsharded one (up to the timing column). Shards run with ``--reference`` merge both tables, so
the robustness lost to compression (``acr_lost``) survives sharding. ``--out`` must be new, empty or
an earlier merge output (never a shard or a work directory: it is replaced). The merged result is
also an MLflow run (``certify-merge`` in the experiment, default the pipeline's ``deploypipe``) with
the settings, the shard folders, the metrics and the merged folder's files; the run is started before
anything is written, so a tracking store that cannot take it stops the merge with nothing written.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import click
from pydantic import ValidationError

from deploypipe.errors import InputError
from deploypipe.pipeline import standalone_run

from .config import CertifyConfig
from .outputs import comparable_settings, read_output
from .report import plot_curves, reference_metrics, summarize
from .runner import select_images


MARKER = "merged_from.json"  # written by certify-merge: its --out may be replaced, nothing else is


def merge_shards(folders: list[Path]) -> tuple[CertifyConfig, list[dict], list[dict] | None]:
    """Check the shards belong together (settings, seed, data, classifiers, one split, every image
    once) and return their settings, rows and reference rows (None without), sorted by image index."""
    if not folders:
        raise InputError("certify-merge needs at least one shard folder", "list the shards' certify output folders")
    configs, rows, provenances, refs = [], [], [], []
    for folder in folders:
        cfg, part, provenance, ref = read_output(Path(folder))
        configs.append(cfg)
        rows += part
        provenances.append(provenance)
        refs.append(ref)
    known = [p for p in provenances if p]
    if known and (len(known) != len(provenances) or any(p != known[0] for p in known[1:])):
        diff = sorted({k for p in provenances for k in set(p) | set(known[0]) if p.get(k) != known[0].get(k)})
        raise InputError(f"the shards certified different {', '.join(diff)} (provenance.json)",
                         "merge only shards of one certify command: same seed, data and models")
    common = [comparable_settings(c) for c in configs]
    # with every shard's provenance, its weight hashes say which files were certified: the same ONNX file
    # or model folder at another path (a job array's node, a copied checkout) is the same shard source
    paths = ("onnx", "reference", "model_right") if known and len(known) == len(provenances) else ()
    compared = [{k: v for k, v in c.items() if k not in paths} for c in common]
    if any(c != compared[0] for c in compared[1:]):
        diff = sorted({k for c in compared[1:] for k in c if c.get(k) != compared[0].get(k)})
        raise InputError(f"the shards were certified with different settings ({', '.join(diff)})",
                         "merge only shards of one certify command (same sigma, n, alpha, images, model)")
    shards = [c.get("shard") for c in configs]
    if len(folders) > 1 or shards[0]:
        ks = {s.split("/")[1] for s in shards if s}
        if None in shards or len(ks) != 1 or sorted(int(s.split("/")[0]) for s in shards) != list(range(int(ks.pop()))):
            raise InputError(f"the shards {shards} are not all k shards 0/k .. k-1/k of one split",
                             "give every shard folder of the run, once")
    indices = [r["index"] for r in rows]
    if len(set(indices)) != len(indices):
        raise InputError("an image appears in more than one shard", "give each shard folder once")
    try:
        cfg = CertifyConfig.model_validate({**common[0], "shard": None})
    except ValidationError as err:
        raise InputError(f"the shards' config.yaml is not a certify config ({err.errors()[0]['msg']})",
                         "give the folders certify wrote, unedited") from None
    if known and "test_images" in known[0]:
        want = select_images(int(known[0]["test_images"]), cfg.num_images, cfg.every, None)
        if sorted(indices) != want:
            raise InputError(f"the shards hold {len(indices)} of the {len(want)} images the command certifies",
                             "give every shard folder of the run (each rank's or job's <out>/certify)")
    if any(r is not None for r in refs) and any(r is None for r in refs):
        raise InputError("only some shards have certify_reference.csv", "merge only shards of one certify command")
    ref_rows = None if refs[0] is None else sorted((r for part in refs for r in part), key=lambda r: r["index"])
    return cfg, sorted(rows, key=lambda r: r["index"]), ref_rows


def _write(out: Path, cfg: CertifyConfig, rows: list[dict], ref_rows: list[dict] | None,
           shards: tuple[Path, ...]) -> dict[str, float]:
    """The merged tables, metrics and plot, written beside ``out`` and moved into place; the metrics."""
    metrics = summarize(rows, cfg.radii)
    metrics["images"] = float(len(rows))
    curves = {"merged": rows}
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tables = {"certify": rows}
    if ref_rows is not None:  # the --reference comparison (e.g. the FP32 model beside the quantized one)
        metrics.update(reference_metrics(rows, ref_rows, cfg.radii))
        curves = {"this model": rows, "reference": ref_rows}
        tables["certify_reference"] = ref_rows
    for name, table in tables.items():
        with open(tmp / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
            writer.writeheader()
            writer.writerows(table)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(curves, cfg).savefig(tmp / "certified_accuracy.png", dpi=120, bbox_inches="tight")
    (tmp / MARKER).write_text(json.dumps({"shards": [str(s) for s in shards]}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return metrics


def run_merge(shards: tuple[Path, ...], out: Path, workdir: Path, tracking_uri: str | None,
              experiment: str) -> None:
    """What ``deploypipe certify-merge`` does (see merge_command.py): merge, record the MLflow run, report."""
    cfg, rows, ref_rows = merge_shards(list(shards))
    target = out.resolve()
    for shard in shards:
        if target == shard.resolve() or target in shard.resolve().parents:
            raise InputError(f"certify-merge --out {out} would replace the shard {shard}",
                             "give a new folder, e.g. runs/merged")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(f"certify-merge --out {out} exists and is not an earlier merge output",
                         "give a new or empty folder (an earlier certify-merge output is replaced)")
    config = {"certify": cfg.model_dump(mode="json"), "shards": [str(s) for s in shards]}
    tags = {"deploypipe.kind": "certify-merge", "deploypipe.stage": "certify"}
    with standalone_run("certify-merge", config, tags, workdir, tracking_uri, experiment) as run:
        metrics = _write(out, cfg, rows, ref_rows, shards)
        run.log_metrics(metrics)
        run.log_artifacts(out)
    click.echo(", ".join(f"r={r:g}: {metrics[f'certified_acc_r{r:g}']:.3f}" for r in cfg.radii)
               + f"; ACR {metrics['acr']:.3f} over {len(rows)} images"
               + (f"; reference ACR {metrics['reference_acr']:.3f}, lost {metrics['acr_lost']:.3f}" if ref_rows else "")
               + f" -> {out} (MLflow run {run.run_id} in {run.tracker.uri})")
