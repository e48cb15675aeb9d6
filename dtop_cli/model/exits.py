"""The exit policy of DToP as small pure tensor functions.

Nothing here knows about models: scores in, masks and gather plans out. Every function works
on a whole batch at once (no loop over images) and on a padded token axis, so the segmentor
can run later stages on the active tokens of all images together.

Shapes: B images, K classes, L token slots (possibly padded), D channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

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


@dataclass
class Compaction:
    """The next stage's batch after a stage's exits, as device tensors (no host read).

    leaving (B, L): slots whose token retires now, after the keep-one rule. order (B, L):
    slot indices with the staying tokens first, in their original order, then the rest;
    the first ``counts[b]`` entries of row b are image b's staying tokens. counts (B,).
    """

    leaving: Tensor
    order: Tensor
    counts: Tensor

    def stats(self) -> Tensor:
        """(largest count, smallest count, tokens leaving) as one tensor: the one value a
        caller reads back to the host to size the next stage (see :func:`exit_plan`)."""
        return torch.stack([self.counts.max(), self.counts.min(), self.leaving.sum()])


def compact(leaving: Tensor, valid: Tensor | None = None) -> Compaction:
    """Pack the staying tokens of every image to the front of the slot axis, sync-free.

    leaving (B, L) must already exclude padding slots (valid False). An image keeps at
    least one token (its slot 0, always real): the heads need a key. The one compaction of
    the project: the eager forward (through :func:`exit_plan`) and the CUDA-graph runner
    (which cannot read anything back while a graph is captured) both call it.
    """
    active = ~leaving if valid is None else valid & ~leaving
    leaving = leaving.clone()
    leaving[:, 0] &= active.any(1)
    active = ~leaving if valid is None else valid & ~leaving
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)
    return Compaction(leaving, order, active.sum(dim=1))


def slot_valid(counts: Tensor, width: int) -> Tensor:
    """(B, width) mask of the real slots of a packed batch whose images keep ``counts``."""
    return torch.arange(width, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)


@dataclass
class ExitPlan:
    """How the tokens of a batch go on after a stage.

    leaving (B, L): slots whose token retires now (after the keep-one rule). idx (B, W):
    gather plan of the staying tokens (see :class:`Compaction`). valid (B, W) or None
    when no slot of the new batch is padding. counts (B,): tokens each image keeps.
    """

    leaving: Tensor
    idx: Tensor
    valid: Tensor | None
    counts: Tensor


def exit_plan(leaving: Tensor, valid: Tensor | None = None) -> ExitPlan | None:
    """Turn the retiring slots of a stage into the next stage's gather plan.

    :func:`compact`, then the one host read of a stage: (largest count, smallest count,
    leavers). The new width is the largest count, so no slot is wasted; padding exists
    only where images keep different numbers. None when no token leaves (the batch goes
    on unchanged).
    """
    c = compact(leaving, valid)
    hi, lo, gone = c.stats().tolist()
    if not gone:
        return None
    return ExitPlan(c.leaving, c.order[:, :hi], None if lo == hi else slot_valid(c.counts, hi), c.counts)


def mark_exits(exit_stage: Tensor, leaving: Tensor, pos: Tensor | None, stage: int) -> None:
    """Record in place that the tokens in ``leaving`` slots were finalised by ``stage``.

    exit_stage (B, N) by grid position; leaving (B, L) by slot; pos (B, L) grid position of
    each slot (None: slots are still the grid positions).
    """
    if pos is None:
        exit_stage.masked_fill_(leaving, stage)
    else:
        exit_stage.scatter_(1, pos, torch.where(leaving, stage, exit_stage.gather(1, pos)))


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


@dataclass
class DToPOutput:
    """Everything one batched forward produced.

    scores: (B, K, h, w) final class scores. exit_stage: (B, h, w) 1..S, the stage whose
    head finalised each token. active_counts: (B, S) tokens each stage's layers ran on.
    stage_presence / stage_masks: per head that ran, its presence logits (B, K, 2) and the
    merged mask logits (B, K, h, w) up to that stage (retired tokens keep their exit head's
    logits); used for deep supervision and per-stage evaluation.
    """

    scores: Tensor
    exit_stage: Tensor
    active_counts: Tensor
    stage_presence: List[Optional[Tensor]] = field(default_factory=list)
    stage_masks: List[Optional[Tensor]] = field(default_factory=list)
