"""Robustness-aware bit allocation: the noisy sensitivity against a direct float64 computation, the
re-solve loop's guarantees on scripted relations, and the whole path with CBC and real certificates."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from deploypipe.noise import gaussian, noise_generator
from deploypipe.stages.quantize.config import QuantizeConfig
from deploypipe.stages.quantize.ptq import quantize
from deploypipe.stages.quantize.robust_allocation import (Constraint, NoFeasibleChoice, Robustness, certify_subset,
                                                          search)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # confident logits: KL deltas well above float32 rounding
    return net.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _direct_delta(net: nn.Module, calib: torch.Tensor, layer: int, bits: int, sigma: float, seed: int,
                  copies: int = 0) -> float:
    """KL(FP || quantized) on the noised calibration images with only ``layer`` at ``bits`` minus the
    same with every layer at 8 bits, from the definition: weights per output channel on the symmetric
    min-max grid, inputs per tensor on the min-max grid of the clean calibration inputs, biases on the
    grid of input scale x weight scale. The layers
    run in float32 as the model does (in float64 a few activations land on the other side of a
    rounding boundary); the KL is taken in float64. ``copies`` > 0: instead of the KL, the drop of the
    vote probability of each image's FP top class (the most FP votes over the copies, ties to the
    lower class) over ``copies`` noisy copies, copy j's noise from the stream "sensitivity-votes-j"."""
    linears = [1, 3, 5]
    w = {i: net[i].weight.detach() for i in linears}
    b = {i: net[i].bias.detach() for i in linears}

    def forward(x, quant=None):
        h, inputs = x.float().flatten(1), {}
        for i in linears:
            inputs[i] = h
            if quant is not None:
                wb, s_in = quant[i]
                qmax = 2 ** (wb - 1) - 1
                sw = w[i].abs().amax(1, keepdim=True) / qmax
                wq = (w[i] / sw).round().clamp(-qmax, qmax) * sw
                hq = (h / s_in).round().clamp(-127, 127) * s_in
                step = s_in * sw[:, 0]  # the bias on the int32 accumulator's grid
                h = hq @ wq.T + (b[i] / step).round() * step
            else:
                h = h @ w[i].T + b[i]
            if i != 5:
                h = h.relu()
        return h, inputs

    _, clean_inputs = forward(calib)
    act_scale = {i: clean_inputs[i].abs().max() / 127 for i in linears}
    noisy = torch.stack([x + gaussian(x.shape, sigma, noise_generator(seed, "sensitivity", k))
                         for k, x in enumerate(calib)])
    fp, _ = forward(noisy)

    def kl(quant):
        q, _ = forward(noisy, quant)
        q, p = q.double(), fp.double().log_softmax(1)
        return float((p.exp() * (p - q.log_softmax(1))).sum(1).mean())

    base = {i: (8, act_scale[i]) for i in linears}
    if copies:
        noisy_copies = [torch.stack([x + gaussian(x.shape, sigma, noise_generator(seed, f"sensitivity-votes-{j}", k))
                                     for k, x in enumerate(calib)]) for j in range(copies)]
        counts = torch.zeros(len(calib), 5)
        for xs in noisy_copies:
            for k, c in enumerate(forward(xs)[0].argmax(1).tolist()):
                counts[k, c] += 1
        top = [max(range(5), key=lambda c: (row[c], -c)) for row in counts.tolist()]  # ties: the lower class

        def vote_probability(quant):
            return sum(int(c == t) for xs in noisy_copies
                       for c, t in zip(forward(xs, quant)[0].argmax(1).tolist(), top)) / (len(calib) * copies)

        return vote_probability(base) - vote_probability({**base, layer: (bits, act_scale[layer])})
    return kl({**base, layer: (bits, act_scale[layer])}) - kl(base)


