"""The sparsify stage: train the selected layers into an N:M pattern with SR-STE, MDGF or SDGF, then
hard-mask them, verify the pattern, and write the compressed weights.

Fine-tunes the input model by default (``from_scratch`` re-initialises it first). The output model
has the same architecture with exact zeros where the pattern prunes, and a ``sparsify`` transform
record ({layer: "N:M"}) so that quantize keeps the pattern and the checker knows what to check.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Literal, Optional

import click
import torch
from matplotlib.figure import Figure
from pydantic import Field, field_validator, model_validator

from deploypipe.config import Schema
from deploypipe.errors import InputError
from deploypipe.evaluation import top1_and_loss
from deploypipe.kernels.dispatch import interpreter_requested
from deploypipe.kernels.nm_compress import nm_compress, nm_decompress, pack_positions, packed_index_bits
from deploypipe.progress import log
from deploypipe.stage import StageContext, StageResult, register, register_command
from deploypipe.stages.train.loop import make_optimizer, make_scheduler, train_epoch

from .checker import check_model, check_path
from .patterns import TRANSFORM_MODULE, Pattern, from_reduction_view, reduction_view, select_sparse_layers
from .schedules import SRSTE_LAMBDA, Decay, Recipe, default_schedule, parse_schedule
from .sparse_layer import harden, set_state, wrap_sparse


class SparsifyConfig(Schema):
    pattern: str = Field("2:4", description="target N:M pattern along the reduction dimension, e.g. 2:4, 1:8, 1:16")
    recipe: Literal["srste", "mdgf", "sdgf"] = Field("srste", description="SR-STE (baseline), mask decay (MDGF) or structure decay (SDGF)")
    decay: str = Field("exp:auto", description="MDGF decay of the pruned weights' multiplier α per optimizer step: exp:RATE (α = exp(-RATE·t)), linear:RATE (α = max(0, 1 - RATE·t)), or exp:auto / linear:auto (α reaches 1e-3 / 0 at the end of the sparse phase, whatever the epochs); the paper's long schedules used exp:2e-3 (ResNet-50) and exp:1e-4 (ViT)")
    schedule: Optional[str] = Field(None, description="SDGF patterns over the sparse phase, ending at the target, e.g. 7:8,4:8,2:8,1:8 or 8:64,4:32,2:16,1:8; default: (M-1):M halving down to the target")
    srste_lambda: Optional[float] = Field(None, ge=0, description="λ of the SR-STE regulariser on pruned weights; default 2e-4 for srste, 0 for mdgf/sdgf")
    epochs: int = Field(10, ge=1, description="training epochs (all phases)")
    dense_fraction: float = Field(0.0, ge=0, lt=1, description="share of the steps trained dense first")
    sparse_fraction: float = Field(0.7, gt=0, le=1, description="share of the steps in the sparse (decay) phase; the rest fine-tunes with the hard target mask")
    from_scratch: bool = Field(False, description="re-initialise the weights instead of fine-tuning the input model")
    include: list[str] = Field(["*"], description="glob patterns of layer names to sparsify")
    exclude: list[str] = Field([], description="glob patterns of layer names to keep dense")
    keep_first_last: bool = Field(True, description="keep the first and last layer dense")
    batch_size: int = Field(128, ge=1, description="images per optimizer step")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (Nesterov momentum) or AdamW")
    lr: float = Field(0.02, gt=0, description="peak learning rate (fine-tuning; raise it from scratch)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (not on biases/norms)")
    schedule_lr: Literal["cosine", "onecycle", "constant"] = Field("cosine", description="learning-rate schedule")
    warmup_epochs: float = Field(0.0, ge=0, description="linear learning-rate warm-up")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    augment: bool = Field(True, description="use the data's standard augmentation")
    channels_last: bool = Field(True, description="channels-last memory format for conv nets")
    eval_every: int = Field(1, ge=0, description="evaluate on the test split every N epochs (0 = only at the end)")
    kernels: Literal["auto", "triton", "reference"] = Field("auto", description="kernel backend: Triton on CUDA (auto), Triton always (on CPU: the interpreter, needs TRITON_INTERPRET=1), or the PyTorch reference")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return str(Pattern.parse(v))

    @field_validator("decay")
    @classmethod
    def _decay(cls, v: str) -> str:
        return str(Decay.parse(v))

    @model_validator(mode="after")
    def _schedule(self) -> "SparsifyConfig":
        self.patterns()  # checked before anything runs
        return self

    def patterns(self) -> tuple[Pattern, ...]:
        """The SDGF schedule (empty for the other recipes)."""
        target = Pattern.parse(self.pattern)
        if self.recipe == "sdgf":
            return tuple(parse_schedule(self.schedule, target) if self.schedule else default_schedule(target))
        if self.schedule:
            raise InputError(f"--schedule is for the sdgf recipe, not {self.recipe}", "add --recipe sdgf or drop --schedule")
        return ()

    def recipe_for(self, total_steps: int) -> Recipe:
        target, schedule = Pattern.parse(self.pattern), self.patterns()
        lam = self.srste_lambda if self.srste_lambda is not None else (SRSTE_LAMBDA if self.recipe == "srste" else 0.0)
        return Recipe(self.recipe, target, total_steps, self.dense_fraction, self.sparse_fraction,
                      Decay.parse(self.decay), schedule, lam)


def _reinitialise(model: torch.nn.Module) -> None:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _layer_table(model: torch.nn.Module, names: list[str], pattern: Pattern) -> list[dict]:
    rows = []
    for row in check_model(model, {n: pattern for n in names}):
        w = model.get_submodule(row["layer"]).weight
        rows.append({**row, "params": w.numel(), "nonzero": int((w != 0).sum())})
    return rows


def _plots(history: list[dict], steps: list[dict], table: list[dict], skipped: list[dict],
           reference: dict[str, float]) -> Figure:
    fig = Figure(figsize=(15, 4))
    a, b, c = fig.subplots(1, 3)
    a.plot([s["step"] for s in steps], [s["alpha"] for s in steps], label="α (pruned-weight multiplier)")
    a.plot([s["step"] for s in steps], [s["density"] for s in steps], label="pattern density N/M")
    a.set(xlabel="optimizer step", title="sparsity schedule", ylim=(-0.05, 1.05))
    ep = [h["epoch"] for h in history]
    b.plot(ep, [100 * h["train_top1"] for h in history], ".-", label="train (augmented)")
    tested = [h for h in history if "test_top1" in h]
    b.plot([h["epoch"] for h in tested], [100 * h["test_top1"] for h in tested], "o-", label="test")
    for (label, top1), style in zip(reference.items(), ("--", ":")):  # the dense model, pruned without training
        b.axhline(100 * top1, color="gray", linestyle=style, label=f"{label} (test)")
    b.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    names = [r["layer"] for r in table + skipped]
    values = [100 * r["sparsity"] for r in table] + [0.0] * len(skipped)
    c.barh(range(len(names)), values, color=["tab:blue"] * len(table) + ["tab:gray"] * len(skipped))
    c.set_yticks(range(len(names)), names, fontsize=6)
    c.invert_yaxis()
    c.set(xlabel="zeros (%)", title="per-layer sparsity (gray: kept dense)", xlim=(0, 100))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def _compress(model: torch.nn.Module, names: list[str], pattern: Pattern) -> tuple[dict, dict[str, float]]:
    """{layer: {values, positions (bit-packed), shape, pattern}} and its size metrics; checked exact."""
    out, dense_bits, sparse_bits = {}, 0, 0.0
    for name in names:
        w = model.get_submodule(name).weight.detach()
        matrix = reduction_view(w).contiguous()
        values, positions = nm_compress(matrix, pattern.n, pattern.m, "reference")
        if not torch.equal(from_reduction_view(nm_decompress(values, positions, pattern.n, pattern.m), w.shape), w):
            raise RuntimeError(f"compressing {name} at {pattern} is not exact: the layer is not {pattern}-sparse")
        out[name] = {"values": values.clone(), "positions": pack_positions(positions, pattern.m),
                     "count": positions.numel(), "shape": list(w.shape), "pattern": str(pattern),
                     "layout": "rows of the (out, kh*kw*in) reduction view; positions bit-packed, ceil(log2 M) bits"}
        dense_bits += 32 * w.numel()
        sparse_bits += packed_index_bits(pattern.n, pattern.m, 32) * w.numel()
    return out, {"sparse_layers_dense_bytes": dense_bits / 8, "sparse_layers_compressed_bytes": sparse_bits / 8,
                 "compressed_bits_per_weight_fp16": packed_index_bits(pattern.n, pattern.m, 16),
                 "compressed_bits_per_weight_fp32": packed_index_bits(pattern.n, pattern.m, 32)}


@click.command("check-sparsity", help="Check that a saved model folder or an ONNX file is N:M sparse; exit 1 if a layer breaks its pattern.")
@click.argument("path")
@click.option("--pattern", default=None, help="N:M to check (default: the patterns the model records; required for ONNX)")
@click.option("--layers", "layers", multiple=True, default=("*",), show_default=True, help="glob patterns of layer / weight names")
@click.option("--json", "as_json", is_flag=True, help="print the table as JSON")
def check_sparsity(path: str, pattern: Optional[str], layers: tuple[str, ...], as_json: bool) -> None:
    import json

    rows = check_path(path, Pattern.parse(pattern) if pattern else None, layers)
    if not rows:
        raise InputError(f"no layer of '{path}' can hold the pattern{' ' + pattern if pattern else ''}",
                         "check --pattern and --layers (reduction sizes must be multiples of M)")
    bad = [r for r in rows if not r["ok"]]
    if as_json:
        click.echo(json.dumps({"ok": not bad, "layers": rows}))
    else:
        for r in rows:
            click.echo(f"{'ok  ' if r['ok'] else 'FAIL'} {r['layer']:<40} {r['shape']:<16} {r['pattern']:<6} "
                       f"zeros {100 * r['sparsity']:5.1f}%  groups breaking it {r['violating_groups']}/{r['groups']}")
        click.echo(f"{len(rows) - len(bad)} of {len(rows)} layers hold their pattern")
    raise SystemExit(1 if bad else 0)


register_command(check_sparsity)


@register("sparsify", help="N:M structured sparsity by training: SR-STE, mask decay (MDGF), structure decay (SDGF)")
def run(ctx: StageContext, cfg: SparsifyConfig) -> StageResult:
    model, data, device = ctx.model, ctx.data, ctx.device
    if cfg.kernels == "triton" and device.type != "cuda" and not interpreter_requested():
        raise InputError("--kernels triton on CPU runs Triton's interpreter, which needs TRITON_INTERPRET=1 "
                         "in the environment", "set TRITON_INTERPRET=1 (slow), or use --kernels auto on CPU")
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    recipe = cfg.recipe_for(total)
    target = recipe.target
    names, skipped = select_sparse_layers(model, recipe.group_sizes(), cfg.include, cfg.exclude, cfg.keep_first_last)
    for row in skipped:
        log(f"[{ctx.stage_id}] kept dense: {row['layer']} ({row['reason']})")
    if not names:
        raise InputError(f"no layer can be made {target}-sparse (every layer is excluded, first/last, or has a "
                         f"reduction size that is not a multiple of M={max(recipe.group_sizes())})",
                         "choose a pattern with a smaller M, or widen --include")
    log(f"[{ctx.stage_id}] {len(names)} layers -> {target} with {cfg.recipe.upper()} "
        f"(steps: dense {recipe.bounds[0]}, sparse {recipe.bounds[1] - recipe.bounds[0]}, fine-tune {total - recipe.bounds[1]}"
        + (f"; decay {recipe.decay.resolved(recipe.bounds[1] - recipe.bounds[0])}" if cfg.recipe == "mdgf" else "")
        + (f"; schedule {' -> '.join(map(str, recipe.schedule))}" if cfg.recipe == "sdgf" else "") + ")")

    metrics: dict[str, float] = {}
    metrics["dense_top1"], metrics["dense_test_loss"] = top1_and_loss(model, data.test, device=device)
    oneshot = copy.deepcopy(model)
    harden(oneshot, wrap_sparse(oneshot, names, "reference"), target)
    metrics["oneshot_top1"], _ = top1_and_loss(oneshot, data.test, device=device)
    del oneshot
    log(f"[{ctx.stage_id}] dense top-1 {metrics['dense_top1']:.4f}; pruned to {target} without training: {metrics['oneshot_top1']:.4f}")
    if cfg.from_scratch:
        torch.manual_seed(ctx.seed)
        _reinitialise(model)

    wrapped = wrap_sparse(model, names, cfg.kernels)
    channels_last = cfg.channels_last and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = make_scheduler(optimizer, cfg.schedule_lr, total, round(cfg.warmup_epochs * steps_per_epoch))
    step = {"t": 0}
    trace: list[dict] = []

    def before_step() -> None:
        state = recipe.state(step["t"])
        set_state(wrapped, state)
        if step["t"] % max(1, total // 200) == 0 or step["t"] == total - 1:
            trace.append({"step": step["t"], "phase": state.phase, "alpha": state.alpha,
                          "density": 1.0 if state.pattern is None else state.pattern.density})
        step["t"] += 1

    history = []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        g = torch.Generator().manual_seed(ctx.seed * 100_003 + epoch)
        row = {"epoch": epoch + 1, **train_epoch(
            model, data.train, optimizer, scheduler, cfg.batch_size, g, device,
            augment=data.augment if cfg.augment else None, label_smoothing=cfg.label_smoothing,
            channels_last=channels_last, show_progress=ctx.show_progress,
            description=f"sparsify {epoch + 1}/{cfg.epochs}", before_step=before_step)}
        state = recipe.state(step["t"] - 1)
        row.update({"phase": state.phase, "alpha": state.alpha,
                    "pattern": "dense" if state.pattern is None else str(state.pattern)})
        if epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            model.eval()
            row["test_top1"], row["test_loss"] = top1_and_loss(model, data.test, device=device)  # at this step's state
        history.append(row)
        ctx.log_metrics({k: v for k, v in row.items() if isinstance(v, float)}, step=epoch + 1)
        log(f"[{ctx.stage_id}] epoch {epoch + 1}/{cfg.epochs} ({row['phase']}, {row['pattern']}, α {row['alpha']:.3g}): "
            + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "alpha"))
    metrics["train_seconds"] = time.perf_counter() - t0

    harden(model, wrapped, target)
    model.to(memory_format=torch.contiguous_format).eval()
    table = _layer_table(model, names, target)
    broken = [r["layer"] for r in table if not r["ok"]]
    if broken:  # the hard mask makes this impossible; a failure here is a bug, not bad input
        raise RuntimeError(f"layers {broken} do not hold {target} after hard masking")
    metrics["test_top1"], metrics["test_loss"] = top1_and_loss(model, data.test, device=device)
    log(f"[{ctx.stage_id}] {target} {cfg.recipe.upper()}: top-1 {metrics['test_top1']:.4f} "
        f"(dense {metrics['dense_top1']:.4f}, {metrics['test_top1'] - metrics['dense_top1']:+.4f})")
    ctx.save_table("layers", table + [{"layer": r["layer"], "reason": r["reason"], "ok": True} for r in skipped])
    ctx.save_table("epochs", history)
    reference = {"dense": metrics["dense_top1"], "pruned, no training": metrics["oneshot_top1"]}
    ctx.save_figure(_plots(history, trace, table, skipped, reference), "sparsity")
    compressed, sizes = _compress(model, names, target)
    torch.save(compressed, ctx.out_dir / "compressed_weights.pt")
    zeros = sum(r["params"] - r["nonzero"] for r in table)
    metrics.update(sizes)
    metrics.update({"sparse_layers": float(len(names)), "dense_layers": float(len(skipped)),
                    "sparse_layer_sparsity": zeros / sum(r["params"] for r in table),
                    "model_sparsity": zeros / sum(p.numel() for p in model.parameters()), "top1_change": metrics["test_top1"] - metrics["dense_top1"]})
    record = ctx.record.with_transform("sparsify", TRANSFORM_MODULE, {"layers": {n: str(target) for n in names}})
    return StageResult(model=model, record=record, metrics=metrics)
