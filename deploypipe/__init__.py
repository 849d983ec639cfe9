"""deploypipe: take a trained PyTorch model and make it ship — smaller, faster, certified, tracked.

Each method is a function on any ``nn.Module`` and any iterable of batches (image tensors, (input,
target) tuples, or dicts of keyword tensors such as a Hugging Face encoder's); its config is the same
typed object the CLI and the pipeline YAML use::

    import deploypipe as dp

    q, report = dp.quantize(model, calib_batches, dp.QuantizeConfig(weight_bits=8, act_bits=8))
    dp.export_onnx(q, next(iter(calib_batches)), "model.onnx")
    sparse, report = dp.sparsify(model, train_loader, dp.SparsifyConfig(pattern="2:4", epochs=5))
    cert = dp.Smoothed(classifier, num_classes=10, sigma=0.25).certify(image, n=100_000)

Imports are lazy: ``import deploypipe`` does not import torch until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # quantize: AdaQuant PTQ, per-layer bit allocation by integer programming
    "quantize": "deploypipe.stages.quantize.ptq",
    "QuantizeConfig": "deploypipe.stages.quantize.config",
    "QuantizeReport": "deploypipe.stages.quantize.ptq",
    "allocate_bits": "deploypipe.stages.quantize.bit_allocation",
    "InfeasibleBudget": "deploypipe.stages.quantize.bit_allocation",
    "export_onnx": "deploypipe.onnx_export",
    "onnx_parity": "deploypipe.onnx_export",
    # sparsify: N:M sparse training (SR-STE, MDGF, SDGF)
    "sparsify": "deploypipe.stages.sparsify.nm_training",
    "SparsifyConfig": "deploypipe.stages.sparsify.config",
    "SparsifyReport": "deploypipe.stages.sparsify.nm_training",
    # certify: randomized smoothing and dual randomized smoothing, sound radii
    "Smoothed": "deploypipe.smoothing",
    "DualSmoothed": "deploypipe.smoothing",
    "Certificate": "deploypipe.smoothing",
    "ABSTAIN": "deploypipe.smoothing",
    # distill: data pruning with knowledge distillation
    "distill": "deploypipe.stages.distill.pruned_kd",
    "DistillConfig": "deploypipe.stages.distill.config",
    "DistillReport": "deploypipe.stages.distill.pruned_kd",
    # export: ONNX, TensorRT lint and engines, deploy bundle
    "export": "deploypipe.stages.export.exporter",
    "ExportConfig": "deploypipe.stages.export.config",
    "ExportReport": "deploypipe.stages.export.exporter",
    "lint_onnx": "deploypipe.stages.export.trt_lint",
    "build_engine": "deploypipe.stages.export.engine",
    # training, noise, models
    "Trainer": "deploypipe.training",
    "TrainOptions": "deploypipe.training",
    "Callback": "deploypipe.training",
    "GaussianNoise": "deploypipe.training",
    "noise_generator": "deploypipe.noise",
    "load_model": "deploypipe.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deploypipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