@pytest.mark.parametrize("sensitivity", ["noisy", "clean"])
def test_noisy_sensitivity_equals_a_direct_computation(sensitivity):
    net, calib = _net(), _images(64, 1)
    cfg = QuantizeConfig(weight_bits=8, act_bits=8, first_last_bits=None, method="rtn", weight_range="minmax",
                         act_range="minmax", residual_bits=None, bit_candidates=[2, 4, 8], budget=0.5,
                         sensitivity=sensitivity, sigma=0.5, export_onnx=False, calib_batch_size=32)
    _, report = quantize(net, calib, cfg, seed=3)
    got = {r["layer"]: r for r in report.bit_allocation}
    for layer in (1, 3, 5):
        for bits in (2, 4):
            direct = _direct_delta(net, calib, layer, bits, 0.5 if sensitivity == "noisy" else 0.0, seed=3)
            assert got[str(layer)][f"dloss_w{bits}"] == pytest.approx(direct, rel=1e-3, abs=1e-6)


def test_vote_sensitivity_is_the_drop_of_the_top_class_vote_probability():
    net, calib = _net(), _images(64, 1)
    cfg = QuantizeConfig(weight_bits=8, act_bits=8, first_last_bits=None, method="rtn", weight_range="minmax",
                         act_range="minmax", residual_bits=None, bit_candidates=[2, 4, 8], budget=0.5,
                         sensitivity="votes", sensitivity_copies=4, sigma=0.5, export_onnx=False, calib_batch_size=32)
    _, report = quantize(net, calib, cfg, seed=3)
    got = {r["layer"]: r for r in report.bit_allocation}
    deltas = []
    for layer in (1, 3, 5):
        for bits in (2, 4):
            direct = _direct_delta(net, calib, layer, bits, 0.5, seed=3, copies=4)
            assert got[str(layer)][f"dloss_w{bits}"] == pytest.approx(direct, abs=1e-9)
            deltas.append(direct)
    assert max(deltas) >= 3 / 256  # 2-bit layers lose votes: the comparison is not between zeros
    with pytest.raises(ValueError, match="sensitivity votes needs the certification noise"):
        QuantizeConfig(bit_candidates=[2, 8], budget=0.5, sensitivity="votes")


def test_noisy_and_clean_sensitivities_differ_and_need_sigma():
    with pytest.raises(ValueError, match="sigma"):
        QuantizeConfig(bit_candidates=[2, 8], budget=0.5, sensitivity="noisy")
    with pytest.raises(ValueError, match="bit_candidates"):
        QuantizeConfig(sensitivity="noisy", sigma=0.25)
    with pytest.raises(ValueError, match="not max_loss"):
        QuantizeConfig(bit_candidates=[2, 8], max_loss=0.1, sigma=0.25, max_acr_loss=0.05)
    with pytest.raises(ValueError, match="R:A"):
        QuantizeConfig(bit_candidates=[2, 8], budget=0.5, sigma=0.25, min_certified_accuracy="0.25")


def _rob(acr: float, n: int = 10) -> Robustness:
    return Robustness((True,) * n, (acr,) * n)


@pytest.mark.parametrize("trial", range(40))
def test_the_search_terminates_and_never_returns_a_violating_choice(trial):
    """Scripted relations, monotone or not: the program's choice at budget v is a step function of v,
    its ACR any function of the choice. Whatever the relation, the search certifies at most
    max_rounds models and returns the smallest one that holds (or none)."""
    rng = random.Random(trial)
    steps = sorted(rng.sample(range(5, 100), 8))
    acr_of = {s: rng.uniform(0.2, 0.6) if rng.random() < 0.3 else 0.2 + 0.4 * s / 100 for s in steps}
    acr_of[steps[-1]] = max(acr_of.values()) if trial % 4 else acr_of[steps[-1]]
    reference = _rob(0.6)
    limit = rng.uniform(0.01, 0.3)
    constraint = Constraint("acr", limit, 0.0, reference)
    certified = []

    def solve(v):
        s = max([s for s in steps if s <= 100 * v + 1e-9], default=steps[0])
        return {"layer": s}, s / 100

    def certify(choice):
        certified.append(choice["layer"])
        return _rob(acr_of[choice["layer"]])

    max_rounds = rng.randint(1, 6)
    try:
        chosen, rounds = search(solve, certify, constraint, steps[0] / 100, 1.0, max_rounds)
    except NoFeasibleChoice as err:
        assert 0.6 - acr_of[steps[-1]] > limit and err.args[0] == pytest.approx(0.6 - acr_of[steps[-1]] - limit)
        return
    assert len(rounds) == len(certified) <= max_rounds and len(set(certified)) == len(certified)
    if chosen is not None:
        assert 0.6 - acr_of[chosen.choice["layer"]] <= limit
        assert chosen.achieved == min(r.achieved for r in rounds if r.holds)
    else:
        assert max_rounds == 1 and 0.6 - acr_of[steps[0]] > limit


