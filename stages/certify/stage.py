"""The certify stage: certified L2 robustness of the pipeline's current model (the one that ships,
quantized or sparse included) by randomized smoothing (RS) or dual randomized smoothing (DRS), with
sound radii (deploypipe/smoothing.py, shared with quantize's robustness-aware allocation).

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
from pathlib import Path

import torch

from deploypipe.data import half_image_shape
from deploypipe.errors import InputError
from deploypipe.progress import log
from deploypipe.stage import Preflight, StageContext, StageResult, register

from .classifier import (Autocast, base_classifier, check_outputs, load_saved, probe_halves, probe_images,
                         weights_hash)
from .config import CertifyConfig
from .report import plot_curves, reference_metrics, summarize
from .runner import certify_rows, reused_certificates, select_images
from .runtime import OnnxClassifier
from deploypipe.smoothing import DualSmoothed, Smoothed, split


def _smoothed(models: tuple, cfg: CertifyConfig, num_classes: int, seed: int, device: torch.device) -> Smoothed:
    """The smoothed classifier of the base classifier(s): RS of one, DRS of a left and a right side."""
    kwargs = {"batch_size": cfg.batch_size, "forward_batch": cfg.forward_batch or "auto", "seed": seed,
              "device": device}
    if cfg.method == "drs":
        return DualSmoothed(models[0], num_classes, cfg.sigma, right=models[1], **kwargs)
    return Smoothed(models[0], num_classes, cfg.sigma, **kwargs)


def model_input_shape(cfg: CertifyConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """DRS feeds the model (the left, or both sides) C x H x W/2 half-images; RS the data's images."""
    return half_image_shape(shape) if cfg.method == "drs" else tuple(shape)


def preflight(cfg: CertifyConfig, pre: Preflight) -> None:
    """Before the pipeline's first stage: the files this stage reads exist, or an earlier stage writes them."""
    for key, what, example in (("onnx", "an ONNX classifier", "<out>/quantize/model.onnx"),
                               ("reference", "a saved model/ folder", "<out>/train/model"),
                               ("model_right", "a saved model/ folder", "<out>/train-right/model")):
        path = getattr(cfg, key)
        if path and not pre.will_exist(path):
            raise ValueError(f"certify {key} '{path}' does not exist and no earlier stage of the pipeline writes it "
                             f"— fix: give the path of {what} (e.g. {example})")


@register("certify", distributed="shards", model_input_shape=model_input_shape, preflight=preflight)
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
    probe = probe_images(ctx.data.test, cfg.sigma, ctx.seed)
    if cfg.method == "drs":
        if ctx.data.input_shape[-1] % 2:
            raise InputError(f"DRS needs an even image width, the data has {ctx.data.input_shape[-1]}",
                             "use method rs or resize the images (--image-size)")
        half = half_image_shape(tuple(ctx.data.input_shape))
        left_probe, right_probe = split(probe)
        sides = [ctx.model] + ([load_saved(cfg.model_right, "model_right")] if cfg.model_right else [])
        with torch.inference_mode():
            for m in sides:
                try:
                    dev = next(iter(m.parameters()), torch.zeros(0)).device
                    m.eval()(torch.zeros(1, *half, device=dev))  # fails early if a side model expects full images
                except Exception as err:  # shape errors are RuntimeErrors, but a user's model may raise anything
                    raise InputError(f"a DRS side model does not take {half} half-images "
                                     f"({str(err).splitlines()[0][:100]})",
                                     "give models trained with --drs-side left/right") from None
        model = base_classifier(ctx.model, cfg, device, half, left_probe if cfg.model_right else probe_halves(probe),
                                ctx.data.num_classes, "left side" if cfg.model_right else "both sides", ctx.stage_id)
        right = (base_classifier(sides[1], cfg, device, half, right_probe, ctx.data.num_classes, "right side",
                                 ctx.stage_id) if cfg.model_right else model)
        models = (model, right)
    else:
        if not cfg.onnx:
            model = base_classifier(ctx.model, cfg, device, tuple(ctx.data.input_shape), probe, ctx.data.num_classes,
                                    "model", ctx.stage_id)
        models = (model,)
    num_classes = ctx.data.num_classes
    if cfg.method == "drs":
        check_outputs(models[0], left_probe[:2].to(device), num_classes,
                      "left side model" if cfg.model_right else "model")
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
        ref_model = load_saved(cfg.reference, "reference")
        ref_hash = weights_hash(ref_model)
        ref = base_classifier(ref_model, cfg, ctx.device, tuple(ctx.data.input_shape), probe, num_classes, "reference",
                              ctx.stage_id)
        check_outputs(ref, probe[:2].to(ctx.device), num_classes, "reference")
    reused, reused_ref = (reused_certificates(cfg, provenance, ref_hash if cfg.reference else None)
                          if cfg.reuse else (None, None))
    log(f"[{ctx.stage_id}] {cfg.method.upper()} on {len(indices)} test images, sigma {cfg.sigma}, n0 {cfg.n0}, "
        f"n {cfg.n}, alpha {cfg.alpha}{f', shard {shard}' if shard else ''}")
    identity = {**provenance, "indices": indices}
    rows, seconds = certify_rows(_smoothed(models, cfg, num_classes, ctx.seed, device), ctx.data.test, cfg, indices,
                                 ctx.work_dir / "model.jsonl", identity, reused, ctx.show_progress, ctx.stage_id)
    ctx.save_table("certify", rows)
    metrics = summarize(rows, cfg.radii)
    samples = len(rows) * (cfg.n0 + cfg.n) * len(models)
    metrics.update({"images": float(len(rows)), "seconds_per_image": seconds / max(len(rows), 1),
                    "noise_samples_per_second": samples / max(seconds, 1e-9)})
    if shard:  # what certify-merge checks (under torchrun the config itself has no shard)
        metrics["shard_index"], metrics["shard_count"] = (float(v) for v in shard.split("/"))
    metrics["onnxruntime"] = float(isinstance(models[0], OnnxClassifier))
    if isinstance(models[0], Autocast):
        metrics["autocast_top1_agreement"] = min(m.agreement for m in models)
    curves = {"this model": rows}
    if ref is not None:
        provenance["reference"] = ref_hash
        ref_rows, _ = certify_rows(_smoothed((ref,), cfg, num_classes, ctx.seed, ctx.device), ctx.data.test, cfg,
                                   indices, ctx.work_dir / "reference.jsonl", {**provenance, "indices": indices},
                                   reused_ref, ctx.show_progress, ctx.stage_id)
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
