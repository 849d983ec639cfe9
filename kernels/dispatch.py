"""Which implementation a kernel call runs.

``backend="auto"``: the Triton kernel on CUDA tensors, the PyTorch reference elsewhere.
``backend="triton"``: the Triton kernel always — on CPU tensors that is Triton's interpreter, correct
but slow, and it needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported (the
tests set it). ``backend="reference"``: the PyTorch reference always.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "reference"]


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no Triton here
        return False
    return True


def use_triton(tensor: torch.Tensor, backend: Backend = "auto") -> bool:
    """True when this call should run the Triton kernel on ``tensor``'s device."""
    if backend == "reference":
        return False
    if backend == "auto":  # float64 stays with the references (the kernels compute in float32)
        return tensor.is_cuda and tensor.dtype != torch.float64 and triton_available()
    if backend == "triton":
        if not (triton_available() and (tensor.is_cuda or interpreter_requested())):
            why = ("triton is not installed" if not triton_available() else
                   "the tensor is on CPU and TRITON_INTERPRET=1 was not set before triton was imported")
            raise RuntimeError(f"backend='triton' cannot run here: {why}")
        return True
    raise ValueError(f"unknown kernel backend '{backend}' (use auto, triton or reference)")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_groups(w: torch.Tensor, n: int, m: int, what: str = "weight") -> None:
    """The (rows, K) weight splits into N:M groups along K."""
    if w.dim() != 2:
        raise ValueError(f"{what} must be 2-D (rows, reduction), got shape {tuple(w.shape)}")
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {n}:{m}")
    if w.shape[1] % m:
        raise ValueError(f"{what}'s reduction size {w.shape[1]} is not a multiple of M={m}")
