"""Gaussian noise in pixel space, and the one seeding scheme every random draw of deploypipe uses.

Randomized smoothing, noise-augmented training, noisy evaluation and noisy calibration all add
N(0, sigma^2) noise to float32 images in [0, 1], before the model's own normalisation. Every such draw
comes from ``noise_generator(seed, stream, *keys)``: a torch.Generator whose seed is derived from the
run's seed, the name of the stream ("certify", "train", "evaluate", ...) and integer keys (an image's
index, an epoch and a step) by chaining SplitMix64's finaliser, a bijection of 64-bit words. So

- a draw depends only on what identifies it, not on batch sizes, shards, ranks or the order in which
  images are processed (a sharded certification equals the unsharded one; a resumed one equals an
  uninterrupted one);
- different (seed, stream, keys) give unrelated generators: no two images share noise, and no
  stream reuses another's (an affine recipe such as seed * 1_000_003 + index makes image 1,000,003 of
  seed 0 draw the noise of image 0 of seed 1).
"""

from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import torch

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _finalize(z: int) -> int:
    """SplitMix64's output function: a bijection of 64-bit words with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _key(value: int | str) -> int:
    if isinstance(value, str):
        return zlib.crc32(value.encode())  # stable across processes, unlike hash()
    return int(value) & MASK64


def derive_seed(seed: int, stream: str, *keys: int | str) -> int:
    """A 63-bit seed for (seed, stream, keys): each part is folded in by z <- mix(z + GOLDEN * (part + 1))."""
    z = _finalize((_key(seed) + GOLDEN) & MASK64)
    for part in (stream, *keys):
        z = _finalize((z + GOLDEN * (_key(part) + 1)) & MASK64)
    return z & 0x7FFFFFFFFFFFFFFF


def noise_generator(seed: int, stream: str, *keys: int | str,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one draw: e.g. ``noise_generator(seed, "certify", image_index)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, stream, *keys))
    return g


def gaussian(shape: Sequence[int], sigma: float, generator: torch.Generator) -> torch.Tensor:
    """sigma * N(0, 1) of ``shape`` in float32 on the generator's device (never lower precision:
    smoothing with low-precision noise has been shown unsound)."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32) * sigma


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``x`` (float32 images in [0, 1]) plus one draw of N(0, sigma^2) per element."""
    return x.float() + gaussian(x.shape, sigma, generator).to(x.device)


def noisy_images(x: torch.Tensor, sigma: float, seed: int, stream: str, indices: Iterable[int],
                 *keys: int | str) -> torch.Tensor:
    """Each image ``x[i]`` plus noise from ``noise_generator(seed, stream, *keys, indices[i])``: the
    noise an image gets does not depend on the batch it arrives in."""
    indices = [int(i) for i in indices]
    if len(indices) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(indices)} indices")
    if sigma <= 0:
        return x.float()
    noise = torch.stack([gaussian(x.shape[1:], sigma, noise_generator(seed, stream, *keys, i)) for i in indices])
    return x.float() + noise.to(x.device)
