"""The exit policy of DToP as small pure tensor functions.

Nothing here knows about models: scores in, masks and gather plans out. Every function works
on a whole batch at once (no loop over images) and on a padded token axis, so the segmentor
can run later stages on the active tokens of all images together.

Shapes: B images, K classes, L token slots (possibly padded), D channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def token_scores(presence_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-token class score = P(class present) * sigmoid(mask logit).

    presence_logits: (B, K, 2), index 0 = present. mask_logits: (B, K, L). Returns (B, K, L).
    """
    present = presence_logits.softmax(-1)[..., 0]
    return present.unsqueeze(-1) * mask_logits.sigmoid()


def confident(scores: Tensor, threshold: float, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens whose best class score exceeds the threshold.

    Returns (retiring (B, L) bool, best score (B, L), best class (B, L)). Padding slots
    (valid False) never retire.
    """
    best, cls = scores.max(dim=1)
    retiring = best > threshold
    if valid is not None:
        retiring = retiring & valid
    return retiring, best, cls


def keep_topk_per_class(best: Tensor, cls: Tensor, retiring: Tensor, num_classes: int, k: int) -> Tensor:
    """For every class that would retire tokens, the k most confident of them stay active.

    Later layers then still see a few tokens of each class as context. Per image: an image
    with n retiring tokens of class c keeps exactly min(k, n) of them. Returns (B, L) bool.
    """
    if k <= 0:
        return torch.zeros_like(retiring)
    B, L = best.shape
    member = torch.zeros(B, num_classes, L, dtype=torch.bool, device=best.device)
    member.scatter_(1, cls.unsqueeze(1), retiring.unsqueeze(1))
    ranked = torch.where(member, best.unsqueeze(1), -1.0)
    vals, idx = ranked.topk(min(k, L), dim=-1)  # (B, K, k)
    chosen = (vals >= 0).to(torch.int32)  # scores are in [0, 1]; -1 marks non-members
    keep = torch.zeros(B, L, dtype=torch.int32, device=best.device)
    keep.scatter_add_(1, idx.flatten(1), chosen.flatten(1))
    return keep > 0


def exit_decision(scores: Tensor, threshold: float, keep_topk: int, valid: Tensor | None = None) -> Tensor:
    """Which tokens leave the network after this stage: confident and not kept as context."""
    retiring, best, cls = confident(scores, threshold, valid)
    keep = keep_topk_per_class(best, cls, retiring, scores.shape[1], keep_topk)
    return retiring & ~keep


def compact_plan(active: Tensor, width: int | None = None, counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gather plan that packs the active tokens of every image to the front of the slot axis.

    Returns idx (B, L') with the slot index of each kept token, in original order, padded
    with indices of inactive slots, and valid (B, L') marking real tokens. L' = width,
    by default the largest active count in the batch (then one host sync: the padded
    length must be known); a caller that already knows it (or pads to a bucket size,
    at most the slot count) passes it, with the per-image counts if it has them.
    """
    counts = active.sum(dim=1) if counts is None else counts
    if width is None:
        width = int(counts.max())
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=active.device).unsqueeze(0) < counts.unsqueeze(1)
    return order, valid


@dataclass
class ExitPlan:
    """How the tokens of a batch go on after a stage.

    leaving (B, L): slots whose token retires now (after the keep-one rule). idx (B, W):
    gather plan of the staying tokens (see :func:`compact_plan`). valid (B, W) or None
    when no slot of the new batch is padding. counts (B,): tokens each image keeps.
    """

    leaving: Tensor
    idx: Tensor
    valid: Tensor | None
    counts: Tensor


def exit_plan(leaving: Tensor, valid: Tensor | None = None, multiple: int = 1) -> ExitPlan | None:
    """Turn the retiring slots of a stage into the next stage's gather plan, with one sync.

    leaving (B, L) must already exclude padding slots. None when no token leaves (the
    batch goes on unchanged). An image keeps at least one token (its slot 0, always
    real): the heads need a key. The new width is the largest count rounded up to a
    multiple of `multiple` (at most L): fewer distinct shapes for captured graphs.
    The only host syncs are the one read of (largest count, smallest count, leavers),
    which also tells whether the new batch needs a padding mask, and a second one in the
    rare case that an image would lose every token.
    """
    active = ~leaving if valid is None else valid & ~leaving
    counts = active.sum(dim=1)
    hi, lo, gone = torch.stack([counts.max(), counts.min(), leaving.sum()]).tolist()
    if gone and not lo:
        leaving = leaving.clone()
        leaving[:, 0] &= counts > 0
        active = ~leaving if valid is None else valid & ~leaving
        counts = active.sum(dim=1)
        hi, lo, gone = torch.stack([counts.max(), counts.min(), leaving.sum()]).tolist()
    if not gone:
        return None
    width = min(-(-hi // multiple) * multiple, leaving.shape[1])
    idx, new_valid = compact_plan(active, width, counts)
    return ExitPlan(leaving, idx, None if lo == width else new_valid, counts)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, L, ...) -> x at idx (B, L'), along the token axis (dim 1)."""
    view = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(1, view)


def scatter_tokens(full: Tensor, values: Tensor, pos: Tensor, valid: Tensor | None, dim: int = -1) -> Tensor:
    """Write values (.., L') into full (.., N) at token positions pos (B, L'), valid slots only.

    Out of place so gradients flow to both. Padding slots write back what is already there,
    so they can never leak into a real token. dim is the token axis of full/values;
    valid None means every slot is real.
    """
    dim = dim % full.dim()
    shape = [pos.shape[0]] + [1] * (full.dim() - 1)
    shape[dim] = pos.shape[1]
    index = pos.view(shape).expand(*values.shape)
    if valid is None:
        return full.scatter(dim, index, values)
    keep = valid.view(shape).expand(*values.shape)
    current = full.gather(dim, index)
    return full.scatter(dim, index, torch.where(keep, values, current))
