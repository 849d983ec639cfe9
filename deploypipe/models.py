"""Models: build from a spec, save and reload without pickle.

A saved model is a directory:

    model.json     {"format": "deploypipe-model/1", "factory": "zoo:resnet20" | "pkg.mod:fn",
                    "kwargs": {...}, "normalize": {"mean": [...], "std": [...]} | null,
                    "transforms": [{"kind": "...", "module": "...", "params": {...}}, ...],
                    "input_shape": [C, H, W], "num_classes": K}
    weights.pt     the state dict (loaded with torch.load(weights_only=True))

``load_model(path)`` rebuilds the architecture from the factory, applies the transform records in
order (a quantize or sparsify stage registers the function that re-creates its modules), and loads
the state dict strictly — so any stage's output reloads exactly, alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import ModelSpec
from .errors import InputError
from .zoo import ZOO, NormalizedModel

FORMAT = "deploypipe-model/1"
TransformFn = Callable[[nn.Module, dict], nn.Module]
TRANSFORMS: dict[str, TransformFn] = {}
# Loading a model folder never imports or calls code the folder alone names: zoo factories and
# deploypipe's own transforms are always allowed; a user factory (package.module:factory) only once the
# user has named it — as the pipeline's model, with --trust-factory / trusted_factories:, or with
# load_model(..., trusted=[...]). A model.json is data: a copied or downloaded folder cannot run code.
TRUSTED_FACTORIES: set[str] = set()
OWN_MODULES = "deploypipe."


def trust_factories(names) -> None:
    """Allow these user factories (package.module:factory) in model folders loaded by this process."""
    TRUSTED_FACTORIES.update(n for n in names if n)


def _check_trusted(record: "ModelRecord", trusted) -> None:
    allowed = TRUSTED_FACTORIES | set(trusted or ())
    fix = (f"if you trust it, name it: --trust-factory {record.factory} on the command line, trusted_factories: "
           f"[{record.factory}] in the pipeline YAML, or deploypipe.load_model(path, trusted=['{record.factory}'])")
    if not record.factory.startswith("zoo:") and record.factory not in allowed:
        raise InputError(f"the saved model asks to build '{record.factory}', a factory nobody named; deploypipe does "
                         "not import or call code that a model folder names", fix)
    for t in record.transforms:
        module = str(t.get("module") or "")
        if module and not module.startswith(OWN_MODULES) and module not in allowed:
            raise InputError(f"the saved model asks to import '{module}' for its transform '{t.get('kind')}'; "
                             "deploypipe imports only its own transform modules from a model folder",
                             f"if you trust it, name it: --trust-factory {module} (or trusted_factories: [{module}])")


def register_transform(kind: str) -> Callable[[TransformFn], TransformFn]:
    """Register the function that re-applies a structural change (e.g. fake-quant modules) to a
    freshly built model, given the params stored in the transform record."""

    def deco(fn: TransformFn) -> TransformFn:
        TRANSFORMS[kind] = fn
        return fn

    return deco


@dataclass
class ModelRecord:
    """Everything needed to rebuild a model's architecture (the weights travel separately)."""

    factory: str
    kwargs: dict = field(default_factory=dict)
    normalize: Optional[dict] = None
    transforms: list[dict] = field(default_factory=list)
    input_shape: list[int] = field(default_factory=list)
    num_classes: int = 0

    def with_transform(self, kind: str, module: str, params: dict) -> "ModelRecord":
        """A copy with one more transform; ``module`` is imported on load to register ``kind``."""
        record = {"kind": kind, "module": module, "params": params}
        return dataclasses.replace(self, transforms=[*self.transforms, record])

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}