def test_certify_subset_counts_only_correct_certificates():
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).eval()
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # always class 0, whatever the noise
    images = _images(4, 2)
    rob = certify_subset(net, images, torch.tensor([0, 0, 1, 2]), 3, 0.25, 10, 200, 0.001, seed=0)
    assert rob.correct == (True, True, False, False)
    expected = 0.25 * float(torch.special.ndtri(torch.tensor(0.001 ** (1 / 200), dtype=torch.float64)))
    assert rob.radius[0] == pytest.approx(expected, rel=1e-9)
    assert rob.acr() == pytest.approx(expected / 2, rel=1e-9)
    r = rob.radius[0]
    assert rob.certified_accuracy(r) == 0.5 and rob.certified_accuracy(r + 1e-9) == 0.0


def _noisy_trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small classifier trained with Gaussian noise on 3x4x4 images of four close classes (so that
    2-bit layers cost certified radius and 8-bit ones do not)."""
    g = torch.Generator().manual_seed(0)
    centers = 0.5 + 0.3 * (torch.rand(4, 3, 4, 4, generator=g) - 0.5)
    labels = torch.arange(400) % 4
    images = (centers[labels] + 0.1 * torch.randn(400, 3, 4, 4, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        loss = nn.functional.cross_entropy(net(images + 0.25 * torch.randn_like(images)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), images, labels


@pytest.mark.slow
def test_certified_constraint_with_cbc_and_real_certificates():
    net, images, labels = _noisy_trained()
    calib, selection = images[:200], (images[200:260], labels[200:260])
    common = dict(first_last_bits=None, method="rtn", residual_bits=None, bit_candidates=[2, 3, 8], budget=0.12,
                  sensitivity="noisy", sigma=0.25, export_onnx=False, selection_n=200, selection_n0=20)
    loose = QuantizeConfig(**common, max_acr_loss=0.01, max_rounds=4)
    q, report = quantize(net, calib, loose, seed=0, selection=selection)
    rounds = report.robust_rounds
    assert not rounds[0]["holds"] and 2 <= len(rounds) <= 4 and sum(r["chosen"] for r in rounds) == 1
    chosen = next(r for r in rounds if r["chosen"])
    assert chosen["holds"] and chosen["acr_loss"] <= 0.01
    assert chosen["achieved"] == min(r["achieved"] for r in rounds if r["holds"])
    assert report.metrics["size_fraction_of_fp32"] == pytest.approx(chosen["size_fraction_of_fp32"])
    # the returned model, certified again independently on the same images and noise, meets the bound
    fp = certify_subset(net, *selection, 4, 0.25, 20, 200, 0.001, seed=0)
    again = certify_subset(q, *selection, 4, 0.25, 20, 200, 0.001, seed=0)
    assert fp.acr() - again.acr() <= 0.01
    assert again.acr() == pytest.approx(chosen["acr"]) and report.metrics["selection_fp_acr"] == pytest.approx(fp.acr())
    # n = 200 votes cannot certify beyond 0.25 * Phi^-1(0.001 ** (1/200)) = 0.456: no choice reaches r = 0.5
    with pytest.raises(ValueError, match="cannot be met on the selection subset"):
        quantize(net, calib, QuantizeConfig(**common, min_certified_accuracy="0.5:0.5"), seed=0, selection=selection)
    with pytest.raises(ValueError, match="selection="):
        quantize(net, calib, loose, seed=0)
