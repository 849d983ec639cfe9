"""The real command line, end to end, as a user runs it: demo into a fresh store and read back
with MlflowClient, the HTTP path against a real `mlflow server`, a user's model, and `--json`."""

import json
import shutil
import textwrap

import pytest
import torch
from mlflow import MlflowClient

from conftest import last_json, pipeline_file, run_cli, run_main
from deploypipe.models import load_model


def check_runs(client: MlflowClient, run_id: str, stages: list[str]):
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["deploypipe.kind"] == "pipeline"
    for tag in ("deploypipe.version", "torch.version", "mlflow.version"):
        assert tag in parent.data.tags
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    by_id = {r.data.tags["deploypipe.stage_id"]: r for r in children}
    assert sorted(by_id) == sorted(stages)
    for sid, run in by_id.items():
        assert run.info.status == "FINISHED", sid
        assert run.data.params, sid  # the flattened config
        assert "stage_seconds" in run.data.metrics
    return by_id


def artifact_names(client, run_id, path=None):
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_demo_end_to_end_into_a_fresh_store(tmp_path):
    res = run_cli("demo", "--workdir", "store", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert [s["status"] for s in summary["stages"]] == ["ran"] * 6
    train, sparsify, quantize, evaluate, certify, export = summary["stages"]
    assert train["metrics"]["test_top1"] > 0.9  # digits CNN, 15 epochs
    assert sparsify["metrics"]["dense_top1"] == pytest.approx(train["metrics"]["test_top1"])
    assert sparsify["metrics"]["test_top1"] >= train["metrics"]["test_top1"] - 0.02  # 2:4 SR-STE fine-tune
    assert sparsify["metrics"]["sparse_layer_sparsity"] == 0.5 and sparsify["metrics"]["sparse_layers"] == 2
    assert quantize["metrics"]["fp_top1"] == pytest.approx(sparsify["metrics"]["test_top1"])
    assert quantize["metrics"]["test_top1"] >= train["metrics"]["test_top1"] - 0.03  # 2:4 + W4A4 AdaQuant
    assert quantize["metrics"]["sparse_pattern_kept"] == 1.0
    out = tmp_path / "store" / "demo"
    for shipped in (out / "quantize" / "model", out / "quantize" / "model.onnx"):  # the pattern survives quantization
        code, stdout, stderr = run_main("check-sparsity", str(shipped), "--pattern", "2:4", "--json")  # in-process:
        assert code == 0, stdout + stderr  # a read-only check, no process start each (covered as a process elsewhere)
        assert len(last_json(stdout)["layers"]) == 2
    assert run_main("check-sparsity", str(out / "train" / "model"), "--pattern", "2:4")[0] == 1  # dense
    assert evaluate["metrics"]["test_top1"] == pytest.approx(quantize["metrics"]["test_top1"])  # it got the quantized model
    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    runs = check_runs(client, summary["run_id"], ["train", "sparsify", "quantize", "evaluate", "certify", "export"])
    assert {"model", "layers.csv", "epochs.csv", "sparsity.png", "compressed_weights.pt"} <= \
        artifact_names(client, runs["sparsify"].info.run_id)
    parent = client.get_run(summary["run_id"])
    assert parent.data.params["model.spec"] == "zoo:digits_cnn" and parent.data.params["data.source"] == "digits"
    assert "pipeline.yaml" in artifact_names(client, summary["run_id"])
    t = runs["train"]
    assert t.data.params["epochs"] == "15" and t.data.params["optimizer"] == "sgd"
    assert len(client.get_metric_history(t.info.run_id, "train_loss")) == 15  # per-epoch curve
    assert {"model", "epochs.csv", "training_curves.png", "result.json"} <= artifact_names(client, t.info.run_id)
    assert {"model/model.json", "model/weights.pt"} <= artifact_names(client, t.info.run_id, "model")
    ev = runs["evaluate"]
    assert {"per_class.csv", "confusion.png", "config.yaml"} <= artifact_names(client, ev.info.run_id)
    # evaluate makes no model; it names the checkpoint it measured (the quantized one), which resolves in MLflow
    qrun = runs["quantize"]
    assert {"model", "layers.csv", "layer_mse.png", "model.onnx"} <= artifact_names(client, qrun.info.run_id)
    assert quantize["metrics"]["onnx_top1_agreement"] >= 0.99
    assert ev.data.tags["deploypipe.input_model_uri"] == f"runs:/{qrun.info.run_id}/model"
    # certify smoothed the quantized model too (the one that ships), with its CSV and plot in MLflow
    crun = runs["certify"]
    assert crun.data.tags["deploypipe.input_model_uri"] == f"runs:/{qrun.info.run_id}/model"
    assert {"certify.csv", "certified_accuracy.png"} <= artifact_names(client, crun.info.run_id)
    assert certify["metrics"]["certified_acc_r0"] >= 0.8 and certify["metrics"]["acr"] > 0
    # export: the quantized model as a clean Q/DQ file, its certified accuracy in the model card
    assert export["metrics"]["trt_lint_findings"] == 0 and export["metrics"]["onnx_top1_agreement"] >= 0.99
    assert export["metrics"]["shipped_acr"] == pytest.approx(certify["metrics"]["acr"])
    assert "bundle/model_card.md" in artifact_names(client, runs["export"].info.run_id, "bundle")
    # the pipeline report: one row per artifact, its figures the stages' own, logged to the parent run
    import csv as _csv

    rows = {r["artifact"]: r for r in _csv.DictReader(open(out / "report.csv"))}
    assert list(rows) == ["train", "sparsify", "quantize", "export (ONNX)"]
    for name, stage in (("train", train), ("sparsify", sparsify), ("quantize", quantize), ("export (ONNX)", export)):
        assert float(rows[name]["top1"]) == pytest.approx(stage["metrics"]["test_top1"])
    for key in ("certified_acc_r0.25", "certified_acc_r0.5", "acr"):  # certify received the quantized model
        assert float(rows["quantize"][key]) == pytest.approx(certify["metrics"][key])
        assert float(rows["export (ONNX)"][key]) == pytest.approx(export["metrics"][f"shipped_{key}"])
    assert float(rows["quantize"]["bytes"]) == pytest.approx(evaluate["metrics"]["size_bytes"])  # one size definition
    assert float(rows["export (ONNX)"]["file_bytes"]) == pytest.approx(export["metrics"]["onnx_bytes"])
    assert float(rows["sparsify"]["gbops"]) == pytest.approx(float(rows["train"]["gbops"]) / 2, rel=0.05)  # 2:4 convs
    assert not rows["train"]["certified_acc_r0.25"] and "| quantize |" in (out / "report.md").read_text()
    assert {"report.md", "report.png", "report.csv"} <= artifact_names(client, summary["run_id"])
    # artifacts live next to the store, not in ./mlruns; outputs in <workdir>/<pipeline>/<stage>
    assert (tmp_path / "store" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert (tmp_path / "store" / "demo" / "train" / "model" / "model.json").is_file() and not (tmp_path / "runs").exists()
    # the FP32 size by hand: conv weights 1*16*9 + 16*32*9 + 32*64*9, fc 64*10 + 10; after BN folding
    # each conv has a bias (16 + 32 + 64); the Normalize buffers (mean, std: one channel) count too
    assert quantize["metrics"]["fp32_bytes"] == 4 * (16 * 9 + 16 * 32 * 9 + 32 * 64 * 9 + 650 + 112 + 2)
    assert quantize["metrics"]["quantized_bytes"] == evaluate["metrics"]["size_bytes"]  # one size definition
    assert 0 < evaluate["metrics"]["latency_ms_median"] <= evaluate["metrics"]["latency_ms_p90"]
    # the model logged to MLflow reloads without pickle and gives the reported accuracy
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(artifact_uri=ev.data.tags["deploypipe.input_model_uri"],
                                                dst_path=str(tmp_path / "dl"),
                                                tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    model = load_model(local)
    from deploypipe.config import DataSpec
    from deploypipe.data import load_data
    from deploypipe.evaluation import top1_and_loss

    data = load_data(DataSpec(source="digits", calib_size=256))
    assert top1_and_loss(model, data.test)[0] == pytest.approx(evaluate["metrics"]["test_top1"])

    again = run_cli("demo", "--workdir", "store", "--json", cwd=tmp_path)
    assert again.returncode == 0 and [s["status"] for s in last_json(again.stdout)["stages"]] == ["skipped"] * 6


def test_http_tracking_against_a_real_server(tmp_path, mlflow_server):
    # the server comes from MLFLOW_TRACKING_URI, as a team setup would export it
    res = run_cli("run", str(pipeline_file(tmp_path)), "--workdir", "runs", "--json", cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    client = MlflowClient(mlflow_server)
    runs = check_runs(client, summary["run_id"], ["train", "evaluate"])
    assert {"model/model.json", "model/weights.pt"} <= artifact_names(client, runs["train"].info.run_id, "model")
    assert "training_curves.png" in artifact_names(client, runs["train"].info.run_id)
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing went to the local store


@pytest.mark.usefixtures("cli_store")
def test_user_model_factory_and_checkpoint_through_evaluate(tmp_path):
    (tmp_path / "my_cifar_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def small_net(num_classes=10, width=8):
            return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes))
    """))
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        import my_cifar_models
        torch.manual_seed(0)
        net = my_cifar_models.small_net().eval()
        torch.save(net.state_dict(), tmp_path / "weights.pt")
    finally:
        sys.path.remove(str(tmp_path))
    res = run_cli("evaluate", "--model", "my_cifar_models:small_net", "--checkpoint", "weights.pt",
                  "--mean", "0.3", "--std", "0.4", "--data", "digits", "--latency-repeats", "2", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    m = last_json(res.stdout)["stages"][0]["metrics"]
    from deploypipe.config import DataSpec
    from deploypipe.data import load_data

    test = load_data(DataSpec(source="digits")).test
    with torch.no_grad():
        pred = net((test.images - 0.3) / 0.4).argmax(1)
    assert m["test_top1"] == pytest.approx((pred == test.labels).float().mean().item())
    assert m["parameters"] == sum(p.numel() for p in net.parameters())


def test_stages_and_help():
    res = run_cli("stages", "--json")
    assert res.returncode == 0
    stages = json.loads(res.stdout)
    assert {"train", "evaluate"} <= set(stages)
    assert "noise_sigma" in {o["name"] for o in stages["train"]["options"]}
    types_ = {o["name"]: o["type"] for o in stages["quantize"]["options"]}  # types a user reads, not "Optional"
    assert types_["act_bits"] == "int | null" and types_["method"] == "rtn | adaquant"
    assert types_["bit_candidates"] == "list[int] | null" and types_["weight_bits"] == "int"
    assert {"train", "quantize", "sparsify", "certify", "export"} <= set(stages)
    res = run_cli("--help")
    assert res.returncode == 0 and "Example" in res.stdout
    for args in (["train", "--help"], ["run", "--help"], ["evaluate", "--help"], ["ui", "--help"],
                 ["stages", "--help"], ["demo", "--help"]):
        code, out, _ = run_main(*args)  # the same entry point, in this process
        assert code == 0 and "Example" in out, args
    assert shutil.which("deploypipe"), "the console script is installed"


@pytest.mark.usefixtures("cli_store")
def test_stage_crash_exits_1_and_keeps_earlier_outputs(tmp_path):
    """A model that fails only in training mode: evaluate (eval mode) finishes, train crashes."""
    (tmp_path / "fragile_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        class Fragile(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)
            def forward(self, x):
                if self.training:
                    raise RuntimeError("this model cannot be trained")
                return self.fc(x.flatten(1))
        def make():
            return Fragile()
    """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""
        name: fragile
        model: fragile_models:make
        data: digits
        stages:
          - evaluate: {latency_repeats: 2}
          - train: {epochs: 1}
    """))
    res = run_cli("run", "p.yaml", "--workdir", "runs", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "stage 'train' failed" in err[0] and "cannot be trained" in err[0]
    assert (tmp_path / "runs" / "fragile" / "evaluate" / "result.json").is_file()
    assert not (tmp_path / "runs" / "fragile" / "train").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("deploypipe").experiment_id])
    status = {r.data.tags.get("deploypipe.stage_id", "pipeline"): r.info.status for r in runs}
    assert status == {"pipeline": "FAILED", "evaluate": "FINISHED", "train": "FAILED"}
