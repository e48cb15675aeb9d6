"""Plain ViT/16 backbone that can run any range of its layers on a padded token set.

The weights are laid out exactly like mmseg's ``VisionTransformer`` (so mmseg-format
pretrained files and public DToP checkpoints load unchanged), but the forward is split into
``embed`` and ``forward_layers(x, start, end, valid)``: the segmentor runs one stage at a
time and decides between stages which tokens go on. The class token exists in the weights;
SegViT drops it after the position embedding (``with_cls_token=False``), SETR and Segmenter
carry it through every layer (``with_cls_token=True``): it is then held apart from the patch
tokens (``run_stage``), joins every layer as one more key and query, and never exits.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import DropPath, SelfAttention, trunc_normal_init

logger = logging.getLogger(__name__)

LN_EPS = 1e-6  # ViT (Segmenter/SegViT) layer norms; part of the architecture, not a preset knob


class _AttnBlock(nn.Module):
    """Holds the attention under `.attn` so keys read `layers.N.attn.attn.*` as in mmseg."""

    def __init__(self, dims: int, num_heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(dims, num_heads)


class _FFN(nn.Module):
    """Linear-GELU-Linear laid out as mmcv's FFN (`layers.0.0`, `layers.1`)."""

    def __init__(self, dims: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, hidden), nn.GELU(), nn.Dropout(0.0)),
                                    nn.Linear(hidden, dims), nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TransformerLayer(nn.Module):
    """Pre-norm ViT layer; `valid` masks padded token slots as attention keys."""

    def __init__(self, dims: int, num_heads: int, hidden: int, drop_path: float, eps: float = LN_EPS) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dims, eps=eps)
        self.attn = _AttnBlock(dims, num_heads)
        self.ln2 = nn.LayerNorm(dims, eps=eps)
        self.ffn = _FFN(dims, hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        x = x + self.drop_path(self.attn.attn(self.ln1(x), valid))
        return x + self.drop_path(self.ffn(self.ln2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dims: int, patch_size: int, bias: bool = True) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dims, kernel_size=patch_size, stride=patch_size, bias=bias)


def resize_pos_embed(pos: Tensor, src_hw: Sequence[int], dst_hw: Sequence[int], mode: str = "bicubic") -> Tensor:
    """(1, 1 + h*w, D) position table -> (1, 1 + H*W, D), resized on the grid part as mmseg
    does (`mode`: Segmenter/SegViT bicubic, SETR bilinear); the class token's entry is kept."""
    if tuple(src_hw) == tuple(dst_hw):
        return pos
    cls_pos, grid = pos[:, :1], pos[:, 1:]
    D = pos.shape[-1]
    grid = grid.reshape(1, src_hw[0], src_hw[1], D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_hw), mode=mode, align_corners=False)
    return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2)], dim=1)


class DToPViT(nn.Module):
    """ViT/16 whose layers are run stage by stage by the segmentor.

    Args mirror the preset's `model` section; `img_size` is the training crop (it fixes the
    stored position table, resized on the fly for other input sizes).
    """

    def __init__(self, img_size: Sequence[int] = (512, 512), patch_size: int = 16, embed_dims: int = 768,
                 num_layers: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, stage_ends: Sequence[int] = (5, 7, 11),
                 with_cls_token: bool = False, interpolate_mode: str = "bicubic", final_norm: bool = False,
                 patch_bias: bool = True,
                 pretrained: Optional[str] = None, init_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.stage_ends = list(stage_ends)
        self.pretrained = pretrained
        self.with_cls_token = with_cls_token
        self.interpolate_mode = interpolate_mode
        self.final_norm = final_norm
        self.patch_embed = PatchEmbed(embed_dims, patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dims))
        rates = torch.linspace(0, drop_path_rate, num_layers).tolist()
        hidden = int(embed_dims * mlp_ratio)
        self.layers = nn.ModuleList(TransformerLayer(embed_dims, num_heads, hidden, r) for r in rates)
        if final_norm:  # mmseg names it ln1 and applies it to the last layer's output only
            self.ln1 = nn.LayerNorm(embed_dims, eps=LN_EPS)
        self._init_random()

    # ------------------------------------------------------------------ weights
    def _init_random(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_init(self.layers)

    def init_weights(self) -> None:
        """Called by mmengine's runner: load mmseg-format pretrained ViT weights if given."""
        if not self.pretrained:
            return
        from ..safeload import load_checkpoint

        ckpt = load_checkpoint(self.pretrained, map_location="cpu")
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        if "pos_embed" in state and state["pos_embed"].shape != self.pos_embed.shape:
            n = state["pos_embed"].shape[1] - 1
            side = int(round(n**0.5))
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], (side, side), self.grid, self.interpolate_mode)
        result = self.load_state_dict(state, strict=False)
        logger.info("loaded pretrained backbone %s (missing %d, unexpected %d keys)", self.pretrained,
                    len(result.missing_keys), len(result.unexpected_keys))
        if result.missing_keys:
            from ..errors import UserError

            raise UserError(f"{self.pretrained}: not a ViT checkpoint for this backbone "
                            f"(missing e.g. {', '.join(result.missing_keys[:3])})")

    # ------------------------------------------------------------------ forward
    def embed(self, img: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Image (B, 3, H, W) -> tokens (B, h*w, D) with position embedding, and (h, w)."""
        H, W = img.shape[-2:]
        ps = self.patch_size
        pad_h, pad_w = (-H) % ps, (-W) % ps
        if pad_h or pad_w:  # mmseg's 'corner' adaptive padding
            img = F.pad(img, (0, pad_w, 0, pad_h))
        x = self.patch_embed.projection(img)
        hw = (x.shape[2], x.shape[3])
        pos = resize_pos_embed(self.pos_embed, self.grid, hw, self.interpolate_mode)[:, 1:]
        return x.flatten(2).transpose(1, 2) + pos, hw

    def class_token(self, batch: int) -> Optional[Tensor]:
        """(B, 1, D) class token with its position entry, or None when the model drops it."""
        if not self.with_cls_token:
            return None
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)

    def run_stage(self, x: Tensor, cls: Optional[Tensor], start: int, end: int,
                  valid: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Layers [start, end) on the patch tokens x (B, L, D) and the class token (B, 1, D)
        or None. The class token goes in front as a real slot (a key of every token, as in
        mmseg) and comes back apart, so exits and gathers only ever see patch tokens. The
        final norm is applied when the stage ends at the last layer."""
        if cls is not None:
            x = torch.cat([cls, x], dim=1)
            if valid is not None:
                valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
        x = self.forward_layers(x, start, end, valid)
        if self.final_norm and end == len(self.layers):
            x = self.ln1(x)
        if cls is not None:
            return x[:, 1:], x[:, :1]
        return x, None

    def forward_layers(self, x: Tensor, start: int, end: int, valid: Optional[Tensor] = None) -> Tensor:
        """Run layers [start, end) on tokens x (B, L, D); `valid` (B, L) marks real slots."""
        for layer in self.layers[start:end]:
            x = layer(x, valid)
        return x

    def stage_bounds(self) -> list[tuple[int, int]]:
        """[(start, end)) layer ranges of the stages, from the stage ends."""
        starts = [0] + [e + 1 for e in self.stage_ends[:-1]]
        return [(s, e + 1) for s, e in zip(starts, self.stage_ends)]

    def forward(self, img: Tensor) -> Tensor:
        """Dense forward of all layers (used only by tools that expect a plain backbone)."""
        x, _ = self.embed(img)
        return self.forward_layers(x, 0, len(self.layers))
