"""How a DRS side model sees its half-image.

``diagonal_split`` packs each side of the 2x2 diagonal pattern into a C x H x W/2 sub-image: row i
holds the pixels of columns 2j + (i mod 2) (left) or 2j + 1 - (i mod 2) (right). A network fed that
packed grid sees the scene squeezed 2x horizontally and sheared by one pixel between rows; the
features of a network trained on full images do not transfer to it.

``PairFill`` puts each kept pixel back over the horizontal pixel pair (columns 2j, 2j+1) it came
from, so the wrapped network sees a C x H x W image with the original geometry (each pixel at its
own place or its pair neighbour's) - how Xia et al.'s code feeds full-size ResNets. It is the same
map for both sides. The model still *takes* the C x H x W/2 half-image, and the fill is a fixed
function of it, so smoothing the half-image stays exactly the DRS of the certify stage (the noise is
drawn on the W/2 pixels, not on the filled image). The cost is the full-image network's compute.
"""

from __future__ import annotations

import torch
from torch import nn

from deploypipe.models import register_transform

TRANSFORM_MODULE = __name__
KIND = "drs_pair_fill"


def pair_fill(half: torch.Tensor) -> torch.Tensor:
    """(..., H, W/2) -> (..., H, W): column j of the half-image fills columns 2j and 2j+1."""
    return torch.stack((half, half), dim=-1).flatten(-2)


class PairFill(nn.Module):
    """A DRS side model that takes a half-image and runs ``net`` on its pair-filled full grid."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pair_fill(x))


@register_transform(KIND)
def apply_pair_fill(model: nn.Module, params: dict) -> nn.Module:
    return PairFill(model)
