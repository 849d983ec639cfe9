"""The certify stage: certified L2 robustness of the pipeline's current model (the one that ships,
quantized or sparse included) by randomized smoothing (RS) or dual randomized smoothing (DRS), with
sound radii (smoothing.py).

Images: every ``every``-th test image, or ``num_images`` evenly spaced ones (all when neither);
``shard: i/k`` keeps every k-th of those starting at i, for job arrays and torchrun ranks — the noise
of an image depends only on (seed, image index), so shards merge into exactly the unsharded result.
With ``reference`` (e.g. the FP32 model a quantize stage started from) the same images are
certified for it too, and the plot and metrics put the two side by side (robustness lost to
compression). With ``onnx`` the exported file itself is certified in ONNX Runtime — what ships.
With ``reuse`` an earlier output's certificates are read back for the images both runs select, when
its provenance (seed, data, weight hashes) and settings match — all but the image choice, the radii
and the forward chunk — so a certification grows from 100 images to 500 at the cost of the 400 new
ones, with the table a fresh run would give.

Outputs: ``certify.csv`` (index, label, prediction, radius, correct, seconds, p_lower, count[, p_lower_right,
count_right]; count = votes for the candidate among the n estimation copies, so anyone can recompute
the bound),
certified accuracy at each radius in ``radii``, the average certified radius (ACR: mean over images
of the radius where the prediction is correct and certified, 0 otherwise), abstention rate,
throughput, and ``certified_accuracy.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from matplotlib.figure import Figure
from pydantic import Field, field_validator, model_validator

from deploypipe.config import Schema
from deploypipe.data import half_image_shape
from deploypipe.errors import InputError
from deploypipe.progress import log, progress
from deploypipe.stage import StageContext, StageResult, register

from .runtime import OnnxClassifier, to_onnxruntime
from .smoothing import ABSTAIN, certify_drs_images, certify_images, image_generator, mix_seed, split


CPU_FORWARD_BATCH = 64  # CIFAR ResNet-20 on 2 cores: 1.1-1.2x (ONNX Runtime) and 1.3x (bfloat16) the rate at 1000
MIN_FORWARD_CHUNK = 8  # out of memory: halve the forward chunk down to this before the batch size (which changes the noise)


class CertifyConfig(Schema):
    method: Literal["rs", "drs"] = Field("rs", description="randomized smoothing, or dual randomized smoothing (two half-images)")
    sigma: float = Field(0.25, gt=0, description="noise standard deviation in [0, 1] pixel units")
    n0: int = Field(100, ge=1, description="noisy samples to select the class")
    n: int = Field(100_000, ge=1, description="noisy samples to estimate its probability")
    alpha: float = Field(0.001, gt=0, lt=1, description="failure probability of each certificate")
    num_images: Optional[int] = Field(500, ge=1, description="test images, evenly spaced (null = all)")
    every: Optional[int] = Field(None, ge=1, description="every k-th test image (instead of num_images; give one of the two)")
    shard: Optional[str] = Field(None, description="i/k: certify only the i-th of k interleaved shards (0-based)")
    batch_size: int = Field(1000, ge=1, description="noisy copies drawn per step (halved on out-of-memory)")
    forward_batch: Optional[int] = Field(None, ge=1, description=f"the model sees each step's copies in chunks of this many (the noise does not depend on it); null = {CPU_FORWARD_BATCH} on the CPU, whose caches favour small batches, the whole step on a GPU")
    model_right: Optional[str] = Field(None, description="DRS: the right-side base classifier (a saved model/ folder); default: the pipeline's model for both sides")
    reference: Optional[str] = Field(None, description="a saved model/ folder certified on the same images for comparison (e.g. the FP32 model before quantization)")
    radii: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0, 1.5], min_length=1,
                               description="radii at which certified accuracy is reported (at least one, each >= 0)")
    channels_last: bool = Field(True, description="channels_last memory format for the base classifier")
    autocast: bool = Field(False, description="run the base classifier under autocast (float16 on CUDA, bfloat16 on CPU); noise and x + noise stay float32")
    onnx: Optional[str] = Field(None, description="certify this ONNX file (e.g. quantize's model.onnx) in ONNX Runtime instead of the pipeline's PyTorch model (rs)")
    runtime: Literal["auto", "torch", "onnxruntime"] = Field("auto", description="where the base classifier runs: auto = ONNX Runtime on the CPU when the exported model agrees with PyTorch on noisy probes (1.3-2.5x faster there), else PyTorch")
    reuse: Optional[str] = Field(None, description="an earlier certify output folder (<out>/certify) of the same classifiers, seed, data and settings: its certificates of images this run selects are read back instead of recomputed (e.g. to grow 100 images to 500)")

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
                raise ValueError("give num_images or every, not both (every k-th test image replaces the evenly spaced num_images)")
            data = {**data, "num_images": None}  # the saved config says which images were certified
        return data

    @model_validator(mode="after")
    def _choice(self) -> "CertifyConfig":
        if self.model_right and self.method != "drs":
            raise ValueError("model_right is for method drs")
        if self.method == "drs" and (self.reference or self.onnx):
            raise ValueError("reference and onnx are supported with method rs")
        if self.runtime == "onnxruntime" and self.autocast:
            raise ValueError("autocast is PyTorch's: use runtime torch (or auto) with autocast")
        return self


def select_images(total: int, num_images: Optional[int], every: Optional[int], shard: Optional[str]) -> list[int]:
    """Test-set indices to certify (before and after sharding)."""
    if every is not None:
        idx = list(range(0, total, every))
    elif num_images is not None and num_images < total:
        idx = sorted({int(i * total / num_images) for i in range(num_images)})
    else:
        idx = list(range(total))
    if shard:
        i, k = (int(p) for p in shard.split("/"))
        idx = idx[i::k]
    return idx


def summarize(rows: list[dict], radii: list[float], prefix: str = "") -> dict[str, float]:
    n = max(len(rows), 1)
    out = {f"{prefix}certified_acc_r{r:g}": sum(1 for x in rows if x["correct"] and x["radius"] >= r) / n
           for r in radii}  # an abstention is never correct
    out[f"{prefix}acr"] = sum(x["radius"] for x in rows if x["correct"]) / n
    out[f"{prefix}abstain_rate"] = sum(1 for x in rows if x["prediction"] == ABSTAIN) / n
    return out


def reference_metrics(rows: list[dict], ref_rows: list[dict], radii: list[float]) -> dict[str, float]:
    """The reference's metrics (``reference_`` prefix) and the ACR lost against it."""
    out = summarize(ref_rows, radii, "reference_")
    out["acr_lost"] = out["reference_acr"] - summarize(rows, radii)["acr"]
    return out


