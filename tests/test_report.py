"""The pipeline report: bit operations against their closed form, and `deploypipe report` on a pipeline
folder whose figures it must copy from the stages' own result.json and measure on the saved models."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from conftest import run_main
from deploypipe.evaluation import bit_operations, parameter_count, storage_bytes
from deploypipe.models import ModelRecord, build_model, load_model, save_model


def test_bit_operations_closed_form():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    conv, fc = 8 * 6 * 6 * (3 * 9), 8 * 6 * 6 * 10  # MACs per image: outputs x reduction size
    assert bit_operations(net, (3, 6, 6)) == pytest.approx((conv + fc) * 32 * 32)
    with torch.no_grad():
        net[3].weight.view(10, -1, 4)[:, :, 2:] = 0  # 2:4 pattern: half the multiplications
    assert bit_operations(net, (3, 6, 6)) == pytest.approx((conv + fc / 2) * 32 * 32)
    from deploypipe.stages.quantize.ptq import quantize
    from deploypipe.stages.quantize.config import QuantizeConfig

    q, _ = quantize(net, torch.rand(16, 3, 6, 6), QuantizeConfig(weight_bits=4, act_bits=8, first_last_bits=None,
                                                                  method="rtn", export_onnx=False))
    assert bit_operations(q, (3, 6, 6)) == pytest.approx((conv + fc / 2) * 4 * 8)


def _stage(folder, name, metrics, model=None, record=None, extra=None):
    folder.mkdir(parents=True)
    if model is not None:
        save_model(model, record, folder / "model")
    (folder / "result.json").write_text(json.dumps({"stage": name, "id": folder.name, "metrics": metrics,
                                                    "model": model is not None, **(extra or {})}))


def test_report_copies_the_stages_figures_and_measures_the_models(tmp_path):
    record = ModelRecord(factory="zoo:digits_cnn", input_shape=[1, 8, 8], num_classes=10)
    torch.manual_seed(0)
    base = build_model(record)
    save_model(base, record, tmp_path / "input_model")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "pipeline.yaml").write_text(
        f"name: toy\nmodel:\n  spec: {tmp_path / 'input_model'}\ndata: digits\nstages:\n"
        "- id: train\n  train: {epochs: 1}\n- id: certify\n  certify: {sigma: 0.25}\n"
        "- id: export\n  export: {}\n")
    torch.manual_seed(1)
    trained = build_model(record)
    _stage(pipe / "train", "train", {"test_top1": 0.91}, trained, record)
    certified = {"certified_acc_r0.25": 0.5, "certified_acc_r0.5": 0.25, "acr": 0.31, "images": 40.0}
    _stage(pipe / "certify", "certify", certified)
    _stage(pipe / "export", "export", {"test_top1": 0.905, "onnx_bytes": 12345.0, "onnxruntime_ms_b1": 0.2,
                                       "shipped_acr": 0.3, "shipped_certified_acc_r0.25": 0.45})
    code, stdout, stderr = run_main("report", str(pipe), "--no-tracking")
    assert code == 0, stderr
    rows = {r["artifact"]: r for r in csv.DictReader(open(pipe / "report.csv"))}
    assert list(rows) == ["input", "train", "export (ONNX)"]
    train = rows["train"]
    assert float(train["top1"]) == 0.91 and float(train["acr"]) == 0.31 and float(train["certified_acc_r0.5"]) == 0.25
    again = load_model(pipe / "train" / "model")
    assert int(train["params"]) == parameter_count(again) and float(train["bytes"]) == storage_bytes(again)
    assert rows["input"]["top1"] == "" and rows["input"]["acr"] == ""  # nobody measured the input: left empty
    ship = rows["export (ONNX)"]
    assert float(ship["file_bytes"]) == 12345 and float(ship["acr"]) == 0.3 and ship["runtime"] == "ONNX Runtime"
    assert ship["bytes"] == train["bytes"] and ship["certified_acc_r0.5"] == ""
    text = (pipe / "report.md").read_text()
    assert "91.00%" in text and "Certified on 40 test images" in text and "90.50% (-0.50 pt)" in text
    assert (pipe / "report.png").stat().st_size > 10_000 and "| train |" in stdout


def test_report_refuses_what_is_not_a_pipeline_folder(tmp_path):
    code, _, stderr = run_main("report", str(tmp_path / "nowhere"))
    assert code == 2 and "no pipeline folder" in stderr and "fix:" in stderr
    code, _, stderr = run_main("report", str(tmp_path))
    assert code == 2 and "no pipeline.yaml" in stderr and len(stderr.strip().splitlines()) == 1
