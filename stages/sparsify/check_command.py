"""``deploypipe check-sparsity``: is a saved model folder or an ONNX file N:M sparse? (The checker and
torch are imported when the command runs, so that ``deploypipe --help`` stays fast.)"""

from __future__ import annotations

from typing import Optional

import click

from deploypipe.errors import InputError

from .nm_pattern import Pattern


@click.command("check-sparsity", help="Check that a saved model folder or an ONNX file is N:M sparse; exit 1 if a "
                                      "layer breaks its pattern.")
@click.argument("path")
@click.option("--pattern", default=None, help="N:M to check (default: the patterns the model records; required for "
                                              "ONNX)")
@click.option("--layers", "layers", multiple=True, default=("*",), show_default=True, help="glob patterns of layer / "
                                                                                           "weight names")
@click.option("--json", "as_json", is_flag=True, help="print the table as JSON")
def check_sparsity(path: str, pattern: Optional[str], layers: tuple[str, ...], as_json: bool) -> None:
    import json

    from .checker import check_path

    try:
        rows = check_path(path, Pattern.parse(pattern) if pattern else None, layers)
    except ValueError as err:
        if not InputError.is_for_user(err):
            raise
        raise InputError.from_error(err, "check-sparsity") from None
    if not rows:
        raise InputError(f"no layer of '{path}' can hold the pattern{' ' + pattern if pattern else ''}",
                         "check --pattern and --layers (reduction sizes must be multiples of M)")
    bad = [r for r in rows if not r["ok"]]
    if as_json:
        click.echo(json.dumps({"ok": not bad, "layers": rows}))
    else:
        for r in rows:
            click.echo(f"{'ok  ' if r['ok'] else 'FAIL'} {r['layer']:<40} {r['shape']:<16} {r['pattern']:<6} "
                       f"zeros {100 * r['sparsity']:5.1f}%  groups breaking it {r['violating_groups']}/{r['groups']}")
        click.echo(f"{len(rows) - len(bad)} of {len(rows)} layers hold their pattern")
    raise SystemExit(1 if bad else 0)
