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
                 loss_name: str = "loss_atm") -> None:
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
        self.criterion = _Criterion(absent_weight)
        self._loss_name = loss_name

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(self, presence_logits: Tensor, mask_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """presence (B, K, 2), masks (B, K, h, w) logits, labels (B, H, W) long."""
        B, K = presence_logits.shape[:2]
        valid = labels != self.ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        onehot = F.one_hot(safe, K).permute(0, 3, 1, 2) & valid.unsqueeze(1)  # (B, K, H, W)
        present = onehot.flatten(2).any(-1)  # (B, K)
        cls_target = (~present).long()  # 0 = present, 1 = absent
        loss_cls = F.cross_entropy(presence_logits.reshape(B * K, 2), cls_target.reshape(-1),
                                   weight=self.criterion.empty_weight.to(presence_logits.dtype))
        b_idx, c_idx = present.nonzero(as_tuple=True)
        # every process takes part in the all-reduce, also one that saw no labelled pixel
        num_masks = global_mask_count(int(b_idx.numel()), presence_logits.device)
        if b_idx.numel():
            sel = mask_logits[b_idx, c_idx].unsqueeze(1)  # (P, 1, h, w)
            sel = F.interpolate(sel, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            sel = sel.flatten(1).float()
            tgt = onehot[b_idx, c_idx].flatten(1).float()
            focal = sigmoid_focal_loss(sel, tgt, self.focal_alpha, self.focal_gamma)
            if self.ignored_pixels == "negative":
                loss_focal = focal.mean(-1).sum() / num_masks
                loss_dice = dice_loss(sel, tgt).sum() / num_masks
            else:
                pix = valid[b_idx].flatten(1).float()
                loss_focal = ((focal * pix).sum(-1) / pix.sum(-1).clamp(min=1)).sum() / num_masks
                loss_dice = dice_loss(sel, tgt, pix).sum() / num_masks
        else:
            loss_focal = mask_logits.sum() * 0
            loss_dice = mask_logits.sum() * 0
        return {
            "loss_cls": self.cls_weight * loss_cls,
            "loss_mask": self.focal_weight * loss_focal,
            "loss_dice": self.dice_weight * loss_dice,
        }
