"""The pipeline YAML: its schema, and validation whose errors name the key path, the value and
what is allowed.

    name: demo
    model: zoo:digits_cnn              # or {spec: pkg.mod:factory, checkpoint: w.pt, mean: [...], std: [...]}
    data: digits                       # or {source: imagefolder:PATH, calib_size: 1024, seed: 0}
    tracking: {experiment: demo}       # optional; uri defaults to sqlite in the work directory
    stages:
      - train: {epochs: 10, lr: 0.05}
      - evaluate: {}
      - evaluate: {batch_size: 1}
        id: evaluate-batch1            # optional; ids default to the stage name (-2, -3 for repeats)

This module knows nothing of torch, so the CLI can validate a pipeline without importing it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import FIX, InputError
from .schema import Schema  # noqa: F401  (re-exported: the base of every config)


class ModelSpec(Schema):
    spec: str = Field(description="zoo:NAME, package.module:factory, or the path of a saved model artifact")
    checkpoint: Optional[Path] = Field(None, description="state dict to load (torch.load weights_only=True)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    mean: Optional[list[float]] = Field(None, description="per-channel mean: wrap a user model in Normalize")
    std: Optional[list[float]] = Field(None, description="per-channel std, with mean")

    @model_validator(mode="after")
    def _mean_with_std(self) -> "ModelSpec":
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together (or neither)")
        return self


class DataSpec(Schema):
    source: str = Field(description="digits | imagefolder:PATH | torchvision:CIFAR10[:ROOT]")
    calib_size: int = Field(1024, ge=1, description="unlabeled calibration images drawn from the train split")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="held-out share for sources without a test split")
    limit_train: Optional[int] = Field(None, ge=1, description="use only this many training images (quick runs)")
    limit_test: Optional[int] = Field(None, ge=1, description="use only this many test images (quick runs)")
    image_size: Optional[int] = Field(None, ge=4, description="resize image-folder images to this square size")
    augment: Literal["standard", "none"] = Field(
        "standard", description="random crop (+ flip for natural images) in training")
    seed: int = Field(0, description="seed of the splits")


class TrackingSpec(Schema):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default sqlite:///<workdir>/mlflow.db")
    experiment: str = Field("deploypipe", description="MLflow experiment name")


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # safe as a folder name


class StageEntry(Schema):
    stage: str
    id: str = Field(pattern=NAME_PATTERN)
    config: dict[str, Any]
    _typed: Any = PrivateAttr(None)  # the stage's typed config when the CLI validated it already

    def typed(self, schema: type[BaseModel], where: str, prefix: str) -> Any:
        """The stage's config as its typed model (validated here unless the CLI did)."""
        if isinstance(self._typed, schema):
            return self._typed
        return validate(schema, self.config, where, prefix=prefix)


class PipelineConfig(Schema):
    name: str = Field(pattern=NAME_PATTERN)
    model: ModelSpec
    data: DataSpec
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    seed: int = 0
    device: str = "auto"
    trusted_factories: list[str] = Field(default_factory=list, description="user factories (package.module:"
                                         "factory) a saved model folder may name and deploypipe may call")
    stages: list[StageEntry] = Field(min_length=1)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"spec": v} if isinstance(v, str) else v

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_entries(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        entries, seen = [], {}
        for i, item in enumerate(v):
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict):
                raise ValueError(f"stages[{i}] must be a mapping like '- train: {{epochs: 5}}', got {item!r}")
            item = dict(item)
            sid = item.pop("id", None)
            if len(item) != 1:
                raise ValueError(f"stages[{i}] must name exactly one stage (plus an optional id), got keys "
                                 f"{sorted(item)}")
            (name, cfg), = item.items()
            cfg = {} if cfg is None else cfg
            if not isinstance(cfg, dict):
                raise ValueError(f"stages[{i}].{name} must be a mapping of options, got {cfg!r}")
            seen[name] = seen.get(name, 0) + 1
            sid = sid or (name if seen[name] == 1 else f"{name}-{seen[name]}")
            entries.append({"stage": name, "id": str(sid), "config": cfg})
        ids = [e["id"] for e in entries]
        dup = {x for x in ids if ids.count(x) > 1}
        if dup:
            raise ValueError(f"stage ids must be unique; repeated: {sorted(dup)}")
        return entries


    def to_yaml(self) -> str:
        """The config as a pipeline YAML that ``deploypipe run`` accepts (logged with every run)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["stages"] = [{s.stage: s.config, "id": s.id} for s in self.stages]
        return yaml.safe_dump(data, sort_keys=False)


# --------------------------------------------------------------------------- error messages
def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_validation_error(err: ValidationError, prefix: str = "", schema: type[BaseModel] | None = None,
                              flag_of: Optional[Callable[[tuple], Optional[str]]] = None) -> str:
    """One line per problem: 'key.path = value: what is wrong (allowed: ...)'; with ``flag_of``, the
    command-line flag that set a key names it instead ('--weight-bits 9: ...'). A fix a validator
    wrote into its message (" — fix: ...") is left out here: ``validate`` puts it at the end."""
    parts = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if x not in ("function-before", "function-after"))
        flag = flag_of(loc) if flag_of else None
        path = flag or _path(loc)
        if not flag:
            path = f"{prefix}.{path}" if prefix and path else (prefix or path)
        if e["type"] == "extra_forbidden":
            allowed = sorted(_allowed_keys(schema, loc[:-1])) if schema else []
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            parts.append(f"{path}: unknown key{hint}; allowed: {', '.join(allowed)}")
        elif e["type"] == "missing":
            parts.append(f"{path}: required {'option' if flag else 'key'} is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ").partition(FIX)[0]
            if not loc:  # a check of several keys together: its message names them
                parts.append(f"{prefix}: {msg}" if prefix else msg)
            else:
                parts.append(f"{path} {e.get('input')}: {msg}" if flag else f"{path} = {e.get('input')!r}: {msg}")
    return "; ".join(parts)


def _fixes(err: ValidationError) -> list[str]:
    return [e["msg"].partition(FIX)[2] for e in err.errors() if FIX in e["msg"]]


def _allowed_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    model = schema
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            args = getattr(ann, "__args__", ())
            sub = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if sub:
                model = sub[0]
    return list(model.model_fields)


def validate(schema: type[BaseModel], data: Any, where: str, prefix: str = "",
             flag_of: Optional[Callable[[tuple], Optional[str]]] = None, fix: Optional[str] = None) -> Any:
    """``data`` as a ``schema`` instance, or one InputError naming every problem (see
    ``describe_validation_error``) and the fix (a validator's own, else ``fix``)."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        fixes = _fixes(err)
        raise InputError(f"{where}: {describe_validation_error(err, prefix, schema, flag_of)}",
                         fixes[0] if fixes else fix or "correct the value(s) named; 'deploypipe stages' lists every "
                         "option") from None


# --------------------------------------------------------------------------- YAML
def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pipeline file '{path}' does not exist",
                         "give the path of a pipeline YAML (see examples/demo.yaml)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        started = f" (started at line {err.context_mark.line + 1})" if err.context_mark and err.context else ""
        problem = " ".join(str(x) for x in (err.context, err.problem) if x) + started
        raise InputError(f"YAML syntax error at {where}: {problem}",
                         f"fix the indentation or punctuation at line {mark.line + 1 if mark else '?'}") from None
    except yaml.YAMLError as err:
        raise InputError(f"YAML error in {path}: {err}", "check the file is valid YAML") from None


def load_pipeline(path: str | Path) -> PipelineConfig:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping with name, model, data, stages",
                         "start from examples/demo.yaml")
    return validate(PipelineConfig, data, str(path))
