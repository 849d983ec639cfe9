"""Small models for the tests that are not in deploypipe's zoo (importable as `encoder_models:...`)."""

import torch
from torch import nn


class EncoderClassifier(nn.Module):
    """Rows of a 1 x 8 x 8 image as 8 tokens through PyTorch's own nn.TransformerEncoder."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dim: int = 32, heads: int = 4, depth: int = 2,
                 batch_first: bool = True, causal: bool = False):
        super().__init__()
        self.batch_first, self.causal = batch_first, causal
        self.embed = nn.Linear(8 * in_channels, dim)
        self.pos = nn.Parameter(torch.randn(1, 8, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.permute(0, 2, 1, 3).flatten(2)) + self.pos  # (B, rows, C*W)
        mask = nn.Transformer.generate_square_subsequent_mask(8, device=x.device) if self.causal else None
        if not self.batch_first:
            t = t.transpose(0, 1)
        t = self.encoder(t, mask=mask, is_causal=self.causal)
        if not self.batch_first:
            t = t.transpose(0, 1)
        return self.head(t.mean(1))


def encoder_classifier(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return EncoderClassifier(num_classes, in_channels)


class NoExport(nn.Module):
    """A classifier with an op ONNX has no export for (singular values): the export stage must refuse it."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.lin = nn.Linear(64 * in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        sv = torch.linalg.svdvals(h[:, :4].reshape(-1, 2, 2)).sum(-1, keepdim=True)
        return self.lin(h) + 0 * sv
