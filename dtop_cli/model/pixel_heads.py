"""Stage heads that output per-pixel class logits: mmseg's SETR and Segmenter heads, and a
LayerNorm + Linear head for the stage ends of a model that has none.

They have the interface of :class:`.atm_head.ATMHead` (see there), so the one segmentor runs
them unchanged: ``forward(tokens, valid)`` gives (None, logits (B, K, L)) at token
resolution. There is no presence output; a token's exit confidence is its best class
probability (``confidence``: softmax over the classes), and the merged logits are what the
output map is made of (``class_scores``), as mmseg averages and resizes logits.

Parameter names are those of the mmseg modules, so mmseg model-zoo files load unchanged:
``SETRUPHead`` (``norm``, ``up_convs.i.0.{conv,bn}``, ``conv_seg``) and
``SegmenterMaskTransformerHead`` (``dec_proj``, ``cls_emb``, ``layers``, ``decoder_norm``,
``patch_proj``, ``classes_proj``, ``mask_norm``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmseg.models.utils import Upsample
from torch import Tensor, nn

from .layers import trunc_normal_init
from .vit import TransformerLayer

#: mmseg's default LayerNorm epsilon (SETR heads set 1e-6 themselves, Segmenter's keeps it)
MMSEG_LN_EPS = 1e-5


def _softmax_confidence(logits: Tensor) -> Tensor:
    """(B, K, L) logits -> class probabilities: a token's best one is its confidence."""
    return logits.softmax(dim=1)


def _per_token(x: Tensor, valid: Optional[Tensor], fn) -> Tensor:
    """Apply a per-token map fn (T, D) -> (T, K) to the real slots of x (B, L, D) only.

    Returns (B, L, K), zeros in padding slots. Running only the real tokens keeps padding out
    of BatchNorm's batch statistics in training (the token set of a pruned batch is ragged).
    """
    B, L, D = x.shape
    if valid is None:
        return fn(x.reshape(B * L, D)).view(B, L, -1)
    y = fn(x[valid])
    out = y.new_zeros(B, L, y.shape[-1])
    return out.index_put((valid,), y)


class PixelCELoss(nn.Module):
    """mmseg's decode-head loss: logits resized bilinearly to the labels, cross-entropy with
    ignored pixels (255) left out, times `loss_weight`."""

    def __init__(self, loss_weight: float = 1.0, ignore_index: int = 255, align_corners: bool = False) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.align_corners = align_corners

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """logits (B, K, h, w), labels (B, H, W) long -> {'loss_ce': scalar}."""
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index)
        return {"loss_ce": self.loss_weight * loss}


class _PixelHead(nn.Module):
    """What the per-pixel heads share: confidence, loss, the upsampling of class_scores."""

    num_classes: int
    align_corners: bool = False

    def _build_loss(self, loss_weight: float) -> None:
        self.loss_decode = PixelCELoss(loss_weight, align_corners=self.align_corners)

    @staticmethod
    def confidence(presence: Optional[Tensor], logits: Tensor) -> Tensor:
        return _softmax_confidence(logits)

    def class_scores(self, presence: Optional[Tensor], merged: Tensor) -> Tensor:
        """Merged logits (B, K, h, w) -> the head's output logits (token resolution unless
        the head upsamples)."""
        return merged

    def loss(self, presence: Optional[Tensor], merged: Tensor, labels: Tensor) -> dict:
        return self.loss_decode(self.class_scores(presence, merged), labels)


