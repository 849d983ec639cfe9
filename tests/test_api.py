"""The public Python API (``import deploypipe``) on models and data the pipeline never sees: a
dict-input encoder, plain tensor iterables; the same model from the API and the CLI; the docstring
examples; the notebook example with a Hugging Face encoder."""

from __future__ import annotations

import doctest
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import deploypipe as dp
from deploypipe.smoothing import certify, certify_drs, image_generator

REPO = Path(__file__).resolve().parent.parent


class DictEncoder(nn.Module):
    """Token ids + attention mask -> per-token hidden states, like a Hugging Face encoder's call."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(2 * dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = self.out(torch.relu(self.proj(self.embed(input_ids))))
        return {"last_hidden_state": h * attention_mask.unsqueeze(-1)}


def _token_batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (8, 6), generator=g)
        mask = torch.ones(8, 6, dtype=torch.long)
        mask[:, 4:] = (torch.rand(8, 2, generator=g) > 0.5).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_quantize_a_dict_input_encoder_and_export_it():
    """Keyword batches go to the model as keyword arguments; the quantized Linear layers carry the
    asked bits; the output is close to FP32's and the ONNX file (two named inputs, dynamic batch and
    sequence) computes what PyTorch computes on batches of another shape."""
    torch.manual_seed(0)
    fp = DictEncoder().eval()
    q, report = dp.quantize(fp, _token_batches(6, 1), dp.QuantizeConfig(weight_bits=8, act_bits=8, method="rtn"))
    assert {n: (p["w_bits"], p["a_bits"]) for n, p in report.plan.items()} == {"proj": (8, 8), "out": (8, 8)}
    assert report.transform["tensor_quant"] == [] and report.transform["input_shape"] is None
    test = _token_batches(2, 2)
    with torch.no_grad():
        for b in test:
            a, b_ = fp(**b)["last_hidden_state"], q(**b)["last_hidden_state"]
            assert nn.functional.cosine_similarity(a.flatten(1), b_.flatten(1)).min() > 0.99
            assert not torch.equal(a, b_)  # it is quantized
    import tempfile

    path = dp.export_onnx(q, test[0], Path(tempfile.mkdtemp()) / "enc.onnx")
    import onnx

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert {n.op_type for n in graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    wider = [{k: torch.cat([v, v[:, :3]], 1)[:5] for k, v in b.items()} for b in test]  # 5 x 9 tokens
    parity = dp.onnx_parity(q, path, wider)
    assert parity["onnx_exact_cosine"] > 0.9999 and parity["onnx_exact_max_abs_diff"] < 1e-4


def test_quantize_takes_a_plain_tensor_iterable_and_a_bare_tensor_alike():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    data = torch.randn(96, 12)
    cfg = dp.QuantizeConfig(weight_bits=4, act_bits=8, method="adaquant", iters=30, calib_batch_size=32)
    q1, r1 = dp.quantize(net, data, cfg, seed=5)
    q2, r2 = dp.quantize(net, list(data.split(32)), cfg, seed=5)  # the same batches, given as a list
    q3, _ = dp.quantize(net, iter(data.split(32)), cfg, seed=5)  # a one-shot iterator is read once
    for q in (q2, q3):
        for (k, v), w in zip(q1.state_dict().items(), q.state_dict().values()):
            assert torch.equal(v, w), k
    assert r1.plan["2"]["w_bits"] == 4 and r1.plan["0"]["w_bits"] == 8 and r1.plan["4"]["w_bits"] == 8
    assert [row["layer"] for row in r1.adaquant] == ["0", "2", "4"]
    with pytest.raises(ValueError, match="no layer matches"):
        dp.quantize(net, data, dp.QuantizeConfig(include=["nothing*"]))


def test_api_and_cli_give_the_same_quantized_model(tmp_path, cli_store):
    """``deploypipe quantize`` on a saved model and ``deploypipe.quantize`` on the same model, data
    and seed: the same weights and scales, bit for bit."""
    from conftest import last_json, run_cli, run_main
    from deploypipe.config import DataSpec
    from deploypipe.data import load_data

    res = run_cli("train", "--model", "zoo:digits_cnn", "--epochs", "2", "--lr", "0.05", "--limit-train", "400",
                  "--out", "t", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    trained = tmp_path / last_json(res.stdout)["stages"][0]["model"]
    flags = {"weight-bits": "4", "act-bits": "8", "iters": "40", "calib-size": "128", "calib-batch-size": "64"}
    code, out, err = run_main("quantize", "--model", str(trained), "--no-export-onnx", "--seed", "3", "--out", "q",
                              "--json", *[x for k, v in flags.items() for x in (f"--{k}", v)], cwd=tmp_path)
    assert code == 0, err[-2000:]
    cli_model = dp.load_model(tmp_path / last_json(out)["stages"][0]["model"])
    data = load_data(DataSpec(source="digits", calib_size=128))
    cfg = dp.QuantizeConfig(weight_bits=4, act_bits=8, iters=40, calib_batch_size=64, export_onnx=False)
    api_model, _ = dp.quantize(dp.load_model(trained), list(data.calib.batches(64)), cfg, seed=3)
    cli_state, api_state = cli_model.state_dict(), api_model.state_dict()
    assert cli_state.keys() == api_state.keys()
    for k, v in api_state.items():
        assert torch.equal(cli_state[k], v), k


def test_smoothed_is_the_certify_function_with_one_noise_stream_per_image():
    """``Smoothed.certify`` on image i draws the noise ``certify`` draws with image_generator(seed, i);
    without an index each call takes the next one; DualSmoothed equals certify_drs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    xs = torch.rand(3, 2, 4, 4)
    smoothed = dp.Smoothed(net, num_classes=3, sigma=0.3, seed=7, batch_size=256)
    auto = [smoothed.certify(x, n0=20, n=300, alpha=0.01) for x in xs]
    want = [certify(net, x, 0.3, 20, 300, 0.01, 3, 256, image_generator(7, i, "cpu")) for i, x in enumerate(xs)]
    assert auto == want
    assert smoothed.certify(xs[2], n0=20, n=300, alpha=0.01, index=2) == want[2]
    assert smoothed.certify_batch(xs, n0=20, n=300, alpha=0.01, indices=[0, 1, 2]) == want
    cert = want[0]
    if cert.prediction != dp.ABSTAIN:
        assert cert.radius == pytest.approx(0.3 * float(torch.special.ndtri(torch.tensor(cert.p_lower))))
    side = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 2, 3)).eval()
    drs = dp.DualSmoothed(side, num_classes=3, sigma=0.2, seed=7, batch_size=256)
    assert drs.certify(xs[0], n0=20, n=300, alpha=0.01, index=4) == certify_drs(
        side, side, xs[0], 0.2, 20, 300, 0.01, 3, 256, image_generator(7, 4, "cpu"))
    with pytest.raises(ValueError, match="even image width"):
        drs.certify(torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        dp.Smoothed(net, 3, 0.0)


def test_smoothed_predict_abstains_on_a_coin_and_answers_a_sure_classifier():
    class Coin(nn.Module):  # class 0 or 1 by the sign of the first pixel's noise: a fair coin
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0] - 0.5, 0.5 - x[:, 0, 0, 0]], 1)

    class Sure(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0]]).repeat(len(x), 1)

    x = torch.full((1, 2, 2), 0.5)
    assert dp.Smoothed(Coin(), 2, 0.5).predict(x, n=2000, alpha=0.001) == dp.ABSTAIN
    assert dp.Smoothed(Sure(), 2, 0.5).predict(x, n=100) == 1


