"""DToP segmentor: stage -> head -> exit decision -> next stage, batched over images.

Data flows one way. ``forward_dtop`` embeds the image, runs the backbone one stage at a time,
asks that stage's head for class logits of the tokens it saw, lets the pure exit policy
(:mod:`.exits`) pick the tokens that leave, and packs the remaining tokens of all images
into one padded batch for the next stage. The logits of each token are taken from the
head that saw it last (its exit head); the last head turns the merged logits into the
output (``class_scores``: with its presence for ATM, upsampled for SETR).

The head is a part: anything with the stage-head interface (``forward(tokens, valid) ->
(presence or None, logits (B, K, L))``, ``confidence``, ``class_scores``, ``loss``; see
:class:`.atm_head.ATMHead`) runs here, the ATM head of SegViT as the per-pixel heads of
SETR and Segmenter (:mod:`.pixel_heads`). A class token, where the backbone keeps one, is
carried beside the patch tokens through every stage and never exits.

At threshold 1.0 nothing can exit, so in inference the auxiliary heads are skipped
entirely; in training they always run (deep supervision) and exits are decided without
gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.config import ConfigDict
from mmengine.structures import PixelData
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from torch import Tensor

from ..errors import UserError
from ..presets import Threshold, check_threshold, stage_thresholds
from . import exits as X
from .exits import DToPOutput
from .graphs import StageGraphRunner
from .memo import StageMemo, input_digest, mask_digest


@dataclass
class _Carry:
    """What the staged forward carries from one stage to the next (see ``_forward_eager``).

    x (B, L, D) the active tokens; cls (B, 1, D) the class token (None: the backbone has
    none), which runs beside them and never exits; pos (B, L) their grid index (None: all, in order); valid
    (B, L) real slots (None: no padding); masks / presence: the last head's output on the
    active slots; merged (B, K, N) every token's mask logits from its latest head.
    """

    x: Tensor
    cls: Optional[Tensor]
    grid: tuple
    B: int
    running: "int | Tensor"
    exit_stage: Tensor
    counts: Tensor
    stage_presence: list
    stage_masks: list
    pos: Optional[Tensor] = None
    valid: Optional[Tensor] = None
    merged: Optional[Tensor] = None
    masks: Optional[Tensor] = None
    presence: Optional[Tensor] = None

    def copy(self) -> "_Carry":
        """A copy whose in-place updates (exit marks, counts) leave this one as it is."""
        return dataclasses.replace(self, exit_stage=self.exit_stage.clone(), counts=self.counts.clone(),
                                   stage_presence=list(self.stage_presence), stage_masks=list(self.stage_masks))


@MODELS.register_module()
class DToPSegmentor(EncoderDecoder):
    """mmseg segmentor running DToP.

    exit_cfg: dict(threshold=float in (0, 1] or one per non-final stage, keep_topk=int).
    `threshold` can be changed on a built model (evaluation at another threshold, through
    ``exit_mode``). `eval_stage` (1..S or None) makes
    inference output the given head's own prediction (per-stage mIoU of a base model).
    """

    def __init__(self, backbone: dict, decode_head: dict, auxiliary_head: list, exit_cfg: dict,
                 frozen: Sequence[str] = (), added_keys: Sequence[str] = (),
                 train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None, pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(backbone=backbone, decode_head=decode_head, auxiliary_head=auxiliary_head,
                         train_cfg=train_cfg, test_cfg=test_cfg, data_preprocessor=data_preprocessor,
                         pretrained=pretrained, init_cfg=init_cfg)
        # attribute access (cfg.stride) as mmseg's own inference code expects
        self.test_cfg = ConfigDict(test_cfg or dict(mode="whole"))
        n_stages = len(self.backbone.stage_ends)
        if len(self.auxiliary_head) != n_stages - 1:
            raise ValueError(f"{n_stages} stages need {n_stages - 1} auxiliary heads, got {len(self.auxiliary_head)}")
        self.threshold: Threshold = 1.0
        self.threshold = self.checked_threshold(exit_cfg.get("threshold", 1.0))
        self.keep_topk = int(exit_cfg.get("keep_topk", 5))
        self.eval_stage: Optional[int] = None
        # set by enable_cuda_graphs(): replays captured stages instead of the eager forward
        self.graph_runner = None
        # set by exit_mode(memo=...): stage work reused across evaluations of one image
        self.stage_memo: Optional[StageMemo] = None
        # parameter-name prefixes this run does not train (preset schedule.<phase>.frozen)
        self.frozen = tuple(frozen)
        # parameter-name prefixes the model files this preset loads do not have (added heads)
        self.added_keys = tuple(added_keys)
        for name, param in self.named_parameters():
            if self._is_frozen(name):
                param.requires_grad_(False)

    def _is_frozen(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.frozen)

    def train(self, mode: bool = True) -> "DToPSegmentor":
        """Frozen parts stay in eval mode (BatchNorm statistics, dropout, drop path) when
        the rest trains."""
        super().train(mode)
        if mode and self.frozen:
            for name, module in self.named_modules():
                if name and self._is_frozen(name):
                    module.eval()
        return self

    @property
    def graph_ready(self) -> bool:
        """Whether the CUDA-graph runner can run this model: it is written for ATM heads on
        a backbone without a class token (SegViT) and is untested on anything else."""
        return not self.backbone.with_cls_token and all(h.kind == "atm" for h in self.heads())

    @property
    def num_stages(self) -> int:
        return len(self.backbone.stage_ends)

    def heads(self) -> list:
        return [*self.auxiliary_head, self.decode_head]

    # ------------------------------------------------------------------ core
    def forward_dtop(self, inputs: Tensor, forced_exits: Optional[List[Tensor]] = None) -> DToPOutput:
        """Run the staged model on a batch of normalised images (B, 3, H, W).

        forced_exits: for benchmarks and tests, one (B, h*w) bool mask per non-final stage
        naming the tokens (by grid position) that leave after it, instead of the threshold
        rule. Tokens already gone are ignored; heads still run as with exits active.
        """
        runner = self.graph_runner
        if runner is not None and runner.accepts(self, inputs):
            return runner.forward(self, inputs, forced_exits)
        return self._forward_eager(inputs, forced_exits)

    def _forward_eager(self, inputs: Tensor, forced_exits: Optional[List[Tensor]] = None) -> DToPOutput:
        """The forward op by op (what the graph runner captures for the dense model).

        A non-final stage runs its head only where it can retire tokens (its threshold < 1),
        in training (deep supervision), with forced exits or for ``eval_stage``. With a
        ``memo`` (inference only) a stage whose inputs were seen before (same image, same
        exits at every earlier stage) is taken from it.
        """
        thresholds = self.stage_thresholds()
        forced = forced_exits is not None
        prune = forced or min(thresholds, default=1.0) < 1.0
        all_heads = self.training or forced or self.eval_stage is not None
        memo = None if all_heads else self.stage_memo  # inference at the model's own heads only
        digest = input_digest(inputs) if memo is not None else None
        decided: list = []  # per stage so far: its exits' fingerprint ("-": its head did not run)
        S = self.num_stages
        heads = self.heads()
        c: Optional[_Carry] = None
        for s, (start, end) in enumerate(self.backbone.stage_bounds()):
            last = s == S - 1
            run_head = last or all_heads or (prune and thresholds[s] < 1.0)
            key = None if memo is None else (digest, self.keep_topk, s, tuple(decided), run_head)
            hit = memo.get(key) if key is not None else None
            if hit is not None:
                c = hit.copy()
            else:
                c = self._embed(inputs) if c is None else c
                c.counts[:, s] = c.running
                c.x, c.cls = self.backbone.run_stage(c.x, c.cls, start, end, c.valid)
                if run_head:
                    presence, c.masks = heads[s](c.x, c.valid)
                    c.merged = c.masks if c.pos is None else X.scatter_tokens(c.merged, c.masks, c.pos, c.valid)
                    c.presence = c.stage_presence[s] = presence
                    c.stage_masks[s] = c.merged.view(c.B, -1, *c.grid)
                if key is not None:
                    memo.put(key, c.copy())
            if last or not (prune and run_head):
                decided.append("-")
                continue
            with torch.no_grad():
                leaving = self.leaving_tokens(s, c.presence, c.masks, c.valid, c.pos, forced_exits)
                plan = X.exit_plan(leaving, c.valid)  # the one host read of a stage
                if memo is not None:
                    decided.append(None if plan is None else mask_digest(plan.leaving))
                if plan is None:
                    continue
                X.mark_exits(c.exit_stage, plan.leaving, c.pos, s + 1)
                c.valid = plan.valid
                c.pos = plan.idx if c.pos is None else X.gather_tokens(c.pos, plan.idx)
                c.running = plan.counts
            c.x = X.gather_tokens(c.x, plan.idx)
        out_stage = S if self.eval_stage is None else self.eval_stage
        head = heads[out_stage - 1]
        if out_stage == S and c.pos is None and hasattr(head, "dense_scores"):
            # no token left early: the head's own dense computation (mmseg's, for SETR:
            # upsample the features, then classify), equal to class_scores up to rounding
            scores = head.dense_scores(c.x, c.grid)
        else:
            scores = head.class_scores(c.stage_presence[out_stage - 1], c.stage_masks[out_stage - 1])
        return DToPOutput(scores, c.exit_stage.view(c.B, *c.grid), c.counts, c.stage_presence, c.stage_masks)

    def _embed(self, inputs: Tensor) -> "_Carry":
        x, grid = self.backbone.embed(inputs)
        B, N = x.shape[:2]
        S = self.num_stages
        return _Carry(x=x, cls=self.backbone.class_token(B), grid=tuple(grid), B=B, running=N,
                      exit_stage=torch.full((B, N), S, dtype=torch.long, device=x.device),
                      counts=torch.empty(B, S, dtype=torch.long, device=x.device),
                      stage_presence=[None] * S, stage_masks=[None] * S)

    def stage_thresholds(self) -> tuple[float, ...]:
        """The exit threshold of each non-final stage (``threshold`` may be one for all)."""
        return stage_thresholds(self.threshold, self.num_stages - 1)

    def leaving_tokens(self, s: int, presence: Tensor, masks: Tensor, valid: Optional[Tensor],
                       pos: Optional[Tensor], forced_exits: Optional[List[Tensor]]) -> Tensor:
        """(B, L) slots whose token leaves after stage s (padding never leaves): the exit rule
        at the model's threshold, or the forced masks (by grid position) of a benchmark."""
        if forced_exits is not None:
            leaving = forced_exits[s].to(masks.device)
            leaving = leaving if pos is None else leaving.gather(1, pos)
            return leaving if valid is None else leaving & valid
        confidence = self.heads()[s].confidence(presence, masks)
        return X.exit_decision(confidence, self.stage_thresholds()[s], self.keep_topk, valid)

    @contextlib.contextmanager
    def exit_mode(self, threshold: Optional[Threshold] = None, stage: Optional[int] = None,
                  memo: Optional[StageMemo] = None) -> Iterator[None]:
        """Inference settings for the duration of a ``with`` block, restored afterwards.

        threshold: evaluate at this exit threshold (one number, or one per non-final stage)
        instead of the model's own. stage (1..S): output that head's own prediction
        (per-stage mIoU); None keeps the final one. memo: reuse stage work across calls
        (see :mod:`.memo`). The only place outside the constructor that changes these
        attributes.
        """
        saved = (self.threshold, self.eval_stage, self.stage_memo)
        try:
            if threshold is not None:
                self.threshold = self.checked_threshold(threshold)
            if memo is not None:
                self.stage_memo = memo
            if stage is not None:
                if not 1 <= int(stage) <= self.num_stages:
                    raise ValueError(f"stage must be in 1..{self.num_stages}, got {stage}")
                self.eval_stage = int(stage)
            yield
        finally:
            self.threshold, self.eval_stage, self.stage_memo = saved

    def checked_threshold(self, threshold: Threshold) -> Threshold:
        """A threshold in the model's form: a float, or a tuple with one per non-final stage
        (ValueError for a value outside (0, 1] or a wrong count)."""
        try:
            return check_threshold(threshold, "threshold", stages=self.num_stages - 1)
        except UserError as e:
            raise ValueError(str(e)) from None

    def enable_cuda_graphs(self, bucket: int = 16, capture: bool = True) -> None:
        """Replay inference as CUDA graphs (one per stage and padded width; the dense model
        as one graph). For the launch-bound case: small models or batches on a GPU.

        bucket: token counts are padded up to a multiple of this, so that a few captured
        graphs per stage cover every count. capture False runs the same staged program
        without graphs (any device; used by the tests). Only inference without gradients
        and without ``eval_stage`` uses it; everything else runs eagerly.
        """
        if not self.graph_ready:
            raise ValueError("CUDA graphs are implemented for ATM heads without a class token "
                             "(SegViT presets) only; run this model eagerly")
        self.graph_runner = StageGraphRunner(bucket=bucket, capture=capture)

    def disable_cuda_graphs(self) -> None:
        """Back to the eager forward (frees the captured graphs)."""
        self.graph_runner = None

    # ------------------------------------------------------------------ mmseg API
    def extract_feat(self, inputs: Tensor) -> DToPOutput:  # type: ignore[override]
        return self.forward_dtop(inputs)

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Class scores resized to the input size (what slide/whole inference average)."""
        return self._scores_at_input(self.forward_dtop(inputs), inputs)

    def _scores_at_input(self, out: DToPOutput, inputs: Tensor) -> Tensor:
        return F.interpolate(out.scores, size=inputs.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def _forward(self, inputs: Tensor, data_samples=None) -> Tensor:
        return self.forward_dtop(inputs).scores

    def loss(self, inputs: Tensor, data_samples: list) -> dict:
        """Deep supervision: every head's merged prediction gets that head's loss (ATM loss,
        or mmseg's cross-entropy with the preset's weights). Frozen heads are left out."""
        out = self.forward_dtop(inputs)
        # what this batch retired where: read by runtime.tracking.ExitStatsHook (prune runs)
        self.train_exit_record = (out.exit_stage.detach(), out.active_counts.detach())
        labels = torch.stack([ds.gt_sem_seg.data for ds in data_samples]).squeeze(1).long()
        losses = {}
        names = [f"aux_{i}" for i in range(self.num_stages - 1)] + ["decode"]
        for head, name, presence, masks in zip(self.heads(), names, out.stage_presence, out.stage_masks):
            prefix = "decode_head" if name == "decode" else f"auxiliary_head.{name[4:]}"
            if self._is_frozen(prefix):  # e.g. "decode_head", or all of "auxiliary_head"
                continue
            for k, v in head.loss(presence, masks, labels).items():
                losses[f"{name}.{k}"] = v
        return losses

    def infer_with_exits(self, inputs: Tensor, batch_img_metas: List[dict]) -> tuple[Tensor, Tensor, list]:
        """Inference by the test protocol, also returning the exit-stage map and token counts.

        Returns seg scores (B, K, H, W), exit stage per pixel (B, H, W) (max over overlapping
        windows in slide mode) and, per image, a list of (window h, window w, counts per stage).
        """
        B, _, H, W = inputs.shape
        if self.test_cfg.get("mode", "whole") == "slide":
            h_stride, w_stride = self.test_cfg.stride
            h_crop, w_crop = self.test_cfg.crop_size
            h_grids = max(H - h_crop + h_stride - 1, 0) // h_stride + 1
            w_grids = max(W - w_crop + w_stride - 1, 0) // w_stride + 1
            windows = []
            for hi in range(h_grids):
                for wi in range(w_grids):
                    y2, x2 = min(hi * h_stride + h_crop, H), min(wi * w_stride + w_crop, W)
                    windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
        else:
            windows = [(0, H, 0, W)]
        preds = inputs.new_zeros((B, self.out_channels, H, W))
        count = inputs.new_zeros((B, 1, H, W))
        stage_pix = torch.zeros(B, H, W, dtype=torch.long, device=inputs.device)
        per_image: list = [[] for _ in range(B)]
        for y1, y2, x1, x2 in windows:
            crop = inputs[:, :, y1:y2, x1:x2]
            out = self.forward_dtop(crop)
            preds[:, :, y1:y2, x1:x2] += self._scores_at_input(out, crop)
            count[:, :, y1:y2, x1:x2] += 1
            st = F.interpolate(out.exit_stage[:, None].float(), scale_factor=self.backbone.patch_size,
                               mode="nearest")[:, 0, : y2 - y1, : x2 - x1].long()
            stage_pix[:, y1:y2, x1:x2] = torch.maximum(stage_pix[:, y1:y2, x1:x2], st)
            for b in range(B):
                per_image[b].append((y2 - y1, x2 - x1, out.active_counts[b].tolist()))
        return preds / count, stage_pix, per_image

    def predict(self, inputs: Tensor, data_samples: Optional[list] = None) -> list:
        """mmseg predict + `exit_stage` (PixelData at input resolution) and token counts."""
        if data_samples is not None:
            metas = [ds.metainfo for ds in data_samples]
        else:
            shape = inputs.shape[2:]
            metas = [dict(ori_shape=shape, img_shape=shape, pad_shape=shape, padding_size=[0, 0, 0, 0])] * inputs.shape[0]
        seg, stage_pix, per_image = self.infer_with_exits(inputs, metas)
        results = self.postprocess_result(seg, data_samples)
        for ds, st, windows in zip(results, stage_pix, per_image):
            ds.set_data({"exit_stage": PixelData(data=st[None])})
            ds.set_metainfo({"dtop_windows": windows})
        return results