def _resume(path: Path, identity: dict, indices: list[int]) -> list[dict]:
    """Rows an interrupted run of the same stage (same config, data, seed and weights: ``identity``)
    already certified, read back from its journal; a journal of other weights is discarded."""
    try:
        lines = path.read_text().splitlines()
        if not lines or json.loads(lines[0]) != identity:
            return []
        wanted = set(indices)
        rows = []
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                break
            if row.get("index") in wanted:
                rows.append(row)
        return rows
    except (OSError, json.JSONDecodeError):
        return []


# settings that do not change an image's certificate: which images, the reported radii, the forward
# chunk (same noise), the comparison model and the paths whose weights provenance.json hashes
REUSE_FREE = ("every", "num_images", "shard", "radii", "forward_batch", "reference", "reuse", "onnx", "model_right")


def reused_certificates(cfg: CertifyConfig, provenance: dict, ref_hash: Optional[str]) -> tuple[list[dict], Optional[list[dict]]]:
    """The rows (and reference rows) of the earlier output ``cfg.reuse``, after checking it certified the
    same seed, data and weights with the same settings; refused with a one-line error otherwise."""
    from .merge import _read_shard, _settings  # merge imports this module

    folder = Path(cfg.reuse)
    if not folder.is_dir():
        raise InputError(f"certify reuse '{folder}' is not a folder", "give an earlier run's <out>/certify folder")
    old_cfg, rows, old_prov, ref_rows = _read_shard(folder)
    if not old_prov:
        raise InputError(f"certify reuse '{folder}' has no provenance.json (written by an older version)",
                         "certify without reuse")
    diff = [k for k in ("seed", "data", "test_images", "model", "model_right") if old_prov.get(k) != provenance.get(k)]
    if diff:
        raise InputError(f"certify reuse '{folder}' certified another {', '.join(diff)} (provenance.json)",
                         "reuse an output of the same models, seed and data, or drop reuse")
    mine = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in REUSE_FREE}
    theirs = CertifyConfig.model_validate(_settings(old_cfg)).model_dump(mode="json")  # shard dropped there
    diff = sorted(k for k in mine if theirs.get(k) != mine[k])
    if diff:
        raise InputError(f"certify reuse '{folder}' was certified with other settings ({', '.join(diff)})",
                         "reuse an output certified with the same sigma, n, n0, alpha, batch size and runtime")
    same_ref = ref_rows is not None and ref_hash is not None and old_prov.get("reference") == ref_hash
    return rows, (ref_rows if same_ref else None)


