"""Global statistics tuning after quantization (Hubara et al. 2021, §5).

BN re-estimation. A folded conv computes gamma * (conv(x) - mu) / sigma + beta, so in full precision
its output per channel has mean beta and standard deviation |gamma| (the statistics BN was trained
to produce). Quantization shifts both. Re-inserting BN with the FP gamma, beta and re-estimating its
running mean/var on the quantized model, then folding it again, is the per-channel affine map

    z  ->  (z - m_q) * s_t / s_q + m_t,     (m_t, s_t) = (beta, |gamma|)

with (m_q, s_q) the quantized layer's output statistics on the calibration set. It is folded into
the quantized layer exactly: the weight and its per-channel scale are multiplied by the same factor
(the integer codes do not change) and the bias is updated. Layers are processed in order, each
measured after the ones before it were corrected. The stage's default target (``bn_target: fp``)
is the FP model's own measured (m_t, s_t) at that layer instead of (beta, |gamma|): BN's running
statistics come from augmented training batches and differ from the statistics on clean
calibration images, so the (beta, |gamma|) target also pulls the model towards them (it cost
accuracy on a CIFAR ResNet-20 after AdaQuant); the measured target only removes what quantization
changed.

Even so, re-estimation can hurt after AdaQuant, which already fitted each layer's output (bias
included) to the FP output: the quantized output's variance includes quantization noise, so matching
the FP variance shrinks the signal (on a CIFAR ResNet-20 at W4A4 it lowered AdaQuant's test accuracy,
and the calibration-set KL to the FP logits rose with it). So the stage keeps the correction only if
it lowers that KL (``guard``): a decision made on calibration data, never on the test split.

Bias tuning. Only the biases of the quantized layers are trained, to minimise
KL(softmax(FP logits) || softmax(quantized logits)) on the calibration set (for a model whose output
is not a batch of logits, e.g. an encoder's hidden states, the squared error relative to the FP
output: ``mixed_precision.divergence``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from deploypipe.batches import Batch, batch_size, call, output_tensor
from deploypipe.progress import progress

from .calibrate import run_until
from .mixed_precision import calibration_kl, divergence
from .modules import QuantLayer


def bn_affine(model: nn.Module, pairs: list[list[str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{conv name: (gamma, beta)} of the BNs that ``fold_batchnorm`` will fold (call before folding)."""
    return {conv: (model.get_submodule(bn).weight.detach().clone(), model.get_submodule(bn).bias.detach().clone())
            for conv, bn in pairs}


