"""ATM head (SegViT): class queries attend to the tokens; the attention logits are the masks.

A head is a pure function of the tokens it is given: ``forward(tokens, valid)`` returns
(presence logits, mask logits per token). It keeps nothing between calls. Retired tokens are
simply not passed in, so they are not keys of its cross-attention.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import exits as X
from .layers import MaskCrossAttention, SelfAttention, trunc_normal_init


class ATMDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attn over queries, cross-attn to tokens, ReLU FFN.

    Same structure and parameter names as torch's ``TransformerDecoderLayer`` with SegViT's
    cross-attention swapped in (``multihead_attn.{q,k,v,proj}``).
    """

    def __init__(self, dims: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dims, num_heads, attn_drop=dropout)
        self.multihead_attn = MaskCrossAttention(dims, num_heads, attn_drop=dropout)
        self.linear1 = nn.Linear(dims, 4 * dims)
        self.linear2 = nn.Linear(4 * dims, dims)
        self.norm1 = nn.LayerNorm(dims)
        self.norm2 = nn.LayerNorm(dims)
        self.norm3 = nn.LayerNorm(dims)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, q: Tensor, memory: Tensor, valid: Optional[Tensor],
                kv: Optional[Tuple[Tensor, Tensor]] = None,
                with_masks: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """kv / with_masks: see ``MaskCrossAttention.forward``."""
        q = self.norm1(q + self.dropout1(self.self_attn(q)))
        attended, mask_logits = self.multihead_attn(q, memory, valid, kv=kv, with_masks=with_masks)
        q = self.norm2(q + self.dropout2(attended))
        q = self.norm3(q + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(q))))))
        return q, mask_logits


class ATMDecoder(nn.Module):
    def __init__(self, dims: int, num_heads: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ATMDecoderLayer(dims, num_heads, dropout) for _ in range(num_layers))

    def memory_kv(self, memory: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """Keys and values of every layer's cross-attention, from one matmul.

        They all read the same memory, so their six-or-so projections are one wide linear
        (weights concatenated, so training and checkpoints see the separate layers): one
        kernel instead of one per projection, and a better-shaped matmul.
        Returns per layer (k, v), each (B, L, C), views into the one result.
        """
        weight, bias = self._kv_weights()
        parts = F.linear(memory, weight, bias).split(self.layers[0].multihead_attn.k.out_features, dim=-1)
        return [(parts[2 * i], parts[2 * i + 1]) for i in range(len(self.layers))]

    def _kv_weights(self) -> Tuple[Tensor, Tensor]:
        """The concatenated key/value weights. In inference they are kept between calls
        (keyed on the parameters' storage and version counters, so any update, in-place
        or not, makes a fresh copy); with gradients, while tracing or while a CUDA graph
        is being captured they are concatenated on every call (differentiable / live)."""
        attns = [layer.multihead_attn for layer in self.layers]
        weights = [w for a in attns for w in (a.k.weight, a.v.weight)]
        biases = [b for a in attns for b in (a.k.bias, a.v.bias)]
        live = torch.is_grad_enabled() or torch.jit.is_tracing() or (
            weights[0].is_cuda and torch.cuda.is_current_stream_capturing())
        if live:
            return torch.cat(weights), torch.cat(biases)
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in (*weights, *biases))
        cached = self.__dict__.get("_kv_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_kv_cache"] = (key, torch.cat(weights), torch.cat(biases))
        return cached[1], cached[2]


class ATMHead(nn.Module):
    """One head per stage. `loss_decode` is built from its config by the caller's registry.

    A stage head (the interface every head of :mod:`.segmentor` has): ``forward(tokens,
    valid) -> (presence or None, token logits (B, K, L))``; ``confidence`` turns them into
    the per-class scores in [0, 1] the exit rule reads; ``class_scores`` turns the merged
    logits of the grid into the output map; ``loss`` trains it.
    """

    kind = "atm"

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_heads: int,
                 num_layers: int = 3, dropout: float = 0.1, loss_decode: Optional[dict] = None,
                 align_corners: bool = False, init_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.out_channels = num_classes
        self.align_corners = align_corners
        self.input_proj = nn.Linear(in_channels, channels)
        self.proj_norm = nn.LayerNorm(channels)
        self.decoder = ATMDecoder(channels, num_heads, num_layers, dropout)
        self.q = nn.Embedding(num_classes, channels)
        self.class_embed = nn.Linear(channels, 2)
        if loss_decode is not None:
            from mmseg.registry import MODELS

            self.loss_decode = MODELS.build(loss_decode)
        trunc_normal_init(self)

    def forward(self, tokens: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """tokens (B, L, D) -> presence logits (B, K, 2), mask logits (B, K, L)."""
        memory = self.proj_norm(self.input_proj(tokens))
        q = self.q.weight.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        kv = self.decoder.memory_kv(memory)
        last = len(self.decoder.layers) - 1
        mask_logits = None
        for i, layer in enumerate(self.decoder.layers):
            # only the last layer's masks are used: the others take the fused attention
            q, mask_logits = layer(q, memory, valid, kv=kv[i], with_masks=i == last)
        return self.class_embed(q), mask_logits

    @staticmethod
    def confidence(presence: Tensor, logits: Tensor) -> Tensor:
        """(B, K, L) P(class present) * sigmoid(mask logit), the paper's token score."""
        return X.token_scores(presence, logits)

    @staticmethod
    def class_scores(presence: Tensor, merged: Tensor) -> Tensor:
        """Merged mask logits (B, K, h, w) -> class scores (B, K, h, w)."""
        B, K, h, w = merged.shape
        return X.token_scores(presence, merged.flatten(2)).view(B, K, h, w)

    def loss(self, presence: Tensor, merged: Tensor, labels: Tensor) -> dict:
        return self.loss_decode(presence, merged, labels)
