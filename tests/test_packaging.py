"""The built wheel holds every subpackage under deploypipe (stages/ and kernels/ mapped in), the
demo pipeline as package data, and no top-level `stages`, `kernels` or `mlflow` of ours."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def source_packages() -> set[str]:
    pkgs = set()
    for top, name in (("deploypipe", "deploypipe"), ("stages", "deploypipe.stages"), ("kernels", "deploypipe.kernels")):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top)
            pkgs.add(".".join([name, *rel.parts]))
    return pkgs


def source_only(folder: str, names: list[str]) -> set[str]:
    """What the wheel test leaves behind when it copies the checkout: hidden folders (.git, the README's
    .venv: several GB of torch), any other virtual environment, and what runs and builds leave."""
    made = shutil.ignore_patterns("runs", "build", "dist", "*.egg-info", "__pycache__", "mlruns", "mlartifacts")
    return set(made(folder, names)) | {n for n in names if n.startswith(".")
                                       or (Path(folder, n) / "pyvenv.cfg").exists()}


def test_wheel_contains_every_subpackage(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=source_only)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("deploypipe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = source_packages()
    assert {"deploypipe.stages.train", "deploypipe.stages.evaluate", "deploypipe.kernels"} <= expected
    for pkg in expected:
        assert pkg.replace(".", "/") + "/__init__.py" in names, f"{pkg} missing from the wheel"
    assert "deploypipe/examples/demo.yaml" in names
    tops = {n.split("/")[0] for n in names if not n.startswith("deploypipe-")}
    assert tops == {"deploypipe"}, tops  # no top-level stages/, kernels/ or mlflow/
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "deploypipe = deploypipe.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_mlflow_folder_is_not_a_package():
    assert (REPO / "mlflow").is_dir() and not (REPO / "mlflow" / "__init__.py").exists()
    import mlflow

    assert Path(mlflow.__file__).parent != REPO / "mlflow"
