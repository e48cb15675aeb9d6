"""ATM loss: per-class presence cross-entropy + sigmoid focal + dice on the class masks.

Each query is tied to its own class (no matching), so targets are read straight from the
label map: a class is "present" in an image when any of its pixels is labelled. Mask terms
are computed only for present (image, class) pairs.

Two details decide whether training matches the public SegViT/DToP code, which produced
every number of the paper:

* **Ignored pixels** (``ignored_pixels``). The public code builds each present class's target
  as ``label == class`` over the whole label map and averages the focal term over all
  pixels; the dice sums run over all pixels too. An ignored pixel (255: "other" under
  ``reduce_zero_label``, crop padding) is therefore a *negative* of every present class, and
  the heads learn low scores there, which in turn decides whether such tokens exit early.
  That is ``"negative"`` (the default). ``"excluded"`` leaves ignored pixels out of both
  terms (focal averaged over the labelled pixels of each mask), which some users prefer on
  datasets where "ignored" means "unknown" rather than "none of these classes".
* **The mask count** the mask terms are divided by: the number of present (image, class)
  pairs summed over all processes (all-reduce), divided by the world size, at least 1. With
  DDP averaging gradients, this weights every mask of the global batch alike, whatever each
  process happened to see. In one process it is the local count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: How ignored pixels enter the mask terms (see the module docstring).
IGNORED_PIXELS = ("negative", "excluded")


class _Criterion(nn.Module):
    """Holds the class weights as a buffer so checkpoints carry `criterion.empty_weight`."""

    def __init__(self, absent_weight: float) -> None:
        super().__init__()
        self.register_buffer("empty_weight", torch.tensor([1.0, absent_weight]))


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Elementwise focal loss (Lin et al.) on logits; same values as mmcv's op, in plain torch."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return weight * ce * (1 - p_t) ** gamma


def dice_loss(logits: Tensor, targets: Tensor, pixels: Tensor | None = None) -> Tensor:
    """1 - soft dice per mask (smoothing 1). logits/targets: (P, H*W); ``pixels`` (P, H*W)
    marks the pixels that take part (None: all of them)."""
    p = logits.sigmoid()
    t = targets
    if pixels is not None:
        p, t = p * pixels, t * pixels
    num = 2 * (p * t).sum(-1) + 1
    den = p.sum(-1) + t.sum(-1) + 1
    return 1 - num / den


def _linear_weights(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) matrix of 1-D linear resizing, align_corners=False (torch's formula)."""
    eye = torch.eye(n_in, device=device, dtype=dtype).unsqueeze(1)  # (n_in, 1, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].t()


def upsample_bilinear(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(..., h, w) -> (..., H, W): ``F.interpolate(mode="bilinear", align_corners=False)``
    written as two matrix products.

    Why: bilinear resizing is separable, and torch's CPU backward of ``upsample_bilinear2d``
    scatters pixel by pixel, which made it the slowest op of a training step (the mask terms
    are taken at label resolution, every present class of every head). As matrix products,
    forward and backward are both GEMMs. Same values up to float rounding (tested).
    """
    h, w = x.shape[-2:]
    H, W = int(size[0]), int(size[1])
    a_h = _linear_weights(h, H, x.device, x.dtype)  # (H, h)
    a_w = _linear_weights(w, W, x.device, x.dtype)  # (W, w)
    return a_h @ x @ a_w.t()


class _FocalDice(torch.autograd.Function):
    """Per-mask focal mean and dice of (P, H*W) logits against binary targets, in one pass.

    Why a hand-written backward: the mask terms run at label resolution (every pixel of
    every present class of every head), and there the chain of small elementwise ops that
    autograd records for :func:`sigmoid_focal_loss` + :func:`dice_loss` (each storing its
    own full-size tensor) is most of a training step on a CPU. The values and gradients are
    the same functions (tests compare both against the autograd form); for binary targets
    ``p_t = sigmoid(z)`` with ``z = x`` on positives and ``-x`` on negatives, so the focal
    term and its derivative need one sigmoid and one softplus per pixel.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, pixels: Tensor | None, alpha: float, gamma: float):  # type: ignore[override]
        pos = t > 0.5
        z = torch.where(pos, x, -x)
        s = torch.sigmoid(z)  # p_t
        ce = F.softplus(-z)  # -log p_t
        one_m = 1.0 - s
        w = torch.where(pos, alpha, 1.0 - alpha)
        mod = one_m * one_m if gamma == 2.0 else one_m.pow(gamma)
        focal = w * ce * mod
        p = torch.where(pos, s, one_m)  # sigmoid(x)
        tt = t
        if pixels is not None:
            focal = focal * pixels
            p = p * pixels
            tt = t * pixels
            npix = pixels.sum(-1).clamp(min=1)
        else:
            npix = torch.full((x.shape[0],), float(x.shape[1]), dtype=x.dtype, device=x.device)
        num = 2 * (p * tt).sum(-1) + 1
        den = p.sum(-1) + tt.sum(-1) + 1
        ctx.save_for_backward(s, ce, w, pos, tt, pixels if pixels is not None else torch.empty(0), num, den, npix)
        ctx.gamma = gamma
        ctx.has_pixels = pixels is not None
        return focal.sum(-1) / npix, 1 - num / den

    @staticmethod
    def backward(ctx, g_focal: Tensor, g_dice: Tensor):  # type: ignore[override]
        s, ce, w, pos, tt, pixels, num, den, npix = ctx.saved_tensors
        gamma = ctx.gamma
        one_m = 1.0 - s
        mod = one_m * one_m if gamma == 2.0 else one_m.pow(gamma)
        # d focal / d z = -w (1-s)^g ((1-s) + g s ce); d z / d x = +-1
        d_focal = w * mod * (one_m + gamma * s * ce)
        d_focal = torch.where(pos, -d_focal, d_focal) * (g_focal / npix).unsqueeze(-1)
        # d dice / d p = -(2 t den - num) / den^2; d p / d x = s (1 - s) for either sign of z
        d_dice = (num.unsqueeze(-1) - 2 * tt * den.unsqueeze(-1)) * (g_dice / (den * den)).unsqueeze(-1)
        grad = d_focal + d_dice * (s * one_m)
        if ctx.has_pixels:
            grad = grad * pixels
        return grad, None, None, None, None