def resolve_factory(factory: str) -> Callable[..., nn.Module]:
    if factory.startswith("zoo:"):
        name = factory[4:]
        if name not in ZOO:
            raise InputError(f"unknown zoo model '{name}'", f"use one of: {', '.join(sorted(ZOO))}")
        return ZOO[name]
    module_name, sep, attr = factory.partition(":")
    if not sep and ("/" in factory or factory.startswith(".")):
        raise InputError(f"model folder '{factory}' does not exist",
                         "give the model/ folder a stage wrote (it holds model.json), or zoo:NAME")
    if not sep or not module_name or not attr:
        raise InputError(f"model spec '{factory}' is neither zoo:NAME, package.module:factory, nor a saved model "
                         "folder",
                         "use e.g. zoo:resnet20, mypkg.models:make_net, or the path of a stage's model/ folder")
    _add_cwd_to_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"cannot import module '{module_name}' of model spec '{factory}': {err}",
                         "install the package or run from the folder that contains it") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"module '{module_name}' has no callable '{attr}'", f"check the factory name in '{factory}'")
    return fn


def _add_cwd_to_path() -> None:
    """A user's model module next to the pipeline imports (after installed packages, never shadowing them)."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def factory_source(factory: str) -> Optional[Path]:
    """The source file that defines a factory's architecture (for resume keys), if it can be found."""
    if factory.startswith("zoo:"):
        return Path(__file__).with_name("zoo.py")
    module_name, sep, _ = factory.partition(":")
    if not sep or not module_name:
        return None
    _add_cwd_to_path()
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def _call_factory(record: ModelRecord) -> nn.Module:
    try:
        net = resolve_factory(record.factory)(**record.kwargs)
    except TypeError as err:
        raise InputError(f"factory '{record.factory}' rejected its arguments {sorted(record.kwargs)}: {err}",
                         "fix the model kwargs to match the factory's signature") from None
    if not isinstance(net, nn.Module):
        raise InputError(f"factory '{record.factory}' returned {type(net).__name__}, not an nn.Module",
                         "make the factory return the model")
    return net


def build_model(record: ModelRecord, trusted=()) -> nn.Module:
    """The architecture of a record, with fresh weights (its factory and transform modules must be
    trusted: see TRUSTED_FACTORIES)."""
    _check_trusted(record, trusted)
    net = _call_factory(record)
    if record.normalize:
        net = NormalizedModel(record.normalize["mean"], record.normalize["std"], net)
    for t in record.transforms:
        if t["kind"] not in TRANSFORMS and t.get("module"):
            importlib.import_module(t["module"])
        if t["kind"] not in TRANSFORMS:
            raise InputError(f"saved model needs transform '{t['kind']}', which nothing registers",
                             f"install the package that provides it ({t.get('module')})")
        net = TRANSFORMS[t["kind"]](net, t["params"])
    return net


# --------------------------------------------------------------------------- save / load
def save_model(model: nn.Module, record: ModelRecord, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path / "weights.pt")
    (path / "model.json").write_text(json.dumps(record.to_json(), indent=2))
    return path


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / "model.json").is_file()


def read_record(path: str | Path) -> ModelRecord:
    path = Path(path)
    try:
        data = json.loads((path / "model.json").read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"'{path}' is not a saved deploypipe model ({err})",
                         "give the model/ folder a stage wrote (it holds model.json and weights.pt)") from None
    if data.pop("format", None) != FORMAT:
        raise InputError(f"'{path}/model.json' is not in format {FORMAT}", "re-save the model with this deploypipe")
    return ModelRecord(**data)


def load_model(path: str | Path, map_location: str | torch.device = "cpu", trusted=()) -> nn.Module:
    """Rebuild a saved model (any stage's output) exactly, in eval mode: the factory, then the
    transforms the record lists (quantized layers, N:M layers, ...), then the weights, loaded with
    ``weights_only=True`` (no pickle). A user factory the record names must be in ``trusted`` (or
    named earlier in this process: ``trust_factories``); zoo models and deploypipe's own transforms
    always load.

    >>> import tempfile, torch
    >>> from deploypipe import load_model
    >>> from deploypipe.models import ModelRecord, build_model, save_model
    >>> record = ModelRecord(factory="zoo:digits_cnn", input_shape=[1, 8, 8], num_classes=10)
    >>> net = build_model(record)
    >>> again = load_model(save_model(net, record, tempfile.mkdtemp()))
    >>> all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    True
    """
    path = Path(path)
    model = build_model(read_record(path), trusted)
    _load_state(model, _read_state(path / "weights.pt", map_location), str(path / "weights.pt"), "this saved model")
    return model.eval()


