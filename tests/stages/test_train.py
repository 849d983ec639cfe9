"""Train stage: schedules against torch's own, learning on digits, resume equals uninterrupted."""

import math

import pytest
import torch

from deploypipe.config import DataSpec
from deploypipe.data import diagonal_split, load_data
from deploypipe.evaluation import top1_and_loss
from deploypipe.zoo import digits_cnn
from deploypipe.noise import noise_generator
from deploypipe.stages.train.stage import DrsSides
from deploypipe.training import Callback, GaussianNoise, Trainer, TrainOptions, lr_factor, make_optimizer


class _Recorder(torch.nn.Module):
    """A linear classifier that records every input batch it sees."""

    def __init__(self, features: int, seen: list):
        super().__init__()
        self.lin, self.seen = torch.nn.Linear(features, 10), seen

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def test_onecycle_matches_torch_onecyclelr():
    """Our one-cycle shape equals torch.optim.lr_scheduler.OneCycleLR (cos, two phases)."""
    total, peak = 200, 0.3
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=total, pct_start=0.3,
                                              anneal_strategy="cos", div_factor=25, final_div_factor=1e4,
                                              cycle_momentum=False)
    ours = []
    for step in range(total):
        ours.append(peak * lr_factor(step, total, "onecycle", 0))
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-9
    assert ours[0] == pytest.approx(peak / 25) and max(ours) == pytest.approx(peak, rel=1e-6)
    assert ours[-1] < peak / 1000


