"""The export stage's command-line extras: ``deploypipe export --check FILE.onnx`` (the TensorRT lint
alone) and ``deploypipe promote``. Light module: what they run is imported when they run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from deploypipe.errors import InputError


def check_file(path: str) -> int:
    """``deploypipe export --check FILE.onnx``: the lint (and TensorRT's parser when installed); the
    exit code: 0 clean, 1 with the offending nodes printed one per line."""
    from .engine import parser_errors, tensorrt_module
    from .trt_lint import lint_onnx

    if not Path(path).is_file():
        raise InputError(f"ONNX file '{path}' does not exist", "give the path of an .onnx file")
    try:
        findings = [str(f) for f in lint_onnx(path)]
    except Exception as err:  # not an ONNX protobuf
        raise InputError(f"'{path}' is not a readable ONNX file ({type(err).__name__})",
                         "give an .onnx file") from None
    try:
        trt, backend = tensorrt_module("auto")
        findings += [f"{backend} parser: {e}" for e in parser_errors(path, trt)]
    except ValueError:
        backend = None
    for line in findings:
        click.echo(line)
    checked = "the TensorRT lint" + (f" and {backend}'s ONNX parser" if backend else " (no TensorRT module installed)")
    click.echo(f"{path}: {'clean' if not findings else f'{len(findings)} problems'} ({checked})")
    return 1 if findings else 0


CHECK = click.Option(["--check"], default=None, metavar="FILE.onnx",
                     help="only check FILE.onnx against TensorRT's quantization rules (exit 0 clean, 1 with the "
                          "offending nodes); no --model needed")


def _intercept(kw: dict) -> Optional[int]:
    return check_file(kw["check"]) if kw.get("check") else None

CHECK_OPTIONS = ([CHECK], _intercept)  # the export command's extra option and what handles it


@click.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="production", show_default=True, help="the alias to move onto VERSION")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="where the default MLflow store lives")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, then "
              "sqlite:///<workdir>/mlflow.db)")
def promote(name: str, version: str, alias: str, workdir: Path, tracking_uri: Optional[str]) -> None:
    """Move an alias of a registered model (e.g. candidate -> production) to a version.

    \b
    Example:
      deploypipe promote resnet20 3 --alias production
    """
    from deploypipe.tracking import check_reachable, default_uri, resolve_uri, set_model_alias

    uri = resolve_uri(tracking_uri, None, workdir)
    if uri == default_uri(workdir) and not (workdir / "mlflow.db").is_file():
        raise InputError(f"no MLflow store at {workdir / 'mlflow.db'}", "give the --workdir of the export run, or "
                         "--tracking-uri")
    check_reachable(uri)
    set_model_alias(uri, name, version, alias)
    click.echo(f"{name} version {version} is now '{alias}' ({uri})")
