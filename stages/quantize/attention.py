"""``nn.MultiheadAttention`` rewritten so that it can be quantized.

PyTorch's MultiheadAttention keeps its input projection as one raw parameter (``in_proj_weight``)
and computes everything inside ``F.multi_head_attention_forward`` (or a fused fast path), so
neither its projections nor its two matmuls are visible to a quantizer — and wrapping its
``out_proj`` breaks it, because the functional reads ``out_proj.weight`` directly.
``ExplicitMultiheadAttention`` is the same function written out: ``q_proj``, ``k_proj``, ``v_proj``
and ``out_proj`` as ``nn.Linear`` (quantized like every other Linear) and the attention as
``tensor_ops.QuantAttention`` (Q/DQ on both inputs of Q·Kᵀ and P·V). It accepts the same call
(masks, ``is_causal``, ``need_weights``); dropout is not applied (post-training quantization runs
in eval mode). It leaves ``in_proj_bias`` as None and turns ``use_nested_tensor`` off in the
enclosing ``nn.TransformerEncoder``, so PyTorch's fused fast paths step aside.

``convert_attention`` replaces every convertible MultiheadAttention in a model and returns the
names; the quantize transform record lists them, so a saved model is rebuilt the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .tensor_ops import QuantAttention


class ExplicitMultiheadAttention(nn.Module):
    fx_leaf = True  # traced as one call: its quantizers are inside (fx_trace.py)

    def __init__(self, mha: nn.MultiheadAttention, bits: Optional[int], enabled: bool = True):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn attention is not supported")
        e, kdim, vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.embed_dim, self.num_heads, self.batch_first = e, mha.num_heads, mha.batch_first
        self.head_dim = e // mha.num_heads
        bias = mha.in_proj_bias is not None
        kw = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        self.q_proj, self.k_proj = nn.Linear(e, e, bias, **kw), nn.Linear(kdim, e, bias, **kw)
        self.v_proj = nn.Linear(vdim, e, bias, **kw)
        self.out_proj = nn.Linear(e, e, mha.out_proj.bias is not None, **kw)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w, i in ((self.q_proj, wq, 0), (self.k_proj, wk, 1), (self.v_proj, wv, 2)):
                proj.weight.copy_(w)
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.attention = QuantAttention(bits, enabled=enabled).to(kw["device"])
        # what nn.TransformerEncoderLayer inspects before choosing its fused path
        self._qkv_same_embed_dim = True
        self.in_proj_weight = None
        self.in_proj_bias = None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, length, _ = t.shape
        return t.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq, _ = query.shape
        lk = key.shape[1]
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            mask = (torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, float("-inf"))
                    if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype))
            mask = mask.view(n, self.num_heads, lq, lk) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            kp = (torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
                  .masked_fill(key_padding_mask, float("-inf")) if key_padding_mask.dtype == torch.bool
                  else key_padding_mask.to(q.dtype))
            kp = kp.view(n, 1, 1, lk)
            mask = kp if mask is None else mask + kp
        out, probs = self.attention(q, k, v, mask=mask, return_probs=True)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, self.embed_dim))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        weights = None
        if need_weights:
            weights = probs.mean(1) if average_attn_weights else probs
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


def convert_attention(model: nn.Module, bits: Optional[int], enabled: bool = True,
                      names: Optional[list[str]] = None) -> list[str]:
    """Replace MultiheadAttention modules (all convertible ones, or exactly ``names``) in place;
    returns the names replaced."""
    from .modules import replace_module

    targets = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
               and m.bias_k is None and not m.add_zero_attn] if names is None else list(names)
    for name in targets:
        replace_module(model, name, ExplicitMultiheadAttention(model.get_submodule(name), bits, enabled))
    if targets:
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False
    return targets

