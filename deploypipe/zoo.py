"""The model zoo: small, well-known architectures for the data deploypipe ships with.

Every zoo model takes [0, 1] images and starts with its own ``Normalize`` layer, so randomized
smoothing can add its noise in pixel space and an exported engine needs no preprocessing.

- ``digits_cnn``: a 3-conv CNN for scikit-learn's 8×8 digits (the embedded default data).
- ``resnet20`` / ``resnet56`` / ``resnet110``: the CIFAR ResNets of He et al. 2016 (§4.2): 3 stages of n basic
  blocks with 16/32/64 channels, depth 6n+2, parameter-free option-A shortcuts.
- ``vit_tiny``: a small Vision Transformer for 32×32 images with 4×4 patches (64 tokens + class
  token), pre-norm blocks built from plain ``nn.Linear`` layers so quantize/sparsify see them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers, so they travel in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """A user's model behind a Normalize layer (used when the user gives mean/std)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], net: nn.Module):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


# --------------------------------------------------------------------------- digits CNN
def digits_cnn(num_classes: int = 10, in_channels: int = 1, mean=(0.3,), std=(0.4,)) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        Normalize(mean, std),
        *block(in_channels, 16),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


# --------------------------------------------------------------------------- CIFAR ResNet
class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = PadShortcut(cout - cin) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, mean, std):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, width, stride))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def resnet8(num_classes: int = 10, in_channels: int = 3, mean=CIFAR_MEAN, std=CIFAR_STD) -> nn.Module:
    """One block per stage: the small teacher / student of the data-pruning and KD literature."""
    return CifarResNet(8, num_classes, in_channels, mean, std)


def resnet20(num_classes: int = 10, in_channels: int = 3, mean=CIFAR_MEAN, std=CIFAR_STD) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels, mean, std)


def resnet56(num_classes: int = 10, in_channels: int = 3, mean=CIFAR_MEAN, std=CIFAR_STD) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels, mean, std)


def resnet110(num_classes: int = 10, in_channels: int = 3, mean=CIFAR_MEAN, std=CIFAR_STD) -> nn.Module:
    """The base classifier of Cohen et al. 2019's CIFAR-10 randomized-smoothing results."""
    return CifarResNet(110, num_classes, in_channels, mean, std)


# --------------------------------------------------------------------------- small ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, image_size: int, patch: int, num_classes: int, in_channels: int, dim: int,
                 depth: int, heads: int, mlp_dim: int, mean, std):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.normalize = Normalize(mean, std)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(num_classes: int = 10, in_channels: int = 3, mean=CIFAR_MEAN, std=CIFAR_STD,
             image_size: int = 32, patch: int = 4, dim: int = 192, depth: int = 6, heads: int = 3,
             mlp_dim: int = 384) -> nn.Module:
    return ViT(image_size, patch, num_classes, in_channels, dim, depth, heads, mlp_dim, mean, std)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vit_tiny": vit_tiny,
}
