"""Distill: the pruning scores against hand computation and per-example autograd, forgetting events on
scripted sequences, the kept sets, the KD loss against its formula and gradient, lambda 0 as plain
training bit for bit, a resumed distill equal to an uninterrupted one, and the stage end to end."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deploypipe as dp
from conftest import last_json, run_main
from deploypipe.config import DataSpec
from deploypipe.data import load_data
from deploypipe.stages.distill.kd import auto_kd_weight, kd_loss
from deploypipe.stages.distill.pruned_kd import reinitialise
from deploypipe.stages.distill.scores import el2n, forgetting_counts, grand, grand_last_layer
from deploypipe.stages.distill.subset import select
from deploypipe.training import Callback, Trainer, TrainOptions


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).eval()


def batches_of(x, y, size=4):
    return lambda: list(zip(x.split(size), y.split(size)))


def test_el2n_is_the_error_vector_norm_averaged_over_models():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    models = [tiny(0), tiny(1)]
    want = torch.zeros(10)
    for m in models:
        for i in range(10):
            p = torch.softmax(m(x[i:i + 1])[0], 0)
            want[i] += math.sqrt(sum((p[c].item() - (1.0 if c == y[i] else 0.0)) ** 2 for c in range(3))) / 2
    torch.testing.assert_close(el2n(models, batches_of(x, y)), want)


def test_grand_is_the_full_parameter_gradient_norm_of_each_example():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 6, generator=g), torch.randint(0, 3, (7,), generator=g)
    model = tiny(2)
    for m in model.modules():  # BatchNorm with non-trivial running statistics (eval mode)
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    want = []
    for i in range(7):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        want.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    torch.testing.assert_close(grand([model], batches_of(x, y, 3)), torch.stack(want).float(), rtol=1e-5, atol=1e-6)
    # the last-layer approximation is exactly the norm of the last Linear's own gradient
    last = model[4]
    approx = []
    for i in range(7):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        approx.append(torch.sqrt(last.weight.grad.pow(2).sum() + last.bias.grad.pow(2).sum()))
    torch.testing.assert_close(grand_last_layer([model], batches_of(x, y, 3)), torch.stack(approx).float(),
                               rtol=1e-5, atol=1e-6)
    assert (grand([model], batches_of(x, y)) >= grand_last_layer([model], batches_of(x, y)) - 1e-6).all()


def test_forgetting_counts_scripted_sequences_and_never_learned_ranks_hardest():
    T, N = True, False
    histories = [[T, N, T, N], [T, T, T], [N, T, T], [T, N, N, T, N], [N, N, N], [N, N, N, N, N]]
    counts = forgetting_counts(histories).tolist()
    assert counts[:4] == [2, 0, 0, 2]
    assert counts[4] == counts[5] == 6  # never learned: more than any example can be forgotten (5 presentations)
    assert max(counts[:4]) < counts[4]


def test_forgetting_scores_of_a_real_run_are_not_all_equal():
    """A training run records every presentation (a copied tracker would leave every count at 0)."""
    data = load_data(DataSpec(source="digits", limit_train=256))
    cfg = dp.DistillConfig(score="forgetting", forgetting_epochs=4, keep=[0.5], epochs=1, lr=0.05, batch_size=32,
                           kd_weight=0, channels_last=False)
    from deploypipe.stages.distill.pruned_kd import score_examples
    from deploypipe.zoo import digits_cnn

    scores = score_examples(digits_cnn(), data.train, cfg, torch.device("cpu"), 0)
    assert len(scores) == 256 and len(set(scores.tolist())) > 2


def test_kept_sets_size_band_and_class_balance():
    labels = torch.tensor([0] * 10 + [1] * 10)
    scores = torch.cat([torch.arange(10.0), 100 + torch.arange(10.0)])  # class 1 is all harder
    hard = select(scores, labels, 0.5, "hardest", balance="off")
    assert hard.indices.tolist() == list(range(10, 20)) and not hard.balanced
    easy = select(scores, labels, 0.3, "easiest", balance="off")
    assert easy.indices.tolist() == [0, 1, 2, 3, 4, 5]
    middle = select(scores, labels, 0.2, "middle", balance="off")
    assert middle.indices.tolist() == [8, 9, 10, 11]
    auto = select(scores, labels, 0.5, "hardest", balance="auto")  # class 0 would keep nothing: balanced
    assert auto.balanced and "classes [0]" in auto.reason and auto.per_class == {0: 5, 1: 5}
    assert auto.indices.tolist() == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]  # the hardest of each class
    rand = select(None, labels, 0.25, balance="off", seed=3)
    assert len(rand.indices) == 5 and rand.indices.tolist() == select(None, labels, 0.25, balance="off",
                                                                       seed=3).indices.tolist()
    assert rand.indices.tolist() != select(None, labels, 0.25, balance="off", seed=4).indices.tolist()
    with pytest.raises(ValueError, match="not a fraction"):
        select(None, labels, 1.5)
    with pytest.raises(ValueError, match="19 scores for 20"):
        select(scores[:19], labels, 0.5)


def test_kd_loss_against_its_formula_its_temperature_scaling_and_gradient():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    for tau, lam in ((1.0, 0.3), (4.0, 0.7), (2.5, 1.0)):
        kl = sum(sum(torch.softmax(t[i] / tau, 0)[c] * (torch.log_softmax(t[i] / tau, 0)[c]
                                                          - torch.log_softmax(s[i] / tau, 0)[c]) for c in range(4))
                 for i in range(5)) / 5
        ce = -sum(torch.log_softmax(s[i], 0)[y[i]] for i in range(5)) / 5
        want = (1 - lam) * ce + lam * tau**2 * kl
        assert float(kd_loss(s, t, y, lam, tau)) == pytest.approx(float(want), rel=1e-6)
    # tau^2 keeps the soft gradient's scale: at large tau the gradient tends to (s - t) / (N K) (Hinton et al.)
    big = 1000.0
    sc = (s - s.mean(1, keepdim=True)).requires_grad_(True)
    tc = t - t.mean(1, keepdim=True)
    kd_loss(sc, tc, None, 1.0, big).backward()
    torch.testing.assert_close(sc.grad, (sc.detach() - tc) / (5 * 4), rtol=1e-2, atol=1e-5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, t, y, 0.6, 3.0).double(), (s,))
    assert auto_kd_weight(0.1) == pytest.approx(0.9) and auto_kd_weight(0.5) == 0.5 and auto_kd_weight(1.0) == 0.1


def test_kd_weight_zero_without_teacher_is_plain_training_bit_for_bit():
    data = load_data(DataSpec(source="digits", limit_train=300))
    cfg = dp.DistillConfig(keep=[0.5], kd_weight=0, epochs=2, lr=0.05, batch_size=32, channels_last=False)
    from deploypipe.zoo import digits_cnn

    torch.manual_seed(0)
    student, report = dp.distill(digits_cnn(), data.train, cfg, augment=data.augment, seed=5)
    torch.manual_seed(0)
    plain = digits_cnn()
    options = TrainOptions(epochs=2, batch_size=32, lr=0.05, augment=data.augment, seed=5)
    Trainer(plain, options).fit(data.train.subset(report.selection.indices))
    for (k, a), b in zip(student.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


class _Stop(Callback):
    """Interrupts after the first epoch, which it makes last at least 0.3 s."""

    def end_of_epoch(self, epoch, model):
        time.sleep(0.3)
        return {}

    def on_epoch(self, row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt


def test_a_resumed_distill_equals_an_uninterrupted_one(tmp_path):
    data = load_data(DataSpec(source="digits", limit_train=300))
    cfg = dp.DistillConfig(keep=[0.6], epochs=3, lr=0.05, batch_size=32, channels_last=False, augment=False)
    from deploypipe.zoo import digits_cnn

    torch.manual_seed(1)
    teacher = digits_cnn().eval()

    def run(checkpoint=None, callbacks=()):
        torch.manual_seed(0)
        return dp.distill(digits_cnn(), data.train, cfg, teacher=teacher, seed=2, checkpoint=checkpoint,
                          callbacks=callbacks)

    straight, _ = run()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ckpt.pt", [_Stop()])
    resumed, report = run(tmp_path / "ckpt.pt")
    # its training time counts the epoch before the interruption (>= 0.3 s) too, not only the resumed ones
    assert report.metrics["train_seconds"] >= sum(h["epoch_seconds"] for h in report.history) >= 0.3
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert not all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                     reinitialise(digits_cnn(), 0).state_dict().values()))


def test_distill_stage_in_a_pipeline_and_its_bad_inputs(tmp_path, cli_store):
    """train -> distill (random 50% with KD, a sweep with and without KD) -> quantize -> certify ->
    export, end to end; the student's figures sit next to the teacher's."""
    (tmp_path / "p.yaml").write_text("""
