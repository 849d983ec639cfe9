"""Shared fixtures: a migrated MLflow sqlite store copied per test, a real `mlflow server`, and
helpers to run the real CLI (in a subprocess, as a user would)."""

from __future__ import annotations

import json
import os

# Triton kernels run in Triton's interpreter on CPU tensors (tests/kernels); it must be set before triton
# is first imported. On a GPU machine, run with TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
# `python -m pytest` from the checkout puts its root on sys.path, where the top-level folders stages/ and
# kernels/ would shadow installed packages of those names (transformers imports the PyPI `kernels`);
# deploypipe itself is imported through its installed package mapping, as a user's code imports it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An MLflow sqlite database with its migrations done (~2 s), made once per session."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path, migrated_db) -> Path:
    """A fresh work directory whose default store is a copy of the migrated database."""
    wd = tmp_path / "runs"
    wd.mkdir()
    shutil.copy(migrated_db, wd / "mlflow.db")
    return wd


@pytest.fixture
def cli_store(tmp_path, migrated_db) -> Path:
    """``tmp_path`` with the CLI's default store (``runs/mlflow.db``) already migrated, so a CLI run there
    skips MLflow's table creation (~2 s, paid once per work directory;
    test_demo_end_to_end_into_a_fresh_store covers a fresh store)."""
    (tmp_path / "runs").mkdir()
    shutil.copy(migrated_db, tmp_path / "runs" / "mlflow.db")
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, migrated_db):
    """A real `mlflow server` subprocess on 127.0.0.1 (HTTP tracking + proxied artifacts)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(migrated_db, root / "mlflow.db")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(uri, proc)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"mlflow server did not come up: {(root / 'server.log').read_text()[-2000:]}") from None
    yield uri
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def wait_for_health(base: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    """Poll an MLflow server's /health until it answers (the process must stay alive)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server process exited with {proc.returncode}")
        try:
            if requests.get(base + "/health", timeout=1).ok:
                return
        except requests.RequestException:
            time.sleep(0.3)
    raise RuntimeError(f"{base} did not answer /health in {seconds:.0f} s")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed `deploypipe` command as a user would."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # tests pick their store
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "deploypipe.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(*args: str, cwd: Path | None = None, env: dict | None = None) -> tuple[int, str, str]:
    """The CLI's own entry point (``deploypipe.cli.main``) in this process: exit code, stdout, stderr.
    For help texts and refusals that stop before any stage runs, without a process start each (~4 s).
    The environment is the one `run_cli` gives (no MLFLOW_TRACKING_URI, plus ``env``), restored after."""
    import contextlib
    import io

    from deploypipe.cli import main

    out, err, code, before, saved = io.StringIO(), io.StringIO(), 0, os.getcwd(), dict(os.environ)
    try:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exit_:
                code = exit_.code or 0
    finally:
        os.chdir(before)
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def pipeline_file(tmp_path, epochs=2):
    p = tmp_path / "quick.yaml"
    p.write_text(textwrap.dedent(f"""
        name: quick
        model: zoo:digits_cnn
        data: {{source: digits, limit_train: 300, limit_test: 100}}
        stages:
          - train: {{epochs: {epochs}, batch_size: 64, lr: 0.05}}
          - evaluate: {{latency_repeats: 2}}
    """))
    return p


def assert_sound_certificates(csv_path, sigma: float, n: int, alpha: float, method: str = "rs") -> list[dict]:
    """Recompute every row of a certify.csv from its vote counts with SciPy — the one-sided
    Clopper-Pearson bound at alpha (RS) or alpha / 2 per side (DRS), and the radius sigma Phi^-1(p) or
    sigma (a + b) / sqrt(2) — and check no radius exceeds what n votes can certify at all."""
    import csv
    import math

    from scipy import stats

    rows = list(csv.DictReader(open(csv_path)))
    level = alpha if method == "rs" else alpha / 2
    largest = sigma * stats.norm.ppf(level ** (1 / n)) * (1 if method == "rs" else math.sqrt(2))

    def bound(k: int) -> float:
        return float(stats.beta.ppf(level, k, n - k + 1)) if k > 0 else 0.0

    for r in rows:
        radius, prediction = float(r["radius"]), int(r["prediction"])
        p = bound(int(r["count"]))
        assert abs(float(r["p_lower"]) - p) < 1e-9, (r, p)
        if method == "rs":
            want = sigma * stats.norm.ppf(p) if p > 0.5 else 0.0
        else:
            q = bound(int(r["count_right"]))
            assert abs(float(r["p_lower_right"]) - q) < 1e-9, (r, q)
            a = stats.norm.ppf(p) if p > 0 else -math.inf
            b = stats.norm.ppf(q) if q > 0 else -math.inf
            want = sigma * (a + b) / math.sqrt(2) if a + b > 0 else 0.0
        assert abs(radius - want) < 1e-7, (r, want)
        assert (prediction == -1) == (want == 0.0), r
        assert radius <= largest + 1e-9, (radius, largest)
    return rows
