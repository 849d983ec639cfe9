"""The base classifier in ONNX Runtime: the export agrees with PyTorch (logits within 1e-4 on noisy
inputs), a model the exporter cannot handle or whose export disagrees stays in PyTorch with the reason,
and certify gives the same certificates in either runtime."""

import csv

import pytest
import torch
from torch import nn

from conftest import last_json, run_cli, run_main
from deploypipe.stages.certify.runtime import to_onnxruntime
from deploypipe.zoo import digits_cnn


def _probe(shape=(1, 8, 8), n=64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *shape, generator=g) + 0.25 * torch.randn(n, *shape, generator=g)


def test_onnxruntime_agrees_with_pytorch():
    torch.manual_seed(0)
    model = digits_cnn().eval()
    session, why = to_onnxruntime(model, (1, 8, 8), _probe())
    assert session is not None, why
    x = _probe(n=300)
    with torch.no_grad():
        assert torch.allclose(session(x), model(x), atol=1e-4)
        assert torch.equal(session(x).argmax(1), model(x).argmax(1))


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.linalg.svdvals(x[:, 0]))  # no ONNX symbolic for this op


def test_models_that_cannot_run_in_onnxruntime_stay_in_pytorch(capsys):
    session, why = to_onnxruntime(Unexportable().eval(), (1, 8, 8), _probe())
    assert session is None and "failed" in why and "svdvals" in why
    assert capsys.readouterr().out == ""  # stdout stays clean for --json
    session, why = to_onnxruntime(digits_cnn().eval(), (1, 8, 8), _probe(), max_logit_diff=-1.0)  # force a mismatch
    assert session is None and "differ" in why


@pytest.mark.usefixtures("cli_store")
def test_certify_in_either_runtime_gives_the_same_certificates(tmp_path):
    common = ["certify", "--model", "zoo:digits_cnn", "--n0", "20", "--n", "300", "--alpha", "0.01",
              "--num-images", "6", "--sigma", "0.1"]
    runs = {}
    for runtime in ("torch", "onnxruntime"):
        res = run_cli(*common, "--runtime", runtime, "--out", runtime, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        runs[runtime] = list(csv.DictReader(open(tmp_path / runtime / "certify" / "certify.csv")))
    assert "ONNX Runtime agrees" in res.stderr
    for a, b in zip(runs["torch"], runs["onnxruntime"]):
        assert a["prediction"] == b["prediction"]
        assert abs(int(a["count"]) - int(b["count"])) <= 1  # a noisy copy on a float tie may vote otherwise
        assert float(a["radius"]) == pytest.approx(float(b["radius"]), abs=0.01)
    # bfloat16 autocast certifies the reduced-precision classifier and says how close it is to float32
    res = run_cli(*common, "--autocast", "--out", "bf16", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "under autocast (torch.bfloat16) the top-1 agrees with float32" in res.stderr
    metrics = last_json(res.stdout)["stages"][0]["metrics"]
    assert 0.9 <= metrics["autocast_top1_agreement"] <= 1.0 and metrics["onnxruntime"] == 0.0
    bf16 = list(csv.DictReader(open(tmp_path / "bf16" / "certify" / "certify.csv")))
    assert sum(a["prediction"] == b["prediction"] for a, b in zip(runs["torch"], bf16)) >= 5
    code, _, err = run_main(*common, "--runtime", "onnxruntime", "--autocast", "--out", "bad", cwd=tmp_path)
    assert code == 2 and "autocast is PyTorch's" in err and not (tmp_path / "bad" / "certify").exists()


def test_an_onnx_files_digest_covers_its_external_weights(tmp_path):
    import onnx

    from deploypipe.stages.certify.runtime import OnnxClassifier, onnx_file_digest

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    torch.onnx.export(model, (torch.rand(2, 1, 8, 8),), tmp_path / "tmp.onnx", opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "batch"}})
    proto = onnx.load(str(tmp_path / "tmp.onnx"))
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.weights", size_threshold=0)
    x = _probe()
    want = OnnxClassifier(str(tmp_path / "m.onnx"))(x)
    torch.testing.assert_close(want, model(x), atol=1e-5, rtol=1e-5)
    before = onnx_file_digest(tmp_path / "m.onnx")
    assert OnnxClassifier(str(tmp_path / "m.onnx")).digest == before == onnx_file_digest(tmp_path / "m.onnx")
    weights = bytearray((tmp_path / "m.weights").read_bytes())  # other weights, the same graph file
    weights[:4] = bytes(4)
    (tmp_path / "m.weights").write_bytes(bytes(weights))
    assert not torch.equal(OnnxClassifier(str(tmp_path / "m.onnx"))(x), want)
    assert onnx_file_digest(tmp_path / "m.onnx") != before