def _run(models, ctx: StageContext, cfg: CertifyConfig, indices: list[int], label: str,
         device: torch.device, identity: dict, reused: Optional[list[dict]] = None) -> tuple[list[dict], float]:
    """Certify the images ``indices``, several per noise step when n0 + n is small against the batch
    size (each image's result is the same as alone: its noise depends only on (seed, index)). On
    out-of-memory the forward chunk is halved first (the same noise), then the batch size.
    Every finished image is journaled in the stage's work directory; an interrupted run resumes from
    it with the same certificates (the pipeline keeps that directory only for the same stage key)."""
    test = ctx.data.test
    num_classes = ctx.data.num_classes
    journal = ctx.work_dir / f"{label}.jsonl"
    rows = _resume(journal, identity, indices)
    done = {r["index"] for r in rows}
    if rows:
        log(f"[{ctx.stage_id}] resumed {len(rows)} of {len(indices)} images ({label}) from an interrupted run")
    wanted = set(indices)
    earlier = [r for r in reused or [] if r["index"] in wanted and r["index"] not in done]
    if reused is not None:
        log(f"[{ctx.stage_id}] reused {len(earlier)} of {len(indices)} images ({label}) from {cfg.reuse}")
    rows += earlier
    done |= {r["index"] for r in earlier}
    seconds_before = sum(r["seconds"] for r in rows)  # the reused certificates' own time
    journal.write_text("".join(json.dumps(r) + "\n" for r in [identity, *rows]))  # no line cut short
    todo = [i for i in indices if i not in done]
    t_all = time.perf_counter()
    batch = cfg.batch_size
    forward = cfg.forward_batch or (CPU_FORWARD_BATCH if torch.device(device).type == "cpu" else None)
    shared = cfg.method == "drs" and models[0] is models[1]
    per_image = (cfg.n0 + cfg.n) * (2 if shared else 1)
    size = max(1, batch // per_image)
    groups = [todo[i:i + size] for i in range(0, len(todo), size)]
    for group in progress(groups, total=len(todo), description=f"certify {label} ({cfg.method}, n={cfg.n})",
                          enabled=ctx.show_progress, unit="images", weight=len):
        xs = [test.as_float(test.images[i:i + 1])[0].to(device) for i in group]
        while True:
            gens = [image_generator(ctx.seed, i, device) for i in group]
            t0 = time.perf_counter()
            try:
                if cfg.method == "rs":
                    certs = certify_images(models[0], xs, cfg.sigma, cfg.n0, cfg.n, cfg.alpha, num_classes, batch, gens,
                                           forward)
                else:
                    certs = certify_drs_images(models[0], models[1], xs, cfg.sigma, cfg.n0, cfg.n, cfg.alpha,
                                               num_classes, batch, gens, forward)
                break
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5 on
                torch.cuda.empty_cache()
                chunk = min(forward or batch, batch)
                if chunk > MIN_FORWARD_CHUNK:  # the activations are most of the memory; the noise stays the same
                    forward = chunk // 2
                    log(f"[{ctx.stage_id}] out of memory: the model now sees chunks of {forward} (the same noise)")
                    continue
                if batch == 1:
                    raise
                batch //= 2
                # noise is drawn in chunks of the batch size: smaller chunks give other (equally valid)
                # noise, so this run's figures match a run at the full batch size only within MC error
                log(f"[{ctx.stage_id}] out of memory: batch size halved to {batch} (other noise draws from here on: "
                    f"for bit-for-bit reproducible shards give every run --batch-size {batch})")
        seconds = (time.perf_counter() - t0) / len(group)
        new = []
        for index, cert in zip(group, certs):
            label_i = int(test.labels[index])
            row = {"index": index, "label": label_i, "prediction": cert.prediction, "radius": cert.radius,
                   "correct": int(cert.prediction == label_i), "seconds": seconds, "p_lower": cert.p_lower,
                   "count": cert.count}
            if cert.p_lower_right is not None:
                row.update(p_lower_right=cert.p_lower_right, count_right=cert.count_right)
            new.append(row)
        with open(journal, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in new))
        rows += new
    order = {index: k for k, index in enumerate(indices)}
    rows.sort(key=lambda r: order[r["index"]])
    return rows, seconds_before + time.perf_counter() - t_all


