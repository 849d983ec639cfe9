"""The sparsify stage from the command line: MDGF at 1:8 and SDGF through its schedule on the digits
CNN, the pattern checked on the output, the tables, plot and compressed weights in MLflow, and a run
on the Triton kernels (interpreter on CPU)."""

from __future__ import annotations

import csv

import pytest
import torch
from mlflow import MlflowClient

from conftest import last_json, run_cli
from deploypipe.kernels.nm_compress import nm_decompress, unpack_positions
from deploypipe.models import load_model, read_record
from deploypipe.stages.sparsify.patterns import from_reduction_view

QUICK = ["--model", "zoo:digits_cnn", "--data", "digits", "--limit-test", "150", "--batch-size", "64", "--lr", "0.1", "--json"]


def _artifacts(client, run_id, path=None):
    return {a.path for a in client.list_artifacts(run_id, path)}


@pytest.mark.slow
def test_mdgf_1_of_8_from_the_cli(tmp_path, workdir):
    res = run_cli("sparsify", *QUICK, "--pattern", "1:8", "--recipe", "mdgf", "--epochs", "4", "--from-scratch",
                  "--workdir", str(workdir), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    stage = last_json(res.stdout)["stages"][0]
    m = stage["metrics"]
    assert m["sparse_layers"] == 2 and m["sparse_layer_sparsity"] == 0.875
    assert m["test_top1"] > 0.8  # learns from scratch at 1:8 in four short epochs (chance: 0.1)
    assert m["compressed_bits_per_weight_fp16"] == pytest.approx((16 + 3) / 8)
    out = tmp_path / "out" / "sparsify"
    rows = list(csv.DictReader(open(out / "epochs.csv")))
    alphas = [float(r["alpha"]) for r in rows]
    assert alphas[0] < 1.0 and alphas[-1] == 0.0 and [r["phase"] for r in rows][-1] == "finetune"
    recorded = read_record(out / "model").transforms[-1]
    assert recorded["kind"] == "sparsify" and list(recorded["params"]["layers"].values()) == ["1:8", "1:8"]
    check = run_cli("check-sparsity", str(out / "model"), "--json")
    assert check.returncode == 0 and all(r["ok"] and r["pattern"] == "1:8" for r in last_json(check.stdout)["layers"])
    # the compressed file decompresses to exactly the model's weights
    model = load_model(out / "model")
    packed = torch.load(out / "compressed_weights.pt", weights_only=True)
    for name, entry in packed.items():
        positions = unpack_positions(entry["positions"], 8, entry["count"]).reshape(entry["values"].shape)
        dense = nm_decompress(entry["values"], positions, 1, 8)
        assert torch.equal(from_reduction_view(dense, torch.Size(entry["shape"])), model.get_submodule(name).weight)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert {"model", "layers.csv", "epochs.csv", "sparsity.png", "compressed_weights.pt"} <= _artifacts(client, stage["run_id"])
    run = client.get_run(stage["run_id"])
    assert run.data.params["recipe"] == "mdgf" and run.data.params["pattern"] == "1:8"
    assert len(client.get_metric_history(stage["run_id"], "alpha")) == 4


@pytest.mark.slow
def test_sdgf_schedule_and_the_triton_kernels(tmp_path, workdir):
    res = run_cli("sparsify", *QUICK, "--limit-train", "256", "--pattern", "1:4", "--recipe", "sdgf", "--schedule", "3:4,2:4,1:4", "--epochs", "4",
                  "--sparse-fraction", "0.75", "--kernels", "triton", "--workdir", str(workdir),
                  "--out", str(tmp_path / "out"), cwd=tmp_path, env={"TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "sparsify" / "epochs.csv")))
    assert [r["pattern"] for r in rows] == ["3:4", "2:4", "1:4", "1:4"]
    assert [r["phase"] for r in rows] == ["sparse", "sparse", "sparse", "finetune"]
    assert last_json(res.stdout)["stages"][0]["metrics"]["sparse_layer_sparsity"] == 0.75