@torch.no_grad()
def output_stats(model: nn.Module, name: str,
                 batches: Callable[[], Iterable[Batch]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of a module's output over all batches, streamed; each
    pass stops at the module (``run_until``)."""
    acc = {}

    def record(_inputs, out):
        o = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
        acc["n"] = acc.get("n", 0) + o.shape[1]
        acc["s"] = acc.get("s", 0) + o.sum(1)
        acc["ss"] = acc.get("ss", 0) + (o * o).sum(1)

    run_until(model, name, batches, record)
    mean = acc["s"] / acc["n"]
    var = (acc["ss"] / acc["n"] - mean**2).clamp_min(0)
    return mean.float(), var.sqrt().float()


@torch.no_grad()
def reestimate_bn(q_model: nn.Module, affine: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  batches: Callable[[], Iterable[Batch]], fp_model: Optional[nn.Module] = None,
                  eps: float = 1e-5) -> list[dict]:
    """Correct every quantized layer that had a folded BN, in order; returns per-layer stats.

    Target per channel: with ``fp_model``, the FP model's own output mean and std at that layer on
    the same calibration images (so the correction is the identity for an unquantized layer and
    removes exactly the shift quantization caused); without it, the re-inserted BN's (beta, |gamma|),
    as in Hubara et al. — which also pulls the model towards BN's training-time running statistics,
    and that costs accuracy when they differ from the statistics on un-augmented images."""
    rows = []
    for name, (gamma, beta) in affine.items():
        q = q_model.get_submodule(name)
        if not isinstance(q, QuantLayer):
            continue
        if fp_model is not None:
            m_t, s_t = output_stats(fp_model, name, batches)
        else:
            m_t, s_t = beta, gamma.abs()
        m_q, s_q = output_stats(q_model, name, batches)
        factor = torch.where(s_q > eps, s_t / s_q.clamp_min(eps), torch.ones_like(s_q))
        bias = q.quantized_bias() if q.layer.bias is not None else torch.zeros_like(m_q)  # as the forward sees it
        shape = (-1,) + (1,) * (q.layer.weight.ndim - 1)
        q.layer.weight.mul_(factor.view(shape))
        q.weight_scale.mul_(factor)
        new_bias = (bias - m_q) * factor + m_t
        if q.layer.bias is None:
            q.layer.bias = nn.Parameter(new_bias)
        else:
            q.layer.bias.copy_(new_bias)
        rows.append({"layer": name, "mean_shift": float((m_q - m_t).abs().mean()),
                     "std_ratio": float((s_q / s_t.clamp_min(eps)).mean())})
    return rows


@torch.no_grad()
def guarded_reestimate_bn(q_model: nn.Module, fp_model: nn.Module, affine: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          batches: Callable[[], Iterable[Batch]], target: str = "fp",
                          guard: bool = True) -> tuple[list[dict], dict[str, float]]:
    """``reestimate_bn``, undone when (with ``guard``) it does not lower the calibration KL to the FP
    logits. Returns the per-layer rows and {bn_kl_before, bn_kl_after, bn_kept}."""
    before = calibration_kl(fp_model, q_model, batches)
    saved = {k: v.detach().clone() for k, v in q_model.state_dict().items()}
    had_bias = {n: m.layer.bias is not None for n, m in q_model.named_modules() if isinstance(m, QuantLayer)}
    rows = reestimate_bn(q_model, affine, batches, fp_model if target == "fp" else None)
    after = calibration_kl(fp_model, q_model, batches)
    kept = not guard or after < before
    if not kept:
        for n, m in q_model.named_modules():
            if isinstance(m, QuantLayer) and not had_bias[n]:
                m.layer.bias = None  # re-estimation added it
        q_model.load_state_dict(saved)
    return rows, {"bn_kl_before": before, "bn_kl_after": after, "bn_kept": float(kept)}


def tune_biases(fp_model: nn.Module, q_model: nn.Module, batches: Callable[[], Iterable[Batch]],
                steps: int = 300, lr: float = 1e-4, show_progress: bool = False) -> tuple[float, float]:
    """Train only the quantized layers' biases towards the FP logits (KL); returns KL before/after."""
    biases = [m.layer.bias for m in q_model.modules() if isinstance(m, QuantLayer) and m.layer.bias is not None]
    if not biases:
        return 0.0, 0.0
    fp_model.eval()
    q_model.eval()  # statistics stay fixed; only the biases move
    with torch.no_grad():
        cached = [(x, output_tensor(call(fp_model, x)).detach()) for x in batches()]

    def kl() -> float:
        with torch.no_grad():
            return sum(divergence(output_tensor(call(q_model, x)), t).item()
                       for x, t in cached) / sum(batch_size(x) for x, _ in cached)

    saved = [b.detach().clone() for b in biases]
    before = kl()
    frozen = [p for p in q_model.parameters() if all(p is not b for b in biases)]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(biases, lr=lr)
    try:
        with torch.enable_grad():
            for step in progress(range(steps), total=steps, description="bias tuning", enabled=show_progress):
                x, target = cached[step % len(cached)]
                loss = divergence(output_tensor(call(q_model, x)), target) / batch_size(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, f in zip(frozen, flags):
            p.requires_grad_(f)
    after = kl()
    if not after < before:  # keep the better of the two
        with torch.no_grad():
            for b, s in zip(biases, saved):
                b.copy_(s)
        after = before
    return before, after