class _Autocast(torch.nn.Module):
    """The base classifier under autocast; the noisy input arrives in float32, logits leave in float32."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device_type = model, torch.device(device).type
        self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        self.agreement = float("nan")  # top-1 agreement with float32 on noisy probes, set by _classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def _prepare(model: torch.nn.Module, cfg: CertifyConfig, device) -> torch.nn.Module:
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return _Autocast(model, device) if cfg.autocast else model


def _classifier(model: torch.nn.Module, ctx: StageContext, cfg: CertifyConfig, device: torch.device,
                shape: tuple[int, ...], probe: torch.Tensor, what: str):
    """The base classifier as it will run: ONNX Runtime (runtime auto on the CPU, or onnxruntime) when
    the export agrees with PyTorch on ``probe``, else PyTorch (channels_last, autocast)."""
    if cfg.runtime == "onnxruntime" and device.type != "cpu":
        raise InputError(f"certify runtime onnxruntime runs on the CPU, the device is {device}",
                         "use --runtime torch (or auto) on a GPU, or --device cpu")
    if cfg.runtime == "onnxruntime" or (cfg.runtime == "auto" and device.type == "cpu" and not cfg.autocast):
        import copy

        session, why = to_onnxruntime(copy.deepcopy(model), shape, probe)
        log(f"[{ctx.stage_id}] {what}: {why}" + ("" if session else "; certifying in PyTorch"))
        if session is not None:
            return session
        if cfg.runtime == "onnxruntime":
            raise InputError(f"certify runtime onnxruntime: {why}", "use --runtime torch (or auto)")
    prepared = _prepare(model, cfg, device)
    if isinstance(prepared, _Autocast):  # the certificate is for the reduced-precision classifier: say how close it is
        check_outputs(model, probe[:2].to(device), ctx.data.num_classes, what)  # a misfit model: exit 2, first
        with torch.inference_mode():
            x = probe.to(device)
            want = torch.cat([model(c) for c in x.split(CPU_FORWARD_BATCH)]).argmax(1)  # float32, same module
            got = torch.cat([prepared(c) for c in x.split(CPU_FORWARD_BATCH)]).argmax(1)
        prepared.agreement = float((got == want).float().mean())
        log(f"[{ctx.stage_id}] {what}: under autocast ({prepared.dtype}) the top-1 agrees with float32 on "
            f"{100 * prepared.agreement:.2f}% of {x.shape[0]} noisy probes; the certificate is for the {prepared.dtype} classifier")
    return prepared


def _probe(ctx: StageContext, cfg: CertifyConfig) -> torch.Tensor:
    """Noisy copies of the first test images (32 each of up to 8): the ONNX Runtime parity check, the
    autocast agreement and the output-shape checks run on them."""
    x = ctx.data.test.as_float(ctx.data.test.images[:8]).repeat_interleave(32, 0)
    g = torch.Generator().manual_seed(mix_seed(ctx.seed, 2))  # not any image's certification noise
    return x + cfg.sigma * torch.randn(x.shape, generator=g)


def probe_halves(probe: torch.Tensor) -> torch.Tensor:
    """Both DRS halves of the probe images, stacked (for one model serving both sides)."""
    return torch.cat(split(probe))


def check_outputs(classifier, inputs: torch.Tensor, num_classes: int, what: str) -> None:
    """The base classifier must return one logit per class: a wider output would put votes in the
    wrong counts (smoothing.vote_counts also refuses it, mid-run; this says so before any work)."""
    with torch.inference_mode():
        try:
            out = classifier(inputs)
        except Exception as err:  # wrong input shape or channels: the model was made for other data
            raise InputError(f"certify {what} does not run on inputs of shape {tuple(inputs.shape[1:])} "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:100]})",
                             "give a model trained on this dataset (for DRS: on its half-images)") from None
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise InputError(f"certify {what} returns outputs of shape {tuple(out.shape[1:])}, the data has "
                         f"{num_classes} classes", "give a classifier trained on this dataset's classes")


def weights_hash(model) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, bytes), or of an ONNX
    file's bytes: which classifier a shard certified (certify-merge compares them)."""
    import hashlib

    if isinstance(model, OnnxClassifier):
        return model.digest
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load(path: str, what: str):
    from deploypipe.models import is_model_dir, load_model

    if not is_model_dir(path):
        raise InputError(f"certify {what} '{path}' is not a saved model folder (no model.json)",
                         "give the model/ folder a stage wrote")
    return load_model(path)


