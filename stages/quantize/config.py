"""The quantize settings: one typed config for the CLI flags, the YAML and ``deploypipe.quantize``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from deploypipe.schema import Schema

FP16 = 16  # a "bit width" that means: keep the layer in half precision (weights and inputs)


class QuantizeConfig(Schema):
    weight_bits: int = Field(4, ge=2, le=8, description="bits of the weights (per output channel, symmetric)")
    act_bits: Optional[int] = Field(
        8, ge=2, le=8, description="bits of the layer inputs (per tensor); null = weight-only")
    first_last_bits: Optional[int] = Field(
        8, ge=2, le=8, description="bits (weights and inputs) of the first and last layer; null = like the rest")
    method: Literal["rtn", "adaquant"] = Field(
        "adaquant", description="round-to-nearest, or AdaQuant layer-wise calibration")
    mode: Literal["parallel", "sequential"] = Field(
        "sequential", description="AdaQuant inputs: FP (parallel) or from the quantized prefix (sequential)")
    weight_range: Literal["minmax", "percentile", "mse"] = Field("mse", description="initial weight clipping")
    act_range: Literal["minmax", "percentile", "mse"] = Field("mse", description="initial activation clipping")
    percentile: float = Field(99.99, gt=50, le=100, description="for the percentile ranges")
    residual_bits: Optional[int] = Field(
        8, ge=2, le=8,
        description="bits of both inputs of residual adds (Q/DQ as TensorRT fuses them); null = float; only with "
                    "act_bits")
    matmul_bits: Optional[int] = Field(
        8, ge=2, le=8,
        description="bits of both inputs of activation matmuls (attention); null = float; only with act_bits")
    unsigned_activations: bool = Field(
        False, description="unsigned grids for non-negative inputs, and a residual add's input on the grid of the "
                           "conv that reads the same tensor: the layout ONNX Runtime's x86 integer kernels fuse "
                           "(not for TensorRT)")
    include: list[str] = Field(["*"], description="glob patterns of layer names to quantize")
    exclude: list[str] = Field([], description="glob patterns of layer names to keep in floating point")
    iters: int = Field(250, ge=1, description="AdaQuant steps per layer (at most: see patience)")
    patience: int = Field(3, ge=0, description="AdaQuant: stop a layer after this many checks of its calibration "
                                               "probe MSE (every iters/10 steps) without improvement; 0 = never")
    batch_size: int = Field(50, ge=1, description="cached samples per AdaQuant step")
    lr_weight: float = Field(4e-5, gt=0, description="AdaQuant learning rate of the weights (the paper: 1e-5 over "
                                                     "1,000 steps)")
    lr_bias: float = Field(4e-3, gt=0, description="AdaQuant learning rate of the biases (the paper: 1e-3)")
    lr_weight_scale: float = Field(4e-3, gt=0, description="AdaQuant relative learning rate of the weight scales")
    lr_act_scale: float = Field(4e-2, gt=0, description="AdaQuant relative learning rate of the activation scale")
    bit_candidates: Optional[list[int]] = Field(
        None,
        description="weight precisions the integer program chooses from per layer, e.g. [2, 3, 4, 8]; fp16 (or 16) = "
                    "keep the layer in FP16")
    cost: Literal["size", "bops", "latency"] = Field(
        "size",
        description="with bit_candidates: what the budget limits — weight storage, bit operations (MACs x w bits x a "
                    "bits), or a measured latency table")
    latency_table: Optional[str] = Field(
        None, description="with cost latency: CSV layer,bits,ms (bits 2..8 or fp16) measured on the target")
    budget: Optional[float] = Field(
        None, gt=0, le=1, description="with bit_candidates: the cost (size or BOPs) as a fraction of the FP32 model's")
    avg_bits: Optional[float] = Field(
        None, gt=0, le=16,
        description="with bit_candidates and cost size: average weight bits of the layers the program chooses for")
    max_latency_ms: Optional[float] = Field(
        None, gt=0,
        description="with bit_candidates and cost latency: total table latency of the layers the program chooses for")
    max_loss: Optional[float] = Field(
        None, ge=0, description="with bit_candidates: max total calibration-KL increase (minimise the cost)")
    sweep: list[float] = Field(
        [],
        description="with bit_candidates: more budgets (same unit as budget / avg_bits / max_latency_ms) to solve and "
                    "evaluate (pareto.csv, pareto.png)")
    bn_tuning: bool = Field(False, description="re-estimate the folded BN statistics on the quantized model")
    bn_guard: bool = Field(
        True, description="keep the BN re-estimation only if it lowers the calibration-set KL to the FP logits")
    bn_target: Literal["fp", "bn"] = Field(
        "fp",
        description="BN re-estimation target: the FP model's measured output statistics (fp) or the BN's beta/|gamma| "
                    "(bn, the paper's)")
    bias_tuning: bool = Field(False, description="train the biases towards the FP logits (KL) on the calibration set")
    bias_steps: int = Field(300, ge=1, description="bias-tuning steps")
    bias_lr: float = Field(1e-4, gt=0, description="bias-tuning learning rate (Adam)")
    export_onnx: bool = Field(
        True, description="write model.onnx (Q/DQ) and check it in ONNX Runtime on the test split")
    calib_batch_size: int = Field(256, ge=1, description="images per forward pass while calibrating")
    calib_noise_sigma: float = Field(
        0.0, ge=0,
        description="Gaussian noise on the [0,1] calibration images (a base classifier for randomized smoothing sees "
                    "noisy inputs: calibrate on those; e.g. the train stage's noise_sigma); 0 = clean")
    sensitivity: Literal["clean", "noisy", "votes"] = Field(
        "clean",
        description="with bit_candidates: each layer's delta is the KL on the clean calibration images (clean), the KL "
                    "on Gaussian-noised ones at sigma (noisy: what randomized smoothing will feed the base "
                    "classifier), or the drop of the FP model's top-class vote probability over sensitivity_copies "
                    "noisy copies of each (votes: what the certificate is made of)")
    sensitivity_copies: int = Field(
        16, ge=1, description="sensitivity votes: noisy copies of each calibration image (the same for every layer)")
    sigma: Optional[float] = Field(
        None, gt=0, description="the certification noise level, for sensitivity noisy and the certified constraints")
    max_acr_loss: Optional[float] = Field(
        None, ge=0,
        description="with bit_candidates and a budget: the most average certified radius the quantized model may lose "
                    "against the FP model on a held-out selection subset of the training data (re-solves with a "
                    "larger budget until it holds)")
    min_certified_accuracy: Optional[str] = Field(
        None,
        description="R:A, e.g. 0.25:0.6 — with bit_candidates and a budget: the certified accuracy at L2 radius R on "
                    "the selection subset must stay at least A (a fraction)")
    selection_images: int = Field(
        200, ge=10, description="training images (outside the calibration set) certified to check the constraint")
    selection_n: int = Field(1000, ge=10, description="noisy samples per image when certifying the selection subset")
    selection_n0: int = Field(100, ge=1, description="noisy samples that choose the candidate class (selection)")
    selection_alpha: float = Field(0.001, gt=0, lt=0.5, description="failure probability of each selection certificate")
    max_rounds: int = Field(
        4, ge=1, description="with a certified constraint: the most models certified on the selection subset")
    cache_budget_mb: float = Field(
        1024, gt=0, description="memory for one layer's cached inputs+outputs (subsampled above it)")

    def adaquant_settings(self):
        from .adaquant import AdaQuantSettings

        return AdaQuantSettings(self.iters, self.batch_size, self.lr_weight, self.lr_bias, self.lr_weight_scale,
                                self.lr_act_scale, self.patience)

    def certified_constraint(self) -> Optional[tuple[str, float, float]]:
        """("acr", max loss, 0) or ("certified_accuracy", radius, least accuracy), or None."""
        if self.max_acr_loss is not None:
            return "acr", self.max_acr_loss, 0.0
        if self.min_certified_accuracy is not None:
            radius, accuracy = (float(v) for v in self.min_certified_accuracy.split(":"))
            return "certified_accuracy", radius, accuracy
        return None

    @field_validator("min_certified_accuracy")
    @classmethod
    def _radius_accuracy(cls, value):
        if value is None:
            return value
        try:
            radius, accuracy = (float(v) for v in str(value).split(":"))
        except ValueError:
            radius = accuracy = float("nan")
        if not (radius >= 0 and 0 <= accuracy <= 1):
            raise ValueError(f"min_certified_accuracy {value!r} is not R:A with a radius R >= 0 and an accuracy A in "
                             "[0, 1], e.g. 0.25:0.6")
        return value

    @field_validator("bit_candidates", mode="before")
    @classmethod
    def _fp16_label(cls, value):
        if isinstance(value, (list, tuple)):
            return [FP16 if str(v).strip().lower() == "fp16" else v for v in value]
        return value

    @model_validator(mode="after")
    def _mixed_precision(self) -> "QuantizeConfig":
        limits = {k: getattr(self, k) for k in ("budget", "avg_bits", "max_latency_ms", "max_loss")
                  if getattr(self, k) is not None}
        if self.bit_candidates is not None:
            if (not self.bit_candidates or any(not (2 <= b <= 8 or b == FP16) for b in self.bit_candidates)
                    or all(b == FP16 for b in self.bit_candidates)):
                raise ValueError("bit_candidates must be weight bit widths in 2..8 (and optionally fp16), e.g. [2, 3, "
                                 "4, 8]")
            if len(limits) != 1:
                raise ValueError("with bit_candidates give exactly one of budget, avg_bits, max_latency_ms or max_loss")
            if self.avg_bits is not None and self.cost != "size":
                raise ValueError("avg_bits limits weight storage: use it with cost size")
            if self.max_latency_ms is not None and self.cost != "latency":
                raise ValueError("max_latency_ms needs cost latency (and a latency_table)")
            if self.budget is not None and self.cost == "latency":
                raise ValueError("with cost latency give max_latency_ms (milliseconds), not a fraction budget")
            if self.cost == "latency":
                if not self.latency_table:
                    raise ValueError("cost latency needs latency_table: a CSV layer,bits,ms")
                if not Path(self.latency_table).is_file():
                    raise ValueError(f"latency_table '{self.latency_table}' does not exist")
        elif limits or self.sweep:
            raise ValueError(f"{', '.join(limits) or 'sweep'} need(s) bit_candidates")
        constrained = [k for k in ("max_acr_loss", "min_certified_accuracy") if getattr(self, k) is not None]
        if len(constrained) > 1:
            raise ValueError("give one of max_acr_loss and min_certified_accuracy, not both")
        noisy = self.sensitivity != "clean"
        if (noisy or constrained) and self.sigma is None:
            what = constrained[0] if constrained else f"sensitivity {self.sensitivity}"
            raise ValueError(f"{what} needs the certification noise level: set sigma (e.g. --sigma 0.25, the noise "
                             "the model was trained with)")
        if noisy and self.bit_candidates is None:
            raise ValueError(f"sensitivity {self.sensitivity} chooses per-layer precisions: it needs bit_candidates "
                             "(e.g. 2,3,4,8)")
        if constrained and (self.bit_candidates is None or self.max_loss is not None):
            raise ValueError(f"{constrained[0]} re-solves the bit allocation under a budget: give bit_candidates and "
                             "one of budget, avg_bits or max_latency_ms (not max_loss)")
        if constrained and self.selection_n0 > self.selection_n:
            raise ValueError(f"selection_n0 {self.selection_n0} is more than selection_n {self.selection_n}: the "
                             "candidate-choosing samples should be a small part — lower selection_n0")
        if self.cost != "latency" and self.avg_bits is None and any(not 0 < b <= 1 for b in self.sweep):
            raise ValueError("sweep budgets are fractions of the FP32 cost in (0, 1]")
        return self
