"""The export settings: one typed config for the CLI flags, the YAML and ``deploypipe.export``."""

from __future__ import annotations

import warnings
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from deploypipe.schema import Schema


warnings.filterwarnings("ignore", message='Field name "register" in "ExportConfig"', category=UserWarning)
# (``--register NAME`` is the flag users type; the field only shadows ABCMeta.register, which no instance uses)


class ExportConfig(Schema):
    format: Literal["auto", "onnx", "tensorrt", "both"] = Field(
        "auto", description="onnx, a TensorRT engine (with its ONNX file), or both; auto = ONNX, and an engine when "
                            "a TensorRT module is installed")
    precision: Literal["as-quantized", "fp32", "fp16"] = Field(
        "as-quantized", description="as-quantized: the model as it stands (Q/DQ where it is quantized); fp32 / fp16: "
                                    "a float model in float32 / cast to float16 (not for a quantized model)")
    batch: list[int] = Field([1, 8, 64], min_length=1, description="batch sizes to measure latency at")
    profile: Optional[list[int]] = Field(
        None, description="the engine's optimization profile: min,opt,max batch (default: the smallest, middle and "
                          "largest of batch)")
    engine_backend: Literal["auto", "tensorrt", "tensorrt-rtx"] = Field(
        "auto", description="which TensorRT builds the engine: TensorRT 10/11 (datacenter GPUs) or TensorRT for RTX; "
                            "auto = whichever is installed, TensorRT first")
    workspace_mb: int = Field(1024, ge=16, description="the builder's workspace memory limit (MiB)")
    sparse_weights: Literal["auto", "on", "off"] = Field(
        "auto", description="let TensorRT pick 2:4 sparse kernels (SPARSE_WEIGHTS); auto = when the model records "
                            "2:4 layers")
    cpu_file: bool = Field(
        True, description="a quantized model also gets model.cpu.onnx for ONNX Runtime on x86 CPUs: the same Q/DQ "
                          "without the Clips that keep INT8 codes off -128, one of each identical Q/DQ pair, INT8 "
                          "weights, so Conv fuses into QLinearConv (quantize with unsigned_activations for "
                          "post-ReLU inputs and residual adds to fuse too)")
    parity_images: int = Field(1000, ge=1, description="test images on which ONNX Runtime must agree with PyTorch")
    latency_repeats: int = Field(20, ge=1, description="timed forward passes per batch size (median reported)")
    name: Optional[str] = Field(None, description="the model's name in the bundle and the registry (default: "
                                                  "the pipeline's name)")
    register: Optional[str] = Field(
        None, description="register the bundle as a new version of this MLflow registered model, alias candidate")

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value):
            raise ValueError(f"batch sizes must be >= 1, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _profile(self) -> "ExportConfig":
        if self.profile is not None:
            if len(self.profile) != 3 or not 1 <= self.profile[0] <= self.profile[1] <= self.profile[2]:
                raise ValueError(f"profile {self.profile} is not min,opt,max with 1 <= min <= opt <= max — fix: give "
                                 "e.g. --profile 1,8,64")
        return self

    def engine_profile(self) -> tuple[int, int, int]:
        if self.profile is not None:
            return tuple(self.profile)
        return self.batch[0], self.batch[len(self.batch) // 2], self.batch[-1]

    def wants_engine(self, installed: bool) -> bool:
        return self.format in ("tensorrt", "both") or (self.format == "auto" and installed)
