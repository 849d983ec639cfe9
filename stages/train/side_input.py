"""How a DRS side model sees its half-image.

``diagonal_split`` packs each side of the 2x2 diagonal pattern into a C x H x W/2 sub-image: row i
holds the pixels of columns 2j + (i mod 2) (left) or 2j + 1 - (i mod 2) (right). A network fed that
packed grid sees the scene squeezed 2x horizontally and sheared by one pixel between rows, so the
features of a network trained on full images transfer poorly.

``GridFill`` puts the side's pixels back at their own places in the C x H x W grid - a checkerboard:
left is (i + j) even, right (i + j) odd - and fills each other pixel with the mean of its 4
neighbours, which all belong to the side (at the border, of those inside the image). The wrapped
network sees the original geometry, as Xia et al.'s code feeds full-size ResNets (theirs keeps the
side's pixels in place too). The model still *takes* the half-image and the fill is a fixed linear
function of it, so smoothing the half-image is exactly the DRS of the certify stage: the noise is
drawn on the W/2 columns, and the filled pixels carry averages of it. The fill depends on the side,
so a full-grid model serves one side (train it with ``drs_side`` left or right). The cost is the
full-image network's compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.models import register_transform

from .config import SIDES

TRANSFORM_MODULE = __name__
KIND = "drs_grid_fill"


def _neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of each pixel's up/down/left/right neighbours inside the image (slices of a zero-padded
    copy: exports to ONNX as plain slices and adds)."""
    p = F.pad(t, (1, 1, 1, 1))
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]


def grid_fill(half: torch.Tensor, side: int) -> torch.Tensor:
    """(N, C, H, W/2) half-image of ``side`` (0 left, 1 right) -> (N, C, H, W): its pixels at their
    places, every other pixel the mean of its in-image 4-neighbours."""
    h, w2 = half.shape[-2:]
    full = torch.stack((half, half), dim=-1).flatten(-2)  # column j at 2j and 2j+1
    rows = torch.arange(h, device=half.device)[:, None]
    cols = torch.arange(2 * w2, device=half.device)[None, :]
    mine = ((rows + cols) % 2 == side).to(half.dtype)  # the side's checkerboard squares
    kept = full * mine
    count = _neighbour_sum(mine[None, None]).clamp(min=1.0)
    return kept + (1 - mine) * _neighbour_sum(kept) / count


class GridFill(nn.Module):
    """A DRS side model that takes the side's half-image and runs ``net`` on ``grid_fill`` of it."""

    def __init__(self, net: nn.Module, side: int):
        super().__init__()
        self.net, self.side = net, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(grid_fill(x, self.side))


@register_transform(KIND)
def apply_grid_fill(model: nn.Module, params: dict) -> nn.Module:
    return GridFill(model, SIDES.index(params["side"]))