def test_sparsify_a_dict_batch_model_from_a_list_of_batches():
    """Labels ride in the dict under ``labels`` and are not passed to the model."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mid, self.head = nn.Embedding(20, 16), nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, input_ids):
            return self.head(torch.relu(self.mid(self.embed(input_ids)))).mean(1)

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 20, (16, 5), generator=g), "labels": torch.randint(0, 4, (16,), generator=g)}
               for _ in range(4)]
    torch.manual_seed(0)
    model, report = dp.sparsify(Tagger(), batches, dp.SparsifyConfig(pattern="1:4", epochs=2, lr=0.01,
                                                                     keep_first_last=False))
    assert report.layers == {"mid": "1:4", "head": "1:4"}
    for name in report.layers:
        w = model.get_submodule(name).weight
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 1).all()
    assert len(report.history) == 2 and report.trace and report.metrics["sparse_layer_sparsity"] == pytest.approx(0.75)


@pytest.mark.parametrize("module", ["deploypipe.stages.quantize.ptq", "deploypipe.stages.sparsify.nm_training",
                                    "deploypipe.smoothing", "deploypipe.onnx_export",
                                    "deploypipe.stages.quantize.bit_allocation", "deploypipe.models"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
def test_notebook_example_quantizes_a_transformers_encoder(tmp_path):
    """examples/notebook_quantize.py: a BERT encoder from a transformers config, W8A8 and W4A8, its
    sentence embeddings against FP32's, and the W8A8 ONNX file in ONNX Runtime."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "examples"))
    try:
        notebook = importlib.import_module("notebook_quantize")
    finally:
        sys.path.remove(str(REPO / "examples"))
    got = notebook.main(tmp_path, iters=60)
    assert got["W8A8_cosine"] > 0.999 and 0.95 < got["W4A8_cosine"] < got["W8A8_cosine"] < 1
    assert got["W4A8_size_fraction_of_fp32"] < got["W8A8_size_fraction_of_fp32"] < 1
    assert got["onnx_cosine"] > 0.9999 and got["onnx_exact_cosine"] > 0.99999 and math.isfinite(got["onnx_max_abs_diff"])
    assert (tmp_path / "encoder_w8a8.onnx").is_file()
