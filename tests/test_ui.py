"""`deploypipe ui` serves a work directory's store: the UI's own endpoints list the pipeline run,
its children and their artifacts (the PNG plots included). And the team launch script parses."""

import os
import subprocess
import sys
import time

import pytest
import requests

from conftest import REPO, free_port, last_json, pipeline_file, run_cli


@pytest.mark.usefixtures("cli_store")
def test_ui_serves_runs_and_artifacts(tmp_path):
    res = run_cli("run", str(pipeline_file(tmp_path)), "--workdir", "runs", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = last_json(res.stdout)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deploypipe.cli", "ui", "--workdir", "runs", "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        seen = []
        for line in proc.stdout:  # the "ready" line comes only once the server answers
            seen.append(line.decode())
            if "MLflow UI ready" in seen[-1]:
                break
        assert "MLflow UI ready" in seen[-1], "".join(seen)[-2000:]
        assert requests.get(base + "/", timeout=10).ok  # the UI page itself, right after the ready line
        exps = requests.get(base + "/ajax-api/2.0/mlflow/experiments/search", params={"max_results": 100}, timeout=10).json()
        exp_ids = [e["experiment_id"] for e in exps["experiments"]]
        runs = requests.post(base + "/ajax-api/2.0/mlflow/runs/search", json={"experiment_ids": exp_ids}, timeout=10).json()["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        children = [rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == summary["run_id"]]
        assert sorted(tags[c]["deploypipe.stage_id"] for c in children) == ["evaluate", "train"]
        train = next(c for c in children if tags[c]["deploypipe.stage_id"] == "train")
        listed = requests.get(base + "/ajax-api/2.0/mlflow/artifacts/list", params={"run_id": train}, timeout=10).json()
        assert {"training_curves.png", "epochs.csv", "model", "config.yaml"} <= {f["path"] for f in listed["files"]}
        png = requests.get(base + "/get-artifact", params={"path": "training_curves.png", "run_uuid": train}, timeout=10)
        assert png.ok and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        # SIGTERM to the ui process alone stops the server it started (uvicorn and its workers), port freed
        proc.send_signal(15)
        assert proc.wait(60) == 143
        for _ in range(20):  # the workers exit with the group; allow them a moment to close the socket
            try:
                requests.get(base + "/health", timeout=2)
            except requests.ConnectionError:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"{base} still answers after the ui process was terminated")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(20)


def test_team_launch_script_parses_and_dry_runs():
    script = REPO / "mlflow" / "launch.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-enough-password", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}
    res = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "a-long-enough-password" not in res.stdout + res.stderr  # the password is masked
    assert "--app-name basic-auth" in res.stdout and "127.0.0.1" in res.stdout
    short = subprocess.run(["bash", str(script), "--dry-run"], env={**env, "MLFLOW_AUTH_ADMIN_PASSWORD": "short"},
                           capture_output=True, text=True, timeout=60)
    assert short.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in short.stderr


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("192.168.1.7", True), ("127.0.0.1", False),
                                          ("localhost", False), ("::1", False)])
def test_ui_on_a_non_loopback_address_warns_that_it_has_no_logins(tmp_path, host, warned):
    # an empty work directory: the command stops at the missing store, after the warning (no server started)
    res = subprocess.run([sys.executable, "-m", "deploypipe", "ui", "--workdir", str(tmp_path), "--host", host],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no MLflow store" in res.stderr
    assert ("no authentication" in res.stderr) is warned, res.stderr
