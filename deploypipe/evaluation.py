"""Measurements every stage needs: top-1 and loss on a split, size, CPU latency."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet
from .distributed import all_reduce_sum, rank_slice
from .noise import noisy_images


@torch.inference_mode()
def top1_and_loss(model: nn.Module, data: ImageSet, batch_size: int = 256,
                  device: torch.device | str = "cpu", noise_sigma: float = 0.0, seed: int = 0) -> tuple[float, float]:
    """Top-1 accuracy (fraction) and mean cross-entropy of ``model`` on ``data``; with ``noise_sigma``
    on the images plus one draw of N(0, sigma^2) noise per pixel in [0, 1] space (image i's from
    ``noise_generator(seed, "evaluate", i)``): what a randomized-smoothing base classifier faces.
    Under torchrun (a process group is up) each rank scores its share of the images and the
    figures are summed over the ranks."""
    was_training = model.training
    model.eval()
    share = rank_slice(len(data))
    correct, loss, n = 0, 0.0, 0
    mine = data if share == slice(0, len(data)) else data.subset(torch.arange(len(data))[share])
    for x, y in mine.batches(batch_size):
        if noise_sigma > 0:
            first = share.start + n
            x = noisy_images(x, noise_sigma, seed, "evaluate", range(first, first + len(x)))
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    correct, loss, n = all_reduce_sum([correct, loss, n], device)
    return correct / max(n, 1), loss / max(n, 1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def storage_bytes(model: nn.Module) -> float:
    """Bytes the model needs when deployed: a submodule that knows its own storage (a method
    ``storage_bits()``, e.g. a quantized layer whose weights ship at 4 bits) counts that, every other
    parameter and buffer counts at its dtype's size."""
    counted: set[int] = set()
    bits = 0
    for m in model.modules():
        if hasattr(m, "storage_bits") and not any(id(t) in counted for t in m.parameters()):
            bits += m.storage_bits()
            counted.update(id(t) for t in m.parameters())
            counted.update(id(t) for t in m.buffers())
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in counted}
    bits += sum(8 * t.numel() * t.element_size() for t in tensors.values())
    return bits / 8


@torch.no_grad()
def bit_operations(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Bit operations per image of the Conv2d / Linear layers (van Baalen et al. 2020): MACs x weight
    bits x input bits, counting only multiplications by non-zero weights (an N:M layer does N of every
    M). A wrapper that declares ``w_bits`` / ``a_bits`` and holds its layer as ``.layer`` (a quantized
    layer) counts at its bits (None = float, 32); every other layer at 32 x 32."""
    counts: list[float] = []
    wrapped = {id(m.layer) for m in model.modules() if hasattr(m, "w_bits") and hasattr(m, "layer")}
    hooks = []
    for m in model.modules():
        if hasattr(m, "w_bits") and hasattr(m, "layer"):
            layer, w_bits, a_bits = m.layer, m.w_bits or 32, m.a_bits or 32
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in wrapped:
            layer, w_bits, a_bits = m, 32, 32
        else:
            continue
        weight = layer.weight
        per_output = weight[0].numel() * float((weight != 0).float().mean())
        hooks.append(m.register_forward_hook(
            lambda _m, _i, o, k=per_output, bits=w_bits * a_bits: counts.append(o[0].numel() * k * bits)))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape, device=param.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return float(sum(counts))


def state_bytes(model: nn.Module) -> int:
    """Bytes of the state dict's tensors as stored (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, repeats: int = 20,
               warmup: int = 3, device: torch.device | str = "cpu") -> dict[str, float]:
    """Median (and p90) wall time of one forward pass on a fixed batch, after warm-up."""
    model.eval()
    x = torch.rand(batch_size, *input_shape, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median": statistics.median(times), "p90": times[min(len(times) - 1, int(0.9 * len(times)))]}
