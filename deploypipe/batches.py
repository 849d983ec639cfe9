"""Batches of any model's inputs: what the Python API takes as calibration or training data.

A batch is one of

- a tensor: the model's only input, ``model(x)``;
- a tuple or list: its first item is the input, ``model(batch[0])``; its second, if any, the target
  (``(images, labels)`` from a DataLoader);
- a mapping of tensors: keyword arguments, ``model(**batch)`` (a Hugging Face encoder's
  ``input_ids`` / ``attention_mask``); a ``labels`` entry is the target and is not passed to the model.

Data is any re-iterable of batches (a DataLoader, a list of batches), or a single tensor / mapping of
tensors holding every sample, which is cut into batches along its first dimension. An iterator that
can be consumed only once is read into a list first (calibration passes over the data many times).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

Batch = Union[torch.Tensor, tuple, list, Mapping[str, Any]]
TARGET_KEY = "labels"


def model_inputs(batch: Batch) -> tuple[tuple, dict]:
    """(positional arguments, keyword arguments) of the model call for ``batch``."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k != TARGET_KEY}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    raise TypeError(f"a batch must be a tensor, a (input, target) tuple or a dict of tensors, got "
                    f"{type(batch).__name__}")


def target(batch: Batch) -> Optional[torch.Tensor]:
    """The batch's target (labels), if it carries one."""
    if isinstance(batch, Mapping):
        return batch.get(TARGET_KEY)
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


def call(model: nn.Module, batch: Batch) -> Any:
    """``model`` applied to ``batch``."""
    args, kwargs = model_inputs(batch)
    return model(*args, **kwargs)


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _first_tensor(batch: Batch) -> torch.Tensor:
    args, kwargs = model_inputs(batch)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("the batch holds no tensor")


def batch_size(batch: Batch) -> int:
    """Number of samples: the first dimension of the (first) input tensor."""
    return int(_first_tensor(batch).shape[0])


def take(batch: Batch, index: slice | torch.Tensor) -> Batch:
    """The samples ``index`` of a batch (every tensor is indexed along its first dimension)."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, Mapping):
        return {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return type(batch)(v[index] if isinstance(v, torch.Tensor) else v for v in batch)


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output stands for: the tensor itself, a model output's ``logits`` (or
    ``last_hidden_state``), else the first tensor of a tuple / mapping."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model returned {type(output).__name__}, which holds no tensor")


def _split(data: torch.Tensor | Mapping, size: int) -> list[Batch]:
    n = batch_size(data)
    return [take(data, slice(i, i + size)) for i in range(0, n, size)]


def as_batches(data: Any, size: int = 256) -> Callable[[], Iterable[Batch]]:
    """A function returning a fresh iterable of the batches of ``data`` each time it is called (see
    the module docstring for what ``data`` may be)."""
    if isinstance(data, (torch.Tensor, Mapping)):
        batches = _split(data, size)
        return lambda: batches
    if isinstance(data, Iterator):
        data = list(data)
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor, a dict of tensors or an iterable of batches, got "
                        f"{type(data).__name__}")
    return lambda: data


def first(batches: Callable[[], Iterable[Batch]]) -> Batch:
    """The first batch (an empty data set is an error the user must hear about)."""
    for batch in batches():
        return batch
    raise ValueError("the data holds no batch — fix: pass at least one batch of calibration / training samples")