def focal_dice(logits: Tensor, targets: Tensor, alpha: float, gamma: float,
               pixels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(per-mask focal averaged over the taking-part pixels, per-mask dice loss), (P,) each.

    ``pixels`` None: every pixel takes part (focal averaged over H*W). Same values and
    gradients as ``sigmoid_focal_loss(...).mean(-1)`` and ``dice_loss`` (see _FocalDice).
    """
    return _FocalDice.apply(logits, targets, pixels, float(alpha), float(gamma))


def global_mask_count(local: int, device: torch.device) -> float:
    """Present (image, class) pairs over all processes / world size, at least 1 (see module doc)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return max(float(local), 1.0)
    n = torch.tensor([float(local)], dtype=torch.float32, device=device)
    dist.all_reduce(n)
    return max(float(n.item()) / dist.get_world_size(), 1.0)


class ATMLoss(nn.Module):
    """Loss of one ATM head. forward returns a dict of named, weighted terms."""

    def __init__(self, num_classes: int, cls_weight: float = 1.0, absent_weight: float = 0.1,
                 focal_weight: float = 20.0, dice_weight: float = 1.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, ignore_index: int = 255, ignored_pixels: str = "negative",
                 label_stride: int = 1, loss_name: str = "loss_atm") -> None:
        super().__init__()
        if ignored_pixels not in IGNORED_PIXELS:
            raise ValueError(f"ignored_pixels must be one of {IGNORED_PIXELS}, got {ignored_pixels!r}")
        self.num_classes = num_classes
        self.cls_weight = cls_weight
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.ignore_index = ignore_index
        self.ignored_pixels = ignored_pixels
        if label_stride < 1:
            raise ValueError(f"label_stride must be >= 1, got {label_stride}")
        self.label_stride = int(label_stride)
        self.criterion = _Criterion(absent_weight)
        self._loss_name = loss_name

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(self, presence_logits: Tensor, mask_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """presence (B, K, 2), masks (B, K, h, w) logits, labels (B, H, W) long."""
        B, K = presence_logits.shape[:2]
        valid = labels != self.ignore_index
        # present (image, class) pairs; ignored pixels land in an extra column K
        flat = torch.where(valid, labels, torch.full_like(labels, K)).flatten(1)
        present = torch.zeros(B, K + 1, dtype=torch.bool, device=labels.device)
        present = present.scatter_(1, flat, True)[:, :K]  # (B, K)
        cls_target = (~present).long()  # 0 = present, 1 = absent
        loss_cls = F.cross_entropy(presence_logits.reshape(B * K, 2), cls_target.reshape(-1),
                                   weight=self.criterion.empty_weight.to(presence_logits.dtype))
        b_idx, c_idx = present.nonzero(as_tuple=True)
        # every process takes part in the all-reduce, also one that saw no labelled pixel
        num_masks = global_mask_count(int(b_idx.numel()), presence_logits.device)
        if self.label_stride > 1:  # the mask terms on a regular subset of the label pixels
            k = self.label_stride
            labels = labels[:, k // 2::k, k // 2::k]
            valid = labels != self.ignore_index
            flat = torch.where(valid, labels, torch.full_like(labels, K)).flatten(1)
        if b_idx.numel():
            sel = upsample_bilinear(mask_logits[b_idx, c_idx].float(), labels.shape[-2:]).flatten(1)
            tgt = (flat[b_idx] == c_idx.unsqueeze(1)).float()
            pix = valid[b_idx].flatten(1).float() if self.ignored_pixels == "excluded" else None
            focal, dice = focal_dice(sel, tgt, self.focal_alpha, self.focal_gamma, pix)
            loss_focal = focal.sum() / num_masks
            loss_dice = dice.sum() / num_masks
        else:
            loss_focal = mask_logits.sum() * 0
            loss_dice = mask_logits.sum() * 0
        return {
            "loss_cls": self.cls_weight * loss_cls,
            "loss_mask": self.focal_weight * loss_focal,
            "loss_dice": self.dice_weight * loss_dice,
        }