def test_cosine_with_warmup_closed_form():
    total, warm = 100, 10
    for s in range(total):
        expected = (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert lr_factor(s, total, "cosine", warm) == pytest.approx(expected)


def test_no_weight_decay_on_biases_and_norms():
    m = digits_cnn()
    opt = make_optimizer(m, "sgd", 0.1, 5e-4)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in m.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name


class _StopAfter(Callback):
    """Interrupts training once ``epochs`` epochs are finished (their checkpoint is written first)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch(self, row):
        if row["epoch"] == self.epochs:
            raise KeyboardInterrupt


def _train(epochs, checkpoint=None, stop_after=None):
    torch.manual_seed(0)
    data = load_data(DataSpec(source="digits", limit_train=800, limit_test=300))
    model = digits_cnn()
    options = TrainOptions(epochs=epochs, batch_size=64, lr=0.05, augment=data.augment, seed=1000)
    callbacks = [_StopAfter(stop_after)] if stop_after else []
    trainer = Trainer(model, options, "cpu", callbacks, checkpoint=checkpoint)
    try:
        trainer.fit(data.train)
    except KeyboardInterrupt:
        return None, data
    return model, data


def test_training_learns_digits():
    model, data = _train(6)
    top1, loss = top1_and_loss(model, data.test)
    assert top1 > 0.85 and loss < 0.6


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    straight, data = _train(3)
    assert _train(3, tmp_path / "ckpt.pt", stop_after=1)[0] is None
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 1
    resumed, _ = _train(3, tmp_path / "ckpt.pt")
    x = next(data.test.batches(64))[0]
    torch.testing.assert_close(straight.eval()(x), resumed.eval()(x), rtol=1e-5, atol=1e-5)
    fresh, _ = _train(3, tmp_path / "other.pt")  # a checkpoint of its own: the same run
    torch.testing.assert_close(straight.eval()(x), fresh.eval()(x), rtol=0, atol=0)


def _zero_lr(m, data, callbacks, batch_size=64):
    opt = TrainOptions(epochs=1, batch_size=batch_size, lr=0.0, schedule="constant", weight_decay=0.0, momentum=0.0)
    return Trainer(m, opt, "cpu", callbacks).fit(data.train)[0]


def test_noise_augmentation_changes_inputs_only_when_asked():
    data = load_data(DataSpec(source="digits", limit_train=64))
    seen = []
    for callbacks in ([], [GaussianNoise(0.5)]):
        _zero_lr(_Recorder(64, seen), data, callbacks)
    clean, noisy = seen
    order = torch.randperm(64, generator=noise_generator(0, "shuffle", 0))
    assert torch.equal(clean, data.train.images[order])
    assert (noisy - clean).std().item() == pytest.approx(0.5, rel=0.1)


def test_noisy_test_accuracy_sees_one_seeded_draw_of_the_noise():
    data = load_data(DataSpec(source="digits", limit_test=300))
    seen = []
    m = _Recorder(64, seen)
    clean = top1_and_loss(m, data.test, batch_size=100)
    assert torch.equal(torch.cat(seen), data.test.as_float(data.test.images))
    seen.clear()
    noisy = top1_and_loss(m, data.test, batch_size=100, noise_sigma=0.5)
    first = torch.cat(seen)
    assert (first - data.test.as_float(data.test.images)).std().item() == pytest.approx(0.5, rel=0.05)
    seen.clear()
    assert top1_and_loss(m, data.test, batch_size=37, noise_sigma=0.5) == pytest.approx(noisy)  # the same draw
    assert torch.allclose(torch.cat(seen), first) and noisy != clean  # whatever the batch size


def test_a_model_shared_by_both_drs_sides_sees_each_image_as_two_labelled_halves():
    """side 2: every batch is the images' left halves then their right halves (by the index rule of
    the 2x2 diagonal pattern, written out here), each half with its image's label; with the
    consistency regulariser the noisy copies repeat that whole stack."""
    data = load_data(DataSpec(source="digits", limit_train=16))
    seen = []

    def halves(img):  # img (C, H, W): pixel (i, j) goes left when i + j is even
        h, w = img.shape[-2:]
        left = [[img[:, i, j] for j in range(w) if (i + j) % 2 == 0] for i in range(h)]
        right = [[img[:, i, j] for j in range(w) if (i + j) % 2 == 1] for i in range(h)]
        return (torch.stack([torch.stack(r, -1) for r in left], -2),
                torch.stack([torch.stack(r, -1) for r in right], -2))

    order = torch.randperm(16, generator=noise_generator(0, "shuffle", 0))
    images, labels = data.train.images[order], data.train.labels[order]
    want = torch.cat([torch.stack([halves(im)[0] for im in images]), torch.stack([halves(im)[1] for im in images])])
    for callbacks, copies in (([DrsSides(2)], 1), ([DrsSides(2), GaussianNoise(0.0, consistency=5.0, copies=3)], 3)):
        seen.clear()
        m = _Recorder(32, seen)
        stats = _zero_lr(m, data, callbacks, batch_size=16)
        assert torch.equal(seen[0], want.repeat(copies, 1, 1, 1))
        # the reported top-1 counts 32 labelled halves: the labels went in twice, in the same order
        with torch.no_grad():
            logits = m.lin(want.flatten(1))
        assert stats["train_top1"] == pytest.approx((logits.argmax(1) == torch.cat([labels, labels])).float().mean().item())


def test_grid_fill_puts_the_half_back_in_place_and_fills_the_rest_with_neighbour_means():
    """For both sides, against loops over the 2x2 diagonal pattern's index rule: a pixel of the side
    (left: i + j even) is itself, any other pixel the mean of its in-image up/down/left/right
    neighbours (all of which are the side's); in float64, so the comparison is exact up to rounding."""
    from deploypipe.stages.train.side_input import GridFill, grid_fill

    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    for side, half in enumerate(diagonal_split(x)):
        full = grid_fill(half, side)
        assert full.shape == x.shape
        for i in range(6):
            for j in range(8):
                if (i + j) % 2 == side:
                    want = x[..., i, j]
                else:
                    nbrs = [(a, b) for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)) if 0 <= a < 6 and 0 <= b < 8]
                    assert all((a + b) % 2 == side for a, b in nbrs)
                    want = sum(x[..., a, b] for a, b in nbrs) / len(nbrs)
                assert torch.allclose(full[..., i, j], want, rtol=0, atol=1e-12)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 8, 4).double())
    right = diagonal_split(x)[1]
    assert torch.equal(GridFill(net, 1)(right), net(grid_fill(right, 1)))


