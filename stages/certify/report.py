"""What a certification table says: certified accuracy at each radius, the average certified radius,
abstentions, the robustness lost against a reference model, and the certified-accuracy plot."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from .config import CertifyConfig
from deploypipe.smoothing import ABSTAIN


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


def plot_curves(curves: dict[str, list[dict]], cfg: CertifyConfig) -> Figure:
    """Certified accuracy against the radius, one curve per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    top = max([r["radius"] for rows in curves.values() for r in rows] + [max(cfg.radii)])
    grid = torch.linspace(0, top * 1.05, 200).tolist()
    for name, rows in curves.items():
        n = max(len(rows), 1)
        ax.plot(grid, [100 * sum(1 for x in rows if x["correct"] and x["radius"] >= r) / n for r in grid], label=name)
    images = max(len(rows) for rows in curves.values())
    ax.set(xlabel="L2 radius", ylabel="certified accuracy (%)",
           title=f"{cfg.method.upper()}, sigma={cfg.sigma}, n={cfg.n}, alpha={cfg.alpha}, {images} images")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
