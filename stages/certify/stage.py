"""The certify stage: certified L2 robustness of the pipeline's current model (the one that ships,
quantized or sparse included) by randomized smoothing (RS) or dual randomized smoothing (DRS), with
sound radii (smoothing.py).

Images: every ``every``-th test image, or ``num_images`` evenly spaced ones (all when neither);
``shard: i/k`` keeps every k-th of those starting at i, for job arrays and torchrun ranks — the noise
of an image depends only on (seed, image index), so shards merge into exactly the unsharded result.
With ``reference`` (e.g. the FP32 model a quantize stage started from) the same images are
certified for it too, and the plot and metrics put the two side by side (robustness lost to
compression). With ``onnx`` the exported file itself is certified in ONNX Runtime — what ships.

Outputs: ``certify.csv`` (index, label, prediction, radius, correct, seconds, p_lower[, p_lower_right]),
certified accuracy at each radius in ``radii``, the average certified radius (ACR: mean over images
of the radius where the prediction is correct and certified, 0 otherwise), abstention rate,
throughput, and ``certified_accuracy.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal, Optional

import torch
from matplotlib.figure import Figure
from pydantic import Field, field_validator, model_validator

from deploypipe.config import Schema
from deploypipe.errors import InputError
from deploypipe.progress import log, progress
from deploypipe.stage import StageContext, StageResult, register, register_command

from .smoothing import ABSTAIN, certify_drs_images, certify_images, image_generator, split


class CertifyConfig(Schema):
    method: Literal["rs", "drs"] = Field("rs", description="randomized smoothing, or dual randomized smoothing (two half-images)")
    sigma: float = Field(0.25, gt=0, description="noise standard deviation in [0, 1] pixel units")
    n0: int = Field(100, ge=1, description="noisy samples to select the class")
    n: int = Field(100_000, ge=1, description="noisy samples to estimate its probability")
    alpha: float = Field(0.001, gt=0, lt=1, description="failure probability of each certificate")
    num_images: Optional[int] = Field(500, ge=1, description="test images, evenly spaced (null = all)")
    every: Optional[int] = Field(None, ge=1, description="every k-th test image (overrides num_images)")
    shard: Optional[str] = Field(None, description="i/k: certify only the i-th of k interleaved shards (0-based)")
    batch_size: int = Field(1000, ge=1, description="noisy copies per forward pass (halved on out-of-memory)")
    model_right: Optional[str] = Field(None, description="DRS: the right-side base classifier (a saved model/ folder); default: the pipeline's model for both sides")
    reference: Optional[str] = Field(None, description="a saved model/ folder certified on the same images for comparison (e.g. the FP32 model before quantization)")
    radii: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0, 1.5], description="radii at which certified accuracy is reported")
    channels_last: bool = Field(True, description="channels_last memory format for the base classifier")
    autocast: bool = Field(False, description="run the base classifier under autocast (float16 on CUDA, bfloat16 on CPU); noise and x + noise stay float32")
    onnx: Optional[str] = Field(None, description="certify this ONNX file (e.g. quantize's model.onnx) in ONNX Runtime instead of the pipeline's PyTorch model (rs)")

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

    @model_validator(mode="after")
    def _choice(self) -> "CertifyConfig":
        if self.model_right and self.method != "drs":
            raise ValueError("model_right is for method drs")
        if self.method == "drs" and (self.reference or self.onnx):
            raise ValueError("reference and onnx are supported with method rs")
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


def _run(models, ctx: StageContext, cfg: CertifyConfig, indices: list[int], label: str,
         device: torch.device) -> tuple[list[dict], float]:
    """Certify the images ``indices``, several per forward pass when n0 + n is small against the batch
    size (each image's result is the same as alone: its noise depends only on (seed, index))."""
    test = ctx.data.test
    num_classes = ctx.data.num_classes
    rows, t_all = [], time.perf_counter()
    batch = cfg.batch_size
    shared = cfg.method == "drs" and models[0] is models[1]
    per_image = (cfg.n0 + cfg.n) * (2 if shared else 1)
    size = max(1, batch // per_image)
    groups = [indices[i:i + size] for i in range(0, len(indices), size)]
    for group in progress(groups, total=len(indices), description=f"certify {label} ({cfg.method}, n={cfg.n})",
                          enabled=ctx.show_progress, unit="images", weight=len):
        xs = [test.as_float(test.images[i:i + 1])[0].to(device) for i in group]
        while True:
            gens = [image_generator(ctx.seed, i, device) for i in group]
            t0 = time.perf_counter()
            try:
                if cfg.method == "rs":
                    certs = certify_images(models[0], xs, cfg.sigma, cfg.n0, cfg.n, cfg.alpha, num_classes, batch, gens)
                else:
                    certs = certify_drs_images(models[0], models[1], xs, cfg.sigma, cfg.n0, cfg.n, cfg.alpha,
                                               num_classes, batch, gens)
                break
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2  # on the CPU the noise stream per image does not depend on the batch size
                torch.cuda.empty_cache()
                log(f"[{ctx.stage_id}] out of memory: batch size halved to {batch}")
        seconds = (time.perf_counter() - t0) / len(group)
        for index, cert in zip(group, certs):
            label_i = int(test.labels[index])
            row = {"index": index, "label": label_i, "prediction": cert.prediction, "radius": cert.radius,
                   "correct": int(cert.prediction == label_i), "seconds": seconds, "p_lower": cert.p_lower}
            if cert.p_lower_right is not None:
                row["p_lower_right"] = cert.p_lower_right
            rows.append(row)
    return rows, time.perf_counter() - t_all


class OnnxClassifier:
    """An ONNX classifier (input ``images`` in [0, 1], output logits) run by ONNX Runtime on CPU."""

    def __init__(self, path: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]).to(x.device)


class _Autocast(torch.nn.Module):
    """The base classifier under autocast; the noisy input arrives in float32, logits leave in float32."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device_type = model, torch.device(device).type
        self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def _prepare(model: torch.nn.Module, cfg: CertifyConfig, device) -> torch.nn.Module:
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return _Autocast(model, device) if cfg.autocast else model


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


from .merge import certify_merge  # noqa: E402  (the command needs this module's helpers)

register_command(certify_merge)


@register("certify", help="Certified L2 robustness by randomized smoothing (rs) or dual randomized smoothing (drs), sound radii")
def run(ctx: StageContext, cfg: CertifyConfig) -> StageResult:
    device = ctx.device
    if cfg.onnx:  # checked here, not in the config: an earlier stage of the pipeline may write it
        if not Path(cfg.onnx).is_file():
            raise InputError(f"certify onnx file '{cfg.onnx}' does not exist",
                             "give the path of an ONNX classifier (e.g. <out>/quantize/model.onnx)")
        device = torch.device("cpu")  # ONNX Runtime's CPU provider: noise and votes on the CPU
        model = OnnxClassifier(cfg.onnx)
        log(f"[{ctx.stage_id}] certifying the ONNX file {cfg.onnx} in ONNX Runtime")
    else:
        model = _prepare(ctx.model, cfg, device)
    if cfg.method == "drs":
        if ctx.data.input_shape[-1] % 2:
            raise InputError(f"DRS needs an even image width, the data has {ctx.data.input_shape[-1]}",
                             "use method rs or resize the images (--image-size)")
        right = _prepare(_load(cfg.model_right, "model_right"), cfg, device) if cfg.model_right else model
        models = (model, right)
        half = split(torch.zeros(1, *ctx.data.input_shape))[0].shape[1:]
        with torch.inference_mode():
            for m in models:
                m(torch.zeros(1, *half, device=device))  # fails early if a side model expects full images
    else:
        models = (model,)
    indices = select_images(len(ctx.data.test), cfg.num_images, cfg.every, cfg.shard)
    log(f"[{ctx.stage_id}] {cfg.method.upper()} on {len(indices)} test images, sigma {cfg.sigma}, n0 {cfg.n0}, "
        f"n {cfg.n}, alpha {cfg.alpha}{f', shard {cfg.shard}' if cfg.shard else ''}")
    rows, seconds = _run(models, ctx, cfg, indices, "model", device)
    ctx.save_table("certify", rows)
    metrics = summarize(rows, cfg.radii)
    samples = len(rows) * (cfg.n0 + cfg.n) * len(models)
    metrics.update({"images": float(len(rows)), "seconds_per_image": seconds / max(len(rows), 1),
                    "noise_samples_per_second": samples / max(seconds, 1e-9)})
    curves = {"this model": rows}
    if cfg.reference:
        ref = _prepare(_load(cfg.reference, "reference"), cfg, ctx.device)
        ref_rows, _ = _run((ref,), ctx, cfg, indices, "reference", ctx.device)
        ctx.save_table("certify_reference", ref_rows)
        metrics.update(summarize(ref_rows, cfg.radii, "reference_"))
        metrics["acr_lost"] = metrics["reference_acr"] - metrics["acr"]
        curves["reference"] = ref_rows
    ctx.save_figure(plot_curves(curves, cfg), "certified_accuracy")
    log(f"[{ctx.stage_id}] " + ", ".join(f"r={r:g}: {metrics[f'certified_acc_r{r:g}']:.3f}" for r in cfg.radii)
        + f"; ACR {metrics['acr']:.3f}; {metrics['seconds_per_image']:.2f} s/image")
    return StageResult(metrics=metrics)