def _read_state(path: Path, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"checkpoint '{path}' does not exist", "check the --checkpoint path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise InputError(f"checkpoint '{path}' cannot be read safely (weights_only=True): {str(err).splitlines()[0]}",
                         "save the weights with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model_state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint '{path}' is not a state dict",
                         "save it with torch.save(model.state_dict(), path)")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = "; ".join(x for x in (
            f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
            f"shape mismatch: {', '.join(shapes[:3])}" if shapes else "") if x)
        raise InputError(f"checkpoint '{source}' does not fit {what}: {detail}",
                         "pass the checkpoint saved from this model (and the same factory kwargs)")
    model.load_state_dict(state, strict=True)


def content_hash(path: str | Path) -> str:
    """sha256 over a file or a directory's files (names and bytes): the identity of an input."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- from a user's spec
def model_from_spec(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int,
                    mean: list[float], std: list[float],
                    fits: Optional[tuple[int, ...]] = None) -> tuple[nn.Module, ModelRecord]:
    """Build (and load) the model a pipeline starts from; checks it fits the data (images of shape
    ``fits`` when the first stage feeds it other than the data's, e.g. DRS half-images).

    - a saved model folder: reloaded as is;
    - ``zoo:NAME``: built for the data's channels, classes and normalisation statistics;
    - ``package.module:factory``: called with ``spec.kwargs``; wrapped in Normalize when the spec
      gives mean/std. ``spec.checkpoint`` is loaded into the user's model (before wrapping).
    """
    if is_model_dir(spec.spec):
        if spec.checkpoint:
            raise InputError("a saved model folder already holds its weights", "drop --checkpoint")
        record = read_record(spec.spec)
        model = load_model(spec.spec)
    elif spec.spec.startswith("zoo:"):
        kwargs = {"num_classes": num_classes, "in_channels": input_shape[0], "mean": mean, "std": std}
        if spec.spec == "zoo:vit_tiny":
            kwargs["image_size"] = input_shape[1]
        kwargs.update(spec.kwargs)
        record = ModelRecord(factory=spec.spec, kwargs=kwargs, input_shape=list(input_shape), num_classes=num_classes)
        model = build_model(record)
        if spec.checkpoint:
            _load_state(model, _read_state(Path(spec.checkpoint)), str(spec.checkpoint), spec.spec)
    else:
        trust_factories([spec.spec])  # named by the user: the pipeline's own model
        if Path(spec.spec).exists() and ":" not in spec.spec:
            raise InputError(f"'{spec.spec}' is a path but holds no model.json",
                             "give the model/ folder a stage wrote, or a package.module:factory spec")
        record = ModelRecord(factory=spec.spec, kwargs=dict(spec.kwargs),
                             normalize={"mean": spec.mean, "std": spec.std} if spec.mean else None,
                             input_shape=list(input_shape), num_classes=num_classes)
        model = build_model(record)
        if spec.checkpoint:  # the user's weights are for their own net, inside our Normalize wrapper
            target = model.net if record.normalize else model
            _load_state(target, _read_state(Path(spec.checkpoint)), str(spec.checkpoint), spec.spec)
    check_fits_data(model, fits or input_shape, num_classes, spec.spec)
    return model, record


def check_fits_data(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, name: str) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.rand(2, *input_shape))
    except Exception as err:
        raise InputError(f"model '{name}' cannot take input images of shape {tuple(input_shape)}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0]}",
                         "use a model built for this input size/channels, or set data.image_size") from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise InputError(f"model '{name}' outputs shape {tuple(out.shape)} but the data has {num_classes} classes",
                         f"build the model with {num_classes} outputs (e.g. kwargs: {{num_classes: {num_classes}}})")