def test_consistency_loss_against_the_formula_by_hand():
    """Jeong & Shin (2020): mean CE over copies + lambda * mean KL(p_mean || p_i) + eta * H(p_mean),
    written out with explicit loops in float64."""
    import math

    from deploypipe.training import consistency_loss

    torch.manual_seed(0)
    m, b, k = 3, 4, 5
    logits = torch.randn(m * b, k, dtype=torch.float64)
    y = torch.randint(0, k, (b,))
    got = consistency_loss(logits, y, m, 7.0, 0.3)
    p = [[torch.softmax(logits[i * b + j], 0).tolist() for j in range(b)] for i in range(m)]
    ce = -sum(math.log(p[i][j][int(y[j])]) for i in range(m) for j in range(b)) / (m * b)
    kl = ent = 0.0
    for j in range(b):
        mean = [sum(p[i][j][c] for i in range(m)) / m for c in range(k)]
        kl += sum(sum(mean[c] * (math.log(mean[c]) - math.log(p[i][j][c])) for c in range(k)) for i in range(m)) / m
        ent += -sum(mc * math.log(mc) for mc in mean)
    assert float(got) == pytest.approx(ce + 7.0 * kl / b + 0.3 * ent / b, rel=1e-6)


@pytest.mark.usefixtures("cli_store")
def test_drs_sides_train_on_half_images_and_certify_together(tmp_path):
    """Two side models (left with the consistency regulariser, right seeing its half filled back into
    the full grid) on the diagonal halves of the digits, then DRS certification with both; the side
    models record their half-width input."""
    import json

    from conftest import last_json, run_cli, run_main

    models = {}
    for side, extra in (("left", ["--consistency", "5"]), ("right", ["--drs-input", "full"])):
        res = run_cli("train", "--model", "zoo:digits_cnn", "--epochs", "6", "--lr", "0.05", "--noise-sigma", "0.18",
                      "--drs-side", side, *extra, "--out", side, "--json", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        out = last_json(res.stdout)["stages"][0]
        assert out["metrics"]["test_top1"] > 0.6  # half of an 8x8 digit under noise is still readable
        assert 0.3 < out["metrics"]["test_top1_noisy"] <= 1.0  # and under one draw of the noise
        models[side] = out["model"]
        record = json.load(open(tmp_path / models[side] / "model.json"))
        assert record["input_shape"] == [1, 8, 4]  # both take half-images; the right one fills the grid
        assert record["transforms"] == ([] if side == "left" else [
            {"kind": "drs_grid_fill", "module": "deploypipe.stages.train.side_input", "params": {"side": "right"}}])
    res = run_cli("certify", "--model", models["left"], "--model-right", models["right"], "--method", "drs",
                  "--sigma", "0.18", "--n0", "20", "--n", "300", "--alpha", "0.01", "--num-images", "10",
                  "--runtime", "onnxruntime", "--out", "drs", "--json", cwd=tmp_path)  # both sides export
    assert res.returncode == 0, res.stderr[-2000:]
    m = last_json(res.stdout)["stages"][0]["metrics"]
    from conftest import assert_sound_certificates

    rows = assert_sound_certificates(tmp_path / "drs" / "certify" / "certify.csv", 0.18, 300, 0.01, "drs")
    assert len(rows) == 10 and m["certified_acc_r0"] >= 0.5
    code, _, err = run_main("train", "--model", "zoo:digits_cnn", "--consistency", "5", "--out", "bad", cwd=tmp_path)
    assert code == 2 and "noise_sigma" in err and not (tmp_path / "bad").exists()
    code, _, err = run_main("train", "--model", models["right"], "--noise-sigma", "0.18", "--drs-side", "left",
                            "--out", "wrong-side", cwd=tmp_path)  # a full-grid model stays on its side
    assert code == 2 and "right DRS side model" in err and "--drs-side right" in err
    for side in ([], ["--drs-side", "both"]):  # the fill is one side's
        code, _, err = run_main("train", "--model", "zoo:digits_cnn", *side, "--drs-input", "full", "--out", "bad", cwd=tmp_path)
        assert code == 2 and "drs_side left or right" in err and not (tmp_path / "bad").exists()
