"""What operators do to a run: SIGTERM (schedulers, timeout, Kubernetes) takes the Ctrl-C path, and a
run killed outright (SIGKILL) leaves MLflow runs RUNNING that the next run of the folder ends; bad
images and empty class folders are named in one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
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


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written in, root included: a read-only tmpfs mount (or, for a user
    other than root, a folder without write permission)."""
    made = []

    def make(name: str, files: dict[str, bytes] = {}) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for rel, data in files.items():
            (folder / rel).write_bytes(data)
        if os.geteuid() != 0:
            folder.chmod(0o555)
            return folder
        staged = tmp_path / f"{name}-content"
        shutil.copytree(folder, staged)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(folder)]).returncode:
            pytest.skip("root, but cannot mount a tmpfs to make a read-only folder")
        made.append(folder)
        shutil.copytree(staged, folder, dirs_exist_ok=True)
        assert subprocess.run(["mount", "-o", "remount,ro", str(folder)]).returncode == 0
        return folder

    yield make
    for folder in made:
        subprocess.run(["umount", "--lazy", str(folder)])  # lazily: this process may still hold the store open


def test_read_only_folders_are_named_in_one_line(tmp_path, read_only, cli_store):
    from PIL import Image

    store = tmp_path / "store"
    store.mkdir()
    MlflowClient(f"sqlite:///{store / 'mlflow.db'}").search_experiments()  # a migrated store, then frozen
    frozen_store = read_only("frozen-store", {"mlflow.db": (store / "mlflow.db").read_bytes()})
    code, _, err = run_main("evaluate", "--model", "zoo:digits_cnn", "--limit-test", "20", "--tracking-uri",
                            f"sqlite:///{frozen_store / 'mlflow.db'}", cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"sqlite tracking store {frozen_store} is not writable" in err and "fix:" in err

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "train" / cls / f"{i}.png")
    cache = read_only("cache")
    code, _, err = run_main("evaluate", "--model", "zoo:resnet20", "--data", f"imagefolder:{root}", "--out", "e",
                            cwd=tmp_path, env={"DEPLOYPIPE_CACHE": str(cache)})
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write the decoded-image cache in {cache}" in err and "DEPLOYPIPE_CACHE" in err
    assert not (tmp_path / "e" / "evaluate").exists()

    out = read_only("out")
    code, _, err = run_main("evaluate", "--model", "zoo:digits_cnn", "--limit-test", "20", "--workdir", str(out),
                            cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--workdir" in err, err


def test_a_damaged_image_cache_is_decoded_again(tmp_path, cli_store):
    from PIL import Image

    from deploypipe.config import DataSpec
    from deploypipe.data import cache_dir, load_data

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 30 * i + (cls == "dog"), np.uint8)).save(root / "train" / cls / f"{i}.png")
    os.environ["DEPLOYPIPE_CACHE"] = str(tmp_path / "cache")
    try:
        first = load_data(DataSpec(source=f"imagefolder:{root}"))
        (cached,) = cache_dir().glob("imagefolder-*.npz")
        cached.write_bytes(cached.read_bytes()[:100])  # truncated, as by a full disk or a killed copy
        again = load_data(DataSpec(source=f"imagefolder:{root}"))
    finally:
        del os.environ["DEPLOYPIPE_CACHE"]
    for a, b in ((first.train, again.train), (first.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert cached.stat().st_size > 1000  # written again, whole


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_the_cli_leaves_the_callers_sigterm_handler_in_place(signum):
    before = signal.getsignal(signum)
    run_main("stages", "--json")
    assert signal.getsignal(signum) is before


def _server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "a")
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)


def test_a_tracking_server_that_dies_mid_run_costs_one_line_and_the_rerun_picks_up(tmp_path, migrated_db):
    """The server is killed while a training stage runs: the CLI stops at the next MLflow call with one
    line (no traceback, no minutes of retries), the epoch checkpoints stay, and the rerun against the
    restarted server resumes from them and marks the abandoned runs KILLED."""
    from conftest import free_port, wait_for_health

    root = tmp_path / "server"
    root.mkdir()
    shutil.copy(migrated_db, root / "mlflow.db")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _server(root, port)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [sys.executable, "-m", "deploypipe.cli", "train", "--model", "zoo:digits_cnn", "--epochs", "300",
            "--batch-size", "32", "--out", "t", "--tracking-uri", uri]
    try:
        wait_for_health(uri, server)
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_epoch(tmp_path, proc)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
        killed_at = time.time()
        _, err = proc.communicate(timeout=600)  # a hang guard
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error")]
        assert proc.returncode == 1, err[-3000:]
        assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
        assert errors[0].startswith(f"error: tracking server {uri} unreachable") and "rerun to upload" in errors[0]
        print(f"exit {time.time() - killed_at:.1f} s after the server died")
        assert (tmp_path / "t" / ".work" / "train" / "checkpoint.pt").is_file()  # the finished epochs are kept
        assert not (tmp_path / "t" / "train").exists()  # no half-written stage folder
        server = _server(root, port)
        wait_for_health(uri, server)
        again = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(again.stderr), daemon=True)
        reader.start()
        deadline = time.time() + 300  # a hang guard
        while not any("resuming from the checkpoint of epoch" in line for line in seen):
            assert again.poll() is None and time.time() < deadline, "".join(seen)[-3000:]
            time.sleep(0.2)
        again.send_signal(signal.SIGTERM)
        again.wait(120)
        reader.join(30)
        assert any("marked 2 MLflow runs" in line for line in seen), "".join(seen)[-3000:]
        runs = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
        assert sorted(r.info.status for r in runs) == ["KILLED"] * 4  # the abandoned pair and the SIGTERMed one
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_four_processes_create_one_new_sqlite_store_together(tmp_path):
    """Four runs from four work folders into one new sqlite store and a new experiment: MLflow's table
    creation and the experiment creation are serialised by a lock beside the store; all four finish."""
    store = tmp_path / "shared"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-m", "deploypipe.cli", "evaluate", "--model", "zoo:digits_cnn",
                               "--workdir", f"w{i}", "--tracking-uri", uri, "--experiment", "together",
                               "--limit-test", "64"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=600)  # a hang guard
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "together"]
    assert len(client.search_runs([exp.experiment_id])) == 8  # four pipeline runs, four stage runs
