"""The evaluate settings (pydantic only: the CLI reads them without importing torch)."""

from __future__ import annotations

from pydantic import Field

from deploypipe.schema import Schema


class EvaluateConfig(Schema):
    batch_size: int = Field(256, ge=1, description="images per batch for accuracy")
    latency_batch_size: int = Field(32, ge=1, description="batch size of the latency measurement")
    latency_repeats: int = Field(20, ge=1, description="timed forward passes (median reported)")
    latency_warmup: int = Field(3, ge=0, description="untimed forward passes first")
    threads: int = Field(0, ge=0, description="CPU threads for the latency measurement (0 = torch's default)")