def plot_curves(curves: dict[str, list[dict]], cfg: CertifyConfig) -> Figure:
    """Certified accuracy against the radius, one curve per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    top = max([r["radius"] for rows in curves.values() for r in rows] + [max(cfg.radii)])
    grid = torch.linspace(0, top * 1.05, 200).tolist()
    for name, rows in curves.items():
        n = max(len(rows), 1)
        ax.plot(grid, [100 * sum(1 for x in rows if x["correct"] and x["radius"] >= r) / n for r in grid], label=name)
    ax.set(xlabel="L2 radius", ylabel="certified accuracy (%)",
           title=f"{cfg.method.upper()}, sigma={cfg.sigma}, n={cfg.n}, alpha={cfg.alpha}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def model_input_shape(cfg: CertifyConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """DRS feeds the model (the left, or both sides) C x H x W/2 half-images; RS the data's images."""
    return half_image_shape(shape) if cfg.method == "drs" else tuple(shape)


@register("certify", help="Certified L2 robustness by randomized smoothing (rs) or dual randomized smoothing (drs), sound radii",
          splits_over_ranks=True, model_input_shape=model_input_shape)
def run(ctx: StageContext, cfg: CertifyConfig) -> StageResult:
    device = ctx.device
    shard = cfg.shard
    if ctx.world_size > 1:  # torchrun: rank r of k certifies shard r/k into <out>/rank<r>/
        if shard:
            raise InputError(f"certify shard {shard} given under torchrun, which already splits the images over "
                             f"its {ctx.world_size} ranks", "drop --shard (each rank takes shard RANK/WORLD_SIZE)")
        shard = f"{ctx.rank}/{ctx.world_size}"
    if cfg.onnx:  # checked here, not in the config: an earlier stage of the pipeline may write it
        if not Path(cfg.onnx).is_file():
            raise InputError(f"certify onnx file '{cfg.onnx}' does not exist",
                             "give the path of an ONNX classifier (e.g. <out>/quantize/model.onnx)")
        device = torch.device("cpu")  # ONNX Runtime's CPU provider: noise and votes on the CPU
        try:
            model = OnnxClassifier(cfg.onnx, torch.get_num_threads())
        except Exception as err:  # ONNX Runtime's own (pybind) errors: not a protobuf, unknown op, ...
            raise InputError(f"certify onnx file '{cfg.onnx}' cannot be loaded by ONNX Runtime "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:120]})",
                             "give an ONNX classifier (e.g. <out>/quantize/model.onnx), not another file") from None
        log(f"[{ctx.stage_id}] certifying the ONNX file {cfg.onnx} in ONNX Runtime")
    probe = _probe(ctx, cfg)
    if cfg.method == "drs":
        if ctx.data.input_shape[-1] % 2:
            raise InputError(f"DRS needs an even image width, the data has {ctx.data.input_shape[-1]}",
                             "use method rs or resize the images (--image-size)")
        half = half_image_shape(tuple(ctx.data.input_shape))
        left_probe, right_probe = split(probe)
        sides = [ctx.model] + ([_load(cfg.model_right, "model_right")] if cfg.model_right else [])
        with torch.inference_mode():
            for m in sides:
                try:
                    dev = next(iter(m.parameters()), torch.zeros(0)).device
                    m.eval()(torch.zeros(1, *half, device=dev))  # fails early if a side model expects full images
                except Exception as err:  # shape errors are RuntimeErrors, but a user's model may raise anything
                    raise InputError(f"a DRS side model does not take {half} half-images ({str(err).splitlines()[0][:100]})",
                                     "give models trained with --drs-side left/right") from None
        model = _classifier(ctx.model, ctx, cfg, device, half, left_probe if cfg.model_right else probe_halves(probe),
                            "left side" if cfg.model_right else "both sides")
        right = (_classifier(sides[1], ctx, cfg, device, half, right_probe, "right side") if cfg.model_right else model)
        models = (model, right)
    else:
        if not cfg.onnx:
            model = _classifier(ctx.model, ctx, cfg, device, tuple(ctx.data.input_shape), probe, "model")
        models = (model,)
    num_classes = ctx.data.num_classes
    if cfg.method == "drs":
        check_outputs(models[0], left_probe[:2].to(device), num_classes, "left side model" if cfg.model_right else "model")
        if cfg.model_right:
            check_outputs(models[1], right_probe[:2].to(device), num_classes, "model_right")
    else:
        check_outputs(models[0], probe[:2].to(device), num_classes, "onnx file" if cfg.onnx else "model")
    indices = select_images(len(ctx.data.test), cfg.num_images, cfg.every, shard)
    provenance = {"seed": ctx.seed, "data": ctx.data.fingerprint, "test_images": len(ctx.data.test),
                  "model": weights_hash(models[0]) if cfg.onnx else weights_hash(ctx.model),
                  "model_right": weights_hash(sides[1]) if cfg.method == "drs" and cfg.model_right else None,
                  "reference": None}
    ref = None
    if cfg.reference:  # loaded and checked before hours of certifying the model, not after
        ref_model = _load(cfg.reference, "reference")
        ref_hash = weights_hash(ref_model)
        ref = _classifier(ref_model, ctx, cfg, ctx.device, tuple(ctx.data.input_shape), probe, "reference")
        check_outputs(ref, probe[:2].to(ctx.device), num_classes, "reference")
    reused, reused_ref = (reused_certificates(cfg, provenance, ref_hash if cfg.reference else None)
                          if cfg.reuse else (None, None))
    log(f"[{ctx.stage_id}] {cfg.method.upper()} on {len(indices)} test images, sigma {cfg.sigma}, n0 {cfg.n0}, "
        f"n {cfg.n}, alpha {cfg.alpha}{f', shard {shard}' if shard else ''}")
    rows, seconds = _run(models, ctx, cfg, indices, "model", device, {**provenance, "indices": indices}, reused)
    ctx.save_table("certify", rows)
    metrics = summarize(rows, cfg.radii)
    samples = len(rows) * (cfg.n0 + cfg.n) * len(models)
    metrics.update({"images": float(len(rows)), "seconds_per_image": seconds / max(len(rows), 1),
                    "noise_samples_per_second": samples / max(seconds, 1e-9)})
    if shard:  # what certify-merge checks (under torchrun the config itself has no shard)
        metrics["shard_index"], metrics["shard_count"] = (float(v) for v in shard.split("/"))
    metrics["onnxruntime"] = float(isinstance(models[0], OnnxClassifier))
    if isinstance(models[0], _Autocast):
        metrics["autocast_top1_agreement"] = min(m.agreement for m in models)
    curves = {"this model": rows}
    if ref is not None:
        provenance["reference"] = ref_hash
        ref_rows, _ = _run((ref,), ctx, cfg, indices, "reference", ctx.device,
                           {**provenance, "indices": indices}, reused_ref)
        ctx.save_table("certify_reference", ref_rows)
        metrics.update(reference_metrics(rows, ref_rows, cfg.radii))
        curves["reference"] = ref_rows
    ctx.save_figure(plot_curves(curves, cfg), "certified_accuracy")
    (ctx.out_dir / "provenance.json").write_text(json.dumps(provenance))  # what certify-merge checks
    if ctx.world_size > 1 and ctx.rank == 0:
        log(f"[{ctx.stage_id}] rank 0 of {ctx.world_size}: when every rank has finished, merge with "
            f"'deploypipe certify-merge <out>/rank*/{ctx.stage_id} --out <out>/merged'")
    log(f"[{ctx.stage_id}] " + ", ".join(f"r={r:g}: {metrics[f'certified_acc_r{r:g}']:.3f}" for r in cfg.radii)
        + f"; ACR {metrics['acr']:.3f}; {metrics['seconds_per_image']:.2f} s/image")
    return StageResult(metrics=metrics)


from . import merge as _merge_command  # noqa: E402,F401  (last: it registers certify-merge, using this module)
