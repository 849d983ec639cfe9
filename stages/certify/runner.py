"""Running a certification over test images: which images, a journal to resume an interrupted run
from, certificates read back from an earlier output (``reuse``), and the out-of-memory fallbacks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from deploypipe.data import ImageSet
from deploypipe.errors import InputError
from deploypipe.progress import log, progress

from .config import MIN_FORWARD_CHUNK, CertifyConfig
from .outputs import comparable_settings, read_output
from deploypipe.smoothing import DualSmoothed, Smoothed


def select_images(total: int, num_images: Optional[int], every: Optional[int], shard: Optional[str]) -> list[int]:
    """Test-set indices to certify (before and after sharding)."""
    if every is not None:
        idx = list(range(0, total, every))
    elif num_images is not None and num_images < total:
        idx = sorted({int(i * total / num_images) for i in range(num_images)})
    else:
        idx = list(range(total))
    if shard:
        i, k = (int(p) for p in shard.split("/"))
        idx = idx[i::k]
    return idx


def read_journal(path: Path, identity: dict, indices: list[int]) -> list[dict]:
    """Rows an interrupted run of the same stage (same config, data, seed and weights: ``identity``)
    already certified, read back from its journal; a journal of other weights is discarded."""
    try:
        lines = path.read_text().splitlines()
        if not lines or json.loads(lines[0]) != identity:
            return []
        wanted = set(indices)
        rows = []
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                break
            if row.get("index") in wanted:
                rows.append(row)
        return rows
    except (OSError, json.JSONDecodeError):
        return []


# settings that do not change an image's certificate: which images, the reported radii, the forward
# chunk (same noise), the comparison model and the paths whose weights provenance.json hashes
REUSE_FREE = ("every", "num_images", "shard", "radii", "forward_batch", "reference", "reuse", "onnx", "model_right")


def reused_certificates(cfg: CertifyConfig, provenance: dict,
                        ref_hash: Optional[str]) -> tuple[list[dict], Optional[list[dict]]]:
    """The rows (and reference rows) of the earlier output ``cfg.reuse``, after checking it certified the
    same seed, data and weights with the same settings; refused with a one-line error otherwise."""
    folder = Path(cfg.reuse)
    if not folder.is_dir():
        raise InputError(f"certify reuse '{folder}' is not a folder", "give an earlier run's <out>/certify folder")
    old_cfg, rows, old_prov, ref_rows = read_output(folder)
    if not old_prov:
        raise InputError(f"certify reuse '{folder}' has no provenance.json (written by an older version)",
                         "certify without reuse")
    diff = [k for k in ("seed", "data", "test_images", "model", "model_right") if old_prov.get(k) != provenance.get(k)]
    if diff:
        raise InputError(f"certify reuse '{folder}' certified another {', '.join(diff)} (provenance.json)",
                         "reuse an output of the same models, seed and data, or drop reuse")
    mine = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in REUSE_FREE}
    theirs = CertifyConfig.model_validate(comparable_settings(old_cfg)).model_dump(mode="json")  # shard dropped there
    diff = sorted(k for k in mine if theirs.get(k) != mine[k])
    if diff:
        raise InputError(f"certify reuse '{folder}' was certified with other settings ({', '.join(diff)})",
                         "reuse an output certified with the same sigma, n, n0, alpha, batch size and runtime")
    same_ref = ref_rows is not None and ref_hash is not None and old_prov.get("reference") == ref_hash
    return rows, (ref_rows if same_ref else None)


def certify_rows(smoothed: Smoothed, test: ImageSet, cfg: CertifyConfig, indices: list[int], journal: Path,
                 identity: dict, reused: Optional[list[dict]] = None, show_progress: bool = False,
                 prefix: str = "certify") -> tuple[list[dict], float]:
    """Certify the test images ``indices`` with ``smoothed`` (RS or DRS), several per noise step when
    n0 + n is small against the batch size (each image's result is the same as alone: its noise
    depends only on (seed, index)). On out-of-memory the forward chunk is halved first (the same
    noise), then the batch size. Every finished image is appended to ``journal``; an interrupted run
    resumes from it with the same certificates when its first line is ``identity``. ``reused``: rows
    of an earlier output read back instead of recomputed. Returns the rows, in the order of
    ``indices``, and the seconds they took (the reused ones' own included)."""
    label = journal.stem
    rows = read_journal(journal, identity, indices)
    done = {r["index"] for r in rows}
    if rows:
        log(f"[{prefix}] resumed {len(rows)} of {len(indices)} images ({label}) from an interrupted run")
    wanted = set(indices)
    earlier = [r for r in reused or [] if r["index"] in wanted and r["index"] not in done]
    if reused is not None:
        log(f"[{prefix}] reused {len(earlier)} of {len(indices)} images ({label}) from {cfg.reuse}")
    rows += earlier
    done |= {r["index"] for r in earlier}
    seconds_before = sum(r["seconds"] for r in rows)  # the reused certificates' own time
    journal.write_text("".join(json.dumps(r) + "\n" for r in [identity, *rows]))  # no line cut short
    todo = [i for i in indices if i not in done]
    t_all = time.perf_counter()
    shared = isinstance(smoothed, DualSmoothed) and smoothed.right is smoothed.classifier
    per_image = (cfg.n0 + cfg.n) * (2 if shared else 1)
    size = max(1, smoothed.batch_size // per_image)
    groups = [todo[i:i + size] for i in range(0, len(todo), size)]
    for group in progress(groups, total=len(todo), description=f"certify {label} ({cfg.method}, n={cfg.n})",
                          enabled=show_progress, unit="images", weight=len):
        xs = [test.as_float(test.images[i:i + 1])[0] for i in group]
        while True:
            t0 = time.perf_counter()
            try:
                certs = smoothed.certify_batch(xs, cfg.n0, cfg.n, cfg.alpha, indices=group)
                break
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5 on
                torch.cuda.empty_cache()
                batch = smoothed.batch_size
                chunk = min(smoothed.forward_batch or batch, batch)
                if chunk > MIN_FORWARD_CHUNK:  # the activations are most of the memory; the noise stays the same
                    smoothed.forward_batch = chunk // 2
                    log(f"[{prefix}] out of memory: the model now sees chunks of {chunk // 2} (the same noise)")
                    continue
                if batch == 1:
                    raise
                smoothed.batch_size = batch // 2
                # noise is drawn in chunks of the batch size: smaller chunks give other (equally valid)
                # noise, so this run's figures match a run at the full batch size only within MC error
                log(f"[{prefix}] out of memory: batch size halved to {batch // 2} (other noise draws from here on: "
                    f"for bit-for-bit reproducible shards give every run --batch-size {batch // 2})")
        seconds = (time.perf_counter() - t0) / len(group)
        new = []
        for index, cert in zip(group, certs):
            label_i = int(test.labels[index])
            row = {"index": index, "label": label_i, "prediction": cert.prediction, "radius": cert.radius,
                   "correct": int(cert.prediction == label_i), "seconds": seconds, "p_lower": cert.p_lower,
                   "count": cert.count}
            if cert.p_lower_right is not None:
                row.update(p_lower_right=cert.p_lower_right, count_right=cert.count_right)
            new.append(row)
        with open(journal, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in new))
        rows += new
    order = {index: k for k, index in enumerate(indices)}
    rows.sort(key=lambda r: order[r["index"]])
    return rows, seconds_before + time.perf_counter() - t_all
