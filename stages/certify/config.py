"""The certify stage's settings: one typed config for the CLI flags, the YAML and the Python API."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from deploypipe.schema import Schema

MIN_FORWARD_CHUNK = 8  # out of memory: halve the forward chunk down to this before the batch size (other noise)


class CertifyConfig(Schema):
    method: Literal["rs", "drs"] = Field(
        "rs", description="randomized smoothing, or dual randomized smoothing (two half-images)")
    sigma: float = Field(0.25, gt=0, description="noise standard deviation in [0, 1] pixel units")
    n0: int = Field(100, ge=1, description="noisy samples to select the class")
    n: int = Field(100_000, ge=1, description="noisy samples to estimate its probability")
    alpha: float = Field(0.001, gt=0, lt=1, description="failure probability of each certificate")
    num_images: Optional[int] = Field(500, ge=1, description="test images, evenly spaced (null = all)")
    every: Optional[int] = Field(
        None, ge=1, description="every k-th test image (instead of num_images; give one of the two)")
    shard: Optional[str] = Field(None, description="i/k: certify only the i-th of k interleaved shards (0-based)")
    batch_size: int = Field(1000, ge=1, description="noisy copies drawn per step (halved on out-of-memory)")
    forward_batch: Optional[int] = Field(
        None, ge=1,
        description="the model sees each step's copies in chunks of this many (the noise does not depend on it); null "
                    "= 64 on the CPU (deploypipe.smoothing.CPU_FORWARD_BATCH), whose caches favour small batches, the "
                    "whole step on a GPU")
    model_right: Optional[str] = Field(
        None,
        description="DRS: the right-side base classifier (a saved model/ folder); default: the pipeline's model for "
                    "both sides")
    reference: Optional[str] = Field(
        None,
        description="a saved model/ folder certified on the same images for comparison (e.g. the FP32 model before "
                    "quantization)")
    radii: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0, 1.5], min_length=1,
                               description="radii at which certified accuracy is reported (at least one, each >= 0)")
    channels_last: bool = Field(True, description="channels_last memory format for the base classifier")
    autocast: bool = Field(
        False,
        description="run the base classifier under autocast (float16 on CUDA, bfloat16 on CPU); noise and x + noise "
                    "stay float32")
    onnx: Optional[str] = Field(
        None,
        description="certify this ONNX file (e.g. quantize's model.onnx) in ONNX Runtime instead of the pipeline's "
                    "PyTorch model (rs)")
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="where the base classifier runs: auto = ONNX Runtime on the CPU when the exported model agrees with"
                    " PyTorch on noisy probes (faster there), else PyTorch")
    reuse: Optional[str] = Field(
        None,
        description="an earlier certify output folder (<out>/certify) of the same classifiers, seed, data and settings:"
                    " its certificates of images this run selects are read back instead of recomputed (e.g. to grow 100"
                    " images to 500)")

    @field_validator("shard")
    @classmethod
    def _shard(cls, value):
        if value is None:
            return value
        try:
            i, k = (int(p) for p in value.split("/"))
        except ValueError:
            raise ValueError(f"shard must be i/k, e.g. 0/4, got {value!r}") from None
        if not 0 <= i < k:
            raise ValueError(f"shard i/k needs 0 <= i < k, got {value!r}")
        return value

    @field_validator("radii")
    @classmethod
    def _radii(cls, value):
        if any(r < 0 for r in value):
            raise ValueError(f"radii must be >= 0, got {value}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_image_choice(cls, data):
        if isinstance(data, dict) and data.get("every") is not None:
            if data.get("num_images") is not None:
                raise ValueError("give num_images or every, not both (every k-th test image replaces the evenly spaced "
                                 "num_images)")
            data = {**data, "num_images": None}  # the saved config says which images were certified
        return data

    @model_validator(mode="after")
    def _choice(self) -> "CertifyConfig":
        if self.n0 > self.n:
            raise ValueError(f"n0 {self.n0} is larger than n {self.n}: the selection votes would outnumber the ones "
                             "the bound is computed from — fix: give n0 <= n (the reference settings: n0 100, "
                             "n 100000)")
        if self.model_right and self.method != "drs":
            raise ValueError("model_right is for method drs")
        if self.method == "drs" and (self.reference or self.onnx):
            raise ValueError("reference and onnx are supported with method rs")
        if self.runtime == "onnxruntime" and self.autocast:
            raise ValueError("autocast is PyTorch's: use runtime torch (or auto) with autocast")
        return self
