"""What operators do to a run: SIGTERM (schedulers, timeout, Kubernetes) takes the Ctrl-C path, and a
run killed outright (SIGKILL) leaves MLflow runs RUNNING that the next run of the folder ends; bad
images and empty class folders are named in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import run_main


def _start_training(tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, "-m", "deploypipe.cli", "train", "--model", "zoo:digits_cnn",
                             "--epochs", "300", "--batch-size", "32", "--out", "t"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epoch(tmp_path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    """Until the first epoch's checkpoint exists (the stage is well under way)."""
    deadline = time.time() + seconds  # a hang guard, not a speed check
    while not (tmp_path / "t" / ".work" / "train" / "checkpoint.pt").is_file():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the training never wrote its first checkpoint"
        time.sleep(0.2)


def _runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_sigterm_ends_the_runs_killed_and_exits_143(tmp_path, cli_store):
    proc = _start_training(tmp_path)
    _wait_for_epoch(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[train]")]
    assert proc.returncode == 143 and lines == ["terminated by SIGTERM (finished stages are kept; rerun to resume)"]
    assert sorted(r.info.status for r in _runs(tmp_path)) == ["KILLED", "KILLED"]  # pipeline and stage
    assert not list((tmp_path / "t").glob(".train.partial-*"))  # no half-written output
    assert (tmp_path / "t" / ".work" / "train" / "checkpoint.pt").is_file()  # the finished epochs are kept


def test_a_rerun_ends_the_runs_a_sigkill_left_running(tmp_path, cli_store):
    proc = _start_training(tmp_path)
    _wait_for_epoch(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert sorted(r.info.status for r in _runs(tmp_path)) == ["RUNNING", "RUNNING"]
    code, _, err = run_main("evaluate", "--model", "zoo:digits_cnn", "--limit-test", "20", "--out", "t",
                            cwd=tmp_path)  # the same output folder
    assert code == 0, err
    assert "marked 2 MLflow runs" in err and "KILLED" in err
    statuses = sorted(r.info.status for r in _runs(tmp_path))
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "KILLED"]


def test_a_corrupt_image_and_an_empty_class_folder_are_named(tmp_path, cli_store):
    from PIL import Image

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "train" / cls / f"{i}.png")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, _, err = run_main("evaluate", "--model", "zoo:resnet20", "--data", f"imagefolder:{root}", cwd=tmp_path,
                            env={"DEPLOYPIPE_CACHE": str(tmp_path / "cache")})
    assert code == 2 and "broken.jpg" in err and "cannot be decoded" in err and len(err.strip().splitlines()) == 1
    (root / "train" / "cat" / "broken.jpg").unlink()
    (root / "train" / "bird").mkdir()
    code, _, err = run_main("evaluate", "--model", "zoo:resnet20", "--data", f"imagefolder:{root}", cwd=tmp_path,
                            env={"DEPLOYPIPE_CACHE": str(tmp_path / "cache")})
    assert code == 2 and "class folders without images: bird" in err
    code, _, err = run_main("certify", "--model", "zoo:digits_cnn", "--n0", "500", "--n", "100", cwd=tmp_path)
    assert code == 2 and "n0 500 is larger than n 100" in err
    assert not (tmp_path / "runs" / "evaluate").exists() and not (tmp_path / "runs" / "certify").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_the_cli_leaves_the_callers_sigterm_handler_in_place(signum):
    before = signal.getsignal(signum)
    run_main("stages", "--json")
    assert signal.getsignal(signum) is before
