"""The evaluate stage: accuracy on the test split, per-class accuracy, size and latency."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from deploypipe.evaluation import latency_ms, parameter_count, state_bytes, storage_bytes
from deploypipe.stage import StageContext, StageResult, register

from .config import EvaluateConfig


def _confusion_figure(conf: torch.Tensor, classes: list[str]) -> Figure:
    k = len(classes)
    fig = Figure(figsize=(2.0 + 0.45 * k, 0.8 + 0.45 * k))
    ax = fig.subplots()
    rates = conf / conf.sum(1, keepdim=True).clamp_min(1)
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class's test images")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted class", ylabel="true class",
           title=f"confusion on {int(conf.sum())} test images")
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    ax.set_yticklabels(classes, fontsize=7)
    return fig


@register("evaluate")
def run(ctx: StageContext, cfg: EvaluateConfig) -> StageResult:
    model, test = ctx.model.eval(), ctx.data.test
    with torch.inference_mode():
        logits = torch.cat([model(x.to(ctx.device)).float().cpu() for x, _ in test.batches(cfg.batch_size)])
    pred = logits.argmax(1)
    loss = torch.nn.functional.cross_entropy(logits, test.labels).item()
    k = ctx.data.num_classes
    conf = torch.bincount(test.labels * k + pred, minlength=k * k).view(k, k)
    per_class = [{"class": c, "images": int(conf[i].sum()), "top1": float(conf[i, i] / conf[i].sum().clamp_min(1))}
                 for i, c in enumerate(ctx.data.classes)]
    ctx.save_table("per_class", per_class)
    ctx.save_figure(_confusion_figure(conf.float(), ctx.data.classes), "confusion")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        cpu_model = model.to("cpu")
        lat = latency_ms(cpu_model, ctx.data.input_shape, cfg.latency_batch_size, cfg.latency_repeats,
                         cfg.latency_warmup)
    finally:
        torch.set_num_threads(threads)
        model.to(ctx.device)
    metrics = {"test_top1": float((pred == test.labels).float().mean()), "test_loss": loss,
               "parameters": float(parameter_count(model)), "size_bytes": float(storage_bytes(model)),
               "state_dict_bytes": float(state_bytes(model)),
               "latency_ms_median": lat["median"], "latency_ms_p90": lat["p90"],
               "latency_batch_size": float(cfg.latency_batch_size), "test_images": float(len(test))}
    return StageResult(metrics=metrics)
