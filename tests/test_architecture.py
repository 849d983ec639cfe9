"""The house rules of ARCHITECTURE.md, checked on the source: a method module (everything in a stage
package but its adapter modules, and the shared training loop) imports neither the engine, the
tracking module, the CLI nor the CLI's error type; no stage imports another stage; and
``import deploypipe`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = REPO / "stages"
# the modules that adapt a method to the pipeline or the command line (data wiring, tracking, files)
ADAPTERS = {"stage", "merge", "runner", "classifier", "outputs", "merge_command", "check_command", "commands"}
FORBIDDEN = ("deploypipe.pipeline", "deploypipe.tracking", "deploypipe.cli", "deploypipe.errors", "deploypipe.stage",
             "deploypipe.config", "mlflow", "click")


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ["deploypipe", "stages", path.parent.name] if path.parent.parent == STAGES else ["deploypipe"]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def method_modules() -> list[Path]:
    found = [p for p in STAGES.glob("*/*.py") if p.stem not in ADAPTERS and p.stem != "__init__"]
    return sorted(found) + [REPO / "deploypipe" / f"{m}.py" for m in ("training", "batches", "noise", "onnx_export")]


@pytest.mark.parametrize("path", method_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_methods_import_neither_engine_tracking_cli_nor_its_error_type(path):
    bad = sorted(m for m in imports(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", sorted(STAGES.glob("*/*.py")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_stage_imports_another_stage(path):
    own = f"deploypipe.stages.{path.parent.name}"
    others = sorted(m for m in imports(path) if m.startswith("deploypipe.stages.") and not m.startswith(own))
    assert not others, f"{path.relative_to(REPO)} imports {others}"


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The checks above can fail: a module that imports the engine and another stage is caught."""
    pkg = tmp_path / "stages" / "quantize"
    pkg.mkdir(parents=True)
    bad = pkg / "method.py"
    bad.write_text("from deploypipe.pipeline import Pipeline\nfrom ..train import stage\nfrom .config import X\n")
    global STAGES
    saved, STAGES = STAGES, tmp_path / "stages"
    try:
        found = imports(bad)
    finally:
        STAGES = saved
    assert {"deploypipe.pipeline", "deploypipe.stages.train.stage", "deploypipe.stages.quantize.config"} <= found


def test_import_deploypipe_is_light():
    """The public API imports lazily: ``import deploypipe`` loads neither torch nor mlflow."""
    code = "import sys, deploypipe; print(sorted(m for m in ('torch', 'mlflow', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["stages"], ["stages", "--json"], ["export", "--help"],
                                  ["certify-merge", "--help"], ["check-sparsity", "--help"], ["promote", "--help"]])
def test_help_and_stage_list_import_neither_torch_nor_mlflow(argv):
    """The command line answers --help and `stages` from the stage packages' declarations (STAGE) and
    their pydantic configs: no torch, mlflow or matplotlib (a user's first command takes ~0.3 s, not 4)."""
    code = ("import sys\nfrom deploypipe.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'mlflow', 'matplotlib', 'onnx') if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr[-500:]
    assert "Usage" in out.stdout or "option" in out.stdout or "{" in out.stdout


def test_every_stage_declares_what_it_registers():
    """Each stage package's STAGE declaration (what the CLI shows without importing the stage) names
    the config class its run function takes, and the registry takes its help and headline from it."""
    from deploypipe.stage import load_stages
    from deploypipe.stage_index import load, stage_index

    index, registry = stage_index(), load_stages()
    packages = {p.parent.name for p in STAGES.glob("*/stage.py")}
    assert set(index) == packages and packages <= set(registry)
    for name, info in index.items():
        assert registry[name].config is load(info.config), name
        assert (registry[name].help, registry[name].headline) == (info.help, info.headline), name
        for ref in info.commands:
            assert load(ref).name, ref
        if info.options:
            options, intercept = load(info.options)
            assert all(o.name for o in options) and callable(intercept)


def test_package_lines_are_at_most_120_characters():
    long = [f"{p.relative_to(REPO)}:{i}" for root in ("deploypipe", "stages", "kernels") for p in (REPO / root).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, f"{len(long)} lines over 120 characters, e.g. {long[:5]}"