name: pd
model: zoo:digits_cnn
data: {source: digits, limit_train: 400, limit_test: 100, calib_size: 64}
stages:
  - train: {epochs: 3, batch_size: 64, lr: 0.05}
  - distill: {keep: [0.5, 0.8], compare_without_kd: true, epochs: 3, batch_size: 32, lr: 0.05}
  - quantize: {weight_bits: 8, act_bits: 8, method: rtn}
  - certify: {sigma: 0.12, n0: 10, n: 50, alpha: 0.01, num_images: 4}
  - export: {format: onnx, batch: [1]}
""")
    code, out, err = run_main("run", "p.yaml", "--json", cwd=tmp_path)
    assert code == 0, err[-2000:]
    stages = last_json(out)["stages"]
    train, distill = stages[0]["metrics"], stages[1]["metrics"]
    assert distill["teacher_test_top1"] == pytest.approx(train["test_top1"])
    assert distill["kept_examples"] == 200 and distill["kd_weight"] == 0.5 and distill["train_seconds"] > 0
    assert {"test_top1_keep0.5", "test_top1_keep0.5_nokd", "test_top1_keep0.8", "test_top1_keep0.8_nokd"} <= set(distill)
    folder = tmp_path / stages[1]["dir"]
    assert {"scores.csv", "sweep.csv", "distill.png", "epochs.csv", "training_curves.png"} <= {
        p.name for p in folder.iterdir()}
    import csv

    rows = list(csv.DictReader(open(folder / "scores.csv")))
    assert len(rows) == 400 and sum(int(r["kept"]) for r in rows) == 200
    assert stages[4]["metrics"]["onnx_top1_agreement"] == 1.0
    code, _, err = run_main("distill", "--model", "zoo:digits_cnn", "--keep", "1.5", "--out", "b1", cwd=tmp_path)
    assert code == 2 and "keep [1.5] is not a fraction" in err and not (tmp_path / "b1" / "distill").exists()
    (tmp_path / "five.py").write_text("import torch\n\ndef net(num_classes=10, in_channels=1):\n"
                                      "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))\n"
                                      "\ndef wide(**kw):\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                                      "torch.nn.Linear(3 * 64, 10))\n")
    code, _, err = run_main("distill", "--model", "zoo:digits_cnn", "--teacher", "five:net", "--out", "b2",
                            cwd=tmp_path)
    assert code == 2 and "5" in err and "10 classes" in err and not (tmp_path / "b2" / "distill").exists()
    code, _, err = run_main("distill", "--model", "zoo:digits_cnn", "--student", "five:wide", "--out", "b3",
                            cwd=tmp_path)
    assert code == 2 and "cannot take input images" in err and not (tmp_path / "b3" / "distill").exists()
    import numpy as np

    np.save(tmp_path / "short.npy", np.zeros(10))
    code, _, err = run_main("distill", "--model", "zoo:digits_cnn", "--scores", str(tmp_path / "short.npy"),
                            "--kd-weight", "0", "--out", "b4", cwd=tmp_path)
    assert code == 2 and "holds 10 scores for" in err and not (tmp_path / "b4" / "distill").exists()


def test_distill_on_a_users_dataloader():
    """A map-style dataset of (image, label) in a DataLoader: EL2N scores every example, the kept
    subset trains through a DataLoader of its own, with KD computed on the fly."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 1, 4, 4, generator=g), torch.arange(96) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    torch.manual_seed(0)
    cfg = dp.DistillConfig(score="el2n", score_seeds=1, score_epochs=1, keep=[0.25], epochs=2, lr=0.05,
                           batch_size=16, channels_last=False)
    student, report = dp.distill(net(), loader, cfg, teacher=net().eval())
    assert len(report.scores) == 96 and len(report.selection.indices) == 24
    assert report.kd_weight == pytest.approx(0.75) and len(report.history) == 2
    with pytest.raises(ValueError, match="DataLoader does not give"):
        dp.distill(net(), loader, dp.DistillConfig(score="forgetting"), teacher=net())
