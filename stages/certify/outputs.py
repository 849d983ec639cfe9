"""Reading a certify output folder back (certify.csv, config.yaml, provenance.json, and
certify_reference.csv when a reference was certified): what ``certify-merge`` combines and what
``certify --reuse`` reads certificates back from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from deploypipe.errors import InputError

from .config import CertifyConfig

FLOATS = ("radius", "seconds", "p_lower", "p_lower_right")


def read_table(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as fh:
            return [{k: (float(v) if k in FLOATS else int(v)) for k, v in r.items()} for r in csv.DictReader(fh)]
    except (ValueError, TypeError) as err:
        raise InputError(f"'{path}' is not a certify table ({err})",
                         "give the folders certify wrote, unedited") from None


def read_output(folder: Path) -> tuple[dict, list[dict], dict, list[dict] | None]:
    table, config = folder / "certify.csv", folder / "config.yaml"
    if not table.is_file() or not config.is_file():
        raise InputError(f"'{folder}' is not a certify output folder (needs certify.csv and config.yaml)",
                         "give the <out>/certify folders the sharded runs wrote")
    try:
        cfg = yaml.safe_load(config.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"'{config}' is not valid YAML ({str(err).splitlines()[0]})",
                         "give the folders certify wrote, unedited") from None
    cfg = cfg.get("certify", cfg) if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict):
        raise InputError(f"'{config}' holds no certify settings", "give the folders certify wrote, unedited")
    try:  # a torchrun rank's shard is in its result, not in its config
        metrics = json.loads((folder / "result.json").read_text()).get("metrics", {})
    except (OSError, ValueError):
        metrics = {}
    if not cfg.get("shard") and "shard_count" in metrics:
        cfg["shard"] = f"{int(metrics['shard_index'])}/{int(metrics['shard_count'])}"
    try:  # each shard's settings are a certify config (a valid shard i/k, radii, ...)
        CertifyConfig.model_validate({**comparable_settings(cfg), "shard": cfg.get("shard")})
    except ValidationError as err:
        e = err.errors()[0]
        raise InputError(f"'{config}' is not a certify config ({'.'.join(map(str, e['loc'])) or 'settings'}: "
                         f"{e['msg']})",
                         "give the folders certify wrote, unedited") from None
    try:  # which seed, data and classifiers the shard certified (absent in outputs of older versions)
        provenance = json.loads((folder / "provenance.json").read_text())
    except (OSError, ValueError):
        provenance = {}
    reference = folder / "certify_reference.csv"
    return cfg, read_table(table), provenance, (read_table(reference) if reference.is_file() else None)


def comparable_settings(config: dict) -> dict:
    """A shard's settings as compared across shards: without the shard itself, the forward chunk
    (which does not change the noise) and the earlier output a shard reused certificates from, and
    with num_images null beside every (configs saved before the two became exclusive held both)."""
    out = {k: v for k, v in config.items() if k not in ("shard", "forward_batch", "reuse")}
    if out.get("every") is not None:
        out["num_images"] = None
    return out
