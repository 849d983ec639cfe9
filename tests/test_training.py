"""The shared training loop under torchrun: two gloo ranks train the model one process trains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _torchrun(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_gloo_ranks_train_the_model_one_process_trains(tmp_path):
    """The same global batch of 64 (the last one 45: 23 + 22 images) split over two ranks, with
    Gaussian noise and augmentation drawn for the global batch: after two epochs the weights equal
    the single-process run's up to float summation order."""
    from ddp_worker import train

    res = _torchrun(str(HERE / "ddp_worker.py"), str(tmp_path / "ddp.pt"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = train().state_dict()
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
    moved = sum(float((v - torch.nn.Linear(64, 32).state_dict().get(k.split(".", 1)[1], v)).abs().sum())
                for k, v in single.items() if k.startswith("1."))
    assert moved > 0  # the comparison is of trained weights


def test_torchrun_train_logs_once_and_writes_one_folder(tmp_path, cli_store):
    """``torchrun --nproc-per-node 2 -m deploypipe train``: rank 0 alone writes the stage's folder and
    the MLflow runs (one pipeline run, one train child, FINISHED); the epoch lines appear once."""
    from mlflow import MlflowClient

    res = _torchrun("-m", "deploypipe.cli", "train", "--model", "zoo:digits_cnn", "--epochs", "2",
                    "--batch-size", "64", "--lr", "0.05", "--limit-train", "300", "--limit-test", "100", "--out",
                    "ddp", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("epoch 2/2") == 1 and res.stderr.count("pipeline report:") == 1  # rank 0 alone
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if not p.name.startswith(".")) == \
        ["pipeline.yaml", "report.csv", "report.md", "report.png", "train"]
    assert (tmp_path / "ddp" / "train" / "model" / "weights.pt").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    kinds = sorted((r.data.tags["deploypipe.kind"], r.info.status) for r in runs)
    assert kinds == [("pipeline", "FINISHED"), ("stage", "FINISHED")]
    pipeline = next(r for r in runs if r.data.tags["deploypipe.kind"] == "pipeline")
    assert pipeline.data.tags["deploypipe.ddp_ranks"] == "2"