class SETRUpStageHead(_PixelHead):
    """mmseg's ``SETRUPHead`` (SETR-Naive: 1x1 kernels) run at token resolution.

    mmseg: LayerNorm, then per block a 1x1 conv + BatchNorm + ReLU and a x`up_scale` bilinear
    upsample, then the 1x1 classifier. With one block (the decode head) the classifier
    commutes with the upsample (both linear, the bilinear weights sum to 1), so computing the
    logits per token and upsampling them afterwards (``class_scores``) is mmseg's output. With
    two (the auxiliary heads) the second block would mix neighbouring tokens before its ReLU;
    here the blocks run per token (the exit decision at token resolution, issue 13) and the
    head's own output map is upsampled by the same total factor.
    """

    kind = "setr-up"

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
                 up_scale: int = 4, dropout: float = 0.0, loss_weight: float = 1.0,
                 align_corners: bool = False, init_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.num_classes = self.out_channels = num_classes
        self.align_corners = align_corners
        self.up_scale = up_scale
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.up_convs = nn.ModuleList()
        c_in = in_channels
        for _ in range(num_convs):
            # mmseg's block: conv module, then its (weightless) upsample
            self.up_convs.append(nn.Sequential(
                ConvModule(c_in, channels, 1, norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU")),
                Upsample(scale_factor=up_scale, mode="bilinear", align_corners=align_corners)))
            c_in = channels
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self._build_loss(loss_weight)

    def _token_logits(self, t: Tensor) -> Tensor:
        y = t[:, :, None, None]
        for block in self.up_convs:
            y = block[0](y)
        if self.dropout is not None:
            y = self.dropout(y)
        return self.conv_seg(y).flatten(1)

    def forward(self, tokens: Tensor, valid: Optional[Tensor] = None) -> tuple[None, Tensor]:
        """tokens (B, L, D) -> (None, logits (B, K, L))."""
        return None, _per_token(self.norm(tokens), valid, self._token_logits).transpose(1, 2)

    def dense_scores(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """mmseg's forward on the whole token grid (B, h*w, D) -> logits (B, K, h*s^n, w*s^n):
        each block, then its upsample of the features, the classifier last. What the
        segmentor outputs when no token left early (same values as class_scores of the
        token logits up to rounding, and mmseg's cost)."""
        B, _, D = tokens.shape
        x = self.norm(tokens).transpose(1, 2).reshape(B, D, *grid)
        for block in self.up_convs:
            x = block(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)

    def class_scores(self, presence: Optional[Tensor], merged: Tensor) -> Tensor:
        """The blocks' upsamples, applied to the logits (B, K, h, w) -> (B, K, h*s^n, w*s^n)."""
        for block in self.up_convs:
            merged = block[1](merged)
        return merged


class MaskTransformerStageHead(_PixelHead):
    """mmseg's ``SegmenterMaskTransformerHead`` on a padded token set.

    The class embeddings join the patch tokens after them, as in mmseg; padding slots are
    masked as attention keys, so a pruned batch sees exactly its active tokens.
    """

    kind = "mask-transformer"

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_heads: int,
                 num_layers: int = 2, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 dropout: float = 0.0, loss_weight: float = 1.0, align_corners: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.num_classes = self.out_channels = num_classes
        self.align_corners = align_corners
        rates = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.layers = nn.ModuleList(TransformerLayer(channels, num_heads, int(mlp_ratio * channels), r,
                                                     eps=MMSEG_LN_EPS) for r in rates)
        self.dec_proj = nn.Linear(in_channels, channels)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, channels))
        self.patch_proj = nn.Linear(channels, channels, bias=False)
        self.classes_proj = nn.Linear(channels, channels, bias=False)
        self.decoder_norm = nn.LayerNorm(channels, eps=MMSEG_LN_EPS)
        self.mask_norm = nn.LayerNorm(num_classes, eps=MMSEG_LN_EPS)
        trunc_normal_init(self)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self._build_loss(loss_weight)

    def forward(self, tokens: Tensor, valid: Optional[Tensor] = None) -> tuple[None, Tensor]:
        """tokens (B, L, D) -> (None, logits (B, K, L))."""
        B, L, _ = tokens.shape
        K = self.num_classes
        x = torch.cat([self.dec_proj(tokens), self.cls_emb.expand(B, -1, -1)], dim=1)
        keys = None if valid is None else torch.cat([valid, valid.new_ones(B, K)], dim=1)
        for layer in self.layers:
            x = layer(x, keys)
        x = self.decoder_norm(x)
        patches = F.normalize(self.patch_proj(x[:, :L]), dim=2, p=2)
        classes = F.normalize(self.classes_proj(x[:, L:]), dim=2, p=2)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, L, K)
        return None, masks.transpose(1, 2)


class LinearStageHead(_PixelHead):
    """LayerNorm + Linear classifier per token: the auxiliary head added to models released
    without one (Segmenter). About D*K multiply-adds a token, ~1% of a ViT-B's cost."""

    kind = "linear"

    def __init__(self, in_channels: int, num_classes: int, loss_weight: float = 1.0,
                 align_corners: bool = False, init_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.num_classes = self.out_channels = num_classes
        self.align_corners = align_corners
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.classifier = nn.Linear(in_channels, num_classes)
        trunc_normal_init(self)
        self._build_loss(loss_weight)

    def forward(self, tokens: Tensor, valid: Optional[Tensor] = None) -> tuple[None, Tensor]:
        return None, self.classifier(self.norm(tokens)).transpose(1, 2)
