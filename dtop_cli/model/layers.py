"""Attention and feed-forward building blocks with mmseg-compatible parameter names.

Both attentions run through ``scaled_dot_product_attention`` with an optional key-padding
mask, so the same layer serves the dense path (no mask, fastest kernel) and the batched
pruned path (padded slots masked as keys). Parameter names follow torch's
``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj``) because that is what mmseg's ViT
and SegViT's checkpoints hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def key_padding_to_attn_mask(valid: Tensor | None) -> Tensor | None:
    """(B, L) bool of real tokens -> (B, 1, 1, L) boolean mask for SDPA (True = attend)."""
    if valid is None:
        return None
    return valid[:, None, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention, packed in-projection, SDPA inside."""

    def __init__(self, dims: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dims, dims))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dims))
        self.out_proj = nn.Linear(dims, dims)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        h = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_padding_to_attn_mask(valid),
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class MaskCrossAttention(nn.Module):
    """Cross-attention from class queries to tokens that also returns its logits.

    The head-averaged scaled q.k (before softmax) is the class's mask logit per token, which
    is why this attention is written out when the masks are wanted. Only the last decoder
    layer's masks are used, so the other layers pass ``with_masks=False`` and take the
    fused SDPA kernel instead (same attention, no (B, h, K, L) logits tensor, fewer ops).
    """

    def __init__(self, dims: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q = nn.Linear(dims, dims)
        self.k = nn.Linear(dims, dims)
        self.v = nn.Linear(dims, dims)
        self.proj = nn.Linear(dims, dims)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, queries: Tensor, memory: Tensor, valid: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None,
                with_masks: bool = True) -> tuple[Tensor, Tensor | None]:
        """queries (B, K, C), memory (B, L, C) -> (attended (B, K, C), mask logits (B, K, L)).

        kv: the memory's key and value projections (B, L, C) when the caller computed them
        already (the head projects all its layers' keys/values in one matmul).
        with_masks False: return None for the mask logits and run the fused kernel.
        """
        B, K, C = queries.shape
        h = self.num_heads
        k, v = (self.k(memory), self.v(memory)) if kv is None else kv
        L = k.shape[1]
        q = self.q(queries).view(B, K, h, C // h).transpose(1, 2)
        k = k.view(B, L, h, C // h).transpose(1, 2)
        v = v.view(B, L, h, C // h).transpose(1, 2)
        if not with_masks:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=key_padding_to_attn_mask(valid),
                dropout_p=self.attn_drop.p if self.training else 0.0,
            )
            return self.proj(out.transpose(1, 2).reshape(B, K, C)), None
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, K, L)
        mask_logits = logits.mean(dim=1)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B, K, C)
        return self.proj(out), mask_logits


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """ViT-style init: truncated normal linears, unit layer norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, SelfAttention):
            nn.init.trunc_normal_(m.in_proj_weight, std=std)
            nn.init.zeros_(m.in_proj_bias)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None = None) -> Tensor:
    """Reference softmax attention (for tests and FLOP checks): softmax(q k^T / sqrt(d)) v."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return logits.softmax(-1) @ v
