"""The base of every typed config (pipeline, stages, the Python API): pydantic models that refuse
unknown keys and check values on assignment. It imports nothing of deploypipe, so a method's config
can be used without the pipeline."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Schema(BaseModel):
    """Base of every config: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
