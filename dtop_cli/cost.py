"""The FLOP counter: DToP counted the way the paper counts it, traced once or in closed form.

The convention (reference: method.md, "Results to reproduce") is fvcore's, through its port
in ``mmengine.analysis``: one multiply-add is one FLOP; linear layers, matmuls and the patch
convolution count their multiply-adds; layer norm counts 5 per element; the bilinear resize
of the class scores to the input size counts 4 per output element; everything that only
moves or compares data (gather, scatter, sort, top-k, masks) and plain elementwise math count
zero. The counter has no rule for ``scaled_dot_product_attention`` (it would count zero), so
we add one that counts exactly the two matmuls an explicitly written attention makes
(q @ k^T and attn @ v). One image at crop size, no sliding window. At threshold 1.0 the
auxiliary heads are not run at inference and so not counted; with exits active they are.

Two ways to get the number, which the tests hold equal:

* the trace (:func:`trace_flops`, :func:`count_gflops`): one ``torch.jit`` trace of
  ``forward_dtop`` plus the final resize through ``FlopAnalyzer``. This is the reference.
* the closed form (:func:`cost_from_counts`): the same sum written per layer as a function
  of the number of tokens each stage ran on (``DToPOutput.active_counts``). Linear layers
  grow with N, attention with N^2. It turns the dynamic cost of a pruned model over a
  dataset into one ordinary forward per image instead of one trace per image, and gives
  ``api.predict`` the cost of each image for free.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .presets import heads_that_run

GIGA = 1e9

# Ops the exit path and the elementwise math emit. fvcore counts data movement, comparisons
# and elementwise arithmetic as zero; naming them here makes that explicit (and keeps the
# counter from warning about them) instead of relying on "unknown means zero".
ZERO_FLOP_OPS: tuple[str, ...] = (
    # data movement / indexing (the batched exit path: gather active tokens, scatter back)
    "aten::gather", "aten::scatter", "aten::scatter_", "aten::scatter_add", "aten::scatter_add_",
    "aten::index", "aten::index_select", "aten::index_put_", "aten::masked_scatter",
    "aten::argsort", "aten::sort", "aten::topk", "aten::where", "aten::masked_fill",
    "aten::masked_fill_", "aten::expand_as", "aten::repeat", "aten::fill_", "aten::zero_",
    "aten::clone", "aten::to", "aten::type_as", "aten::pad", "aten::constant_pad_nd",
    "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::view",
    "aten::transpose", "aten::t", "aten::split", "aten::stack", "aten::unbind", "aten::zeros",
    "aten::zeros_like", "aten::ones_like", "aten::empty_like", "aten::lift_fresh",
    # comparisons and reductions over masks
    "aten::lt", "aten::le", "aten::ne", "aten::any", "aten::all", "aten::sum", "aten::cumsum",
    "aten::logical_not", "aten::logical_and", "aten::bitwise_and", "aten::bitwise_or",
    "aten::__or__", "aten::__iand__", "aten::__ior__", "aten::min", "aten::maximum",
    # elementwise math: residual adds, activations, softmax, score products, head averages
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div",
    "aten::div_", "aten::neg", "aten::exp", "aten::sqrt", "aten::rsqrt", "aten::pow",
    "aten::gelu", "aten::sigmoid", "aten::softmax", "aten::log_softmax", "aten::mean",
    "aten::bernoulli_", "aten::dropout", "aten::feature_dropout",
    # the position table's bicubic resize (inputs not at crop size): fvcore has no rule for it
    "aten::upsample_bicubic2d",
)


# --------------------------------------------------------------------------- the counter


def _shape(value: Any) -> list[int]:
    if not value.isCompleteTensor():
        raise ValueError("FLOP counter: scaled_dot_product_attention input without a known shape")
    return list(value.type().sizes())


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::scaled_dot_product_attention``: the multiply-adds of q @ k^T and attn @ v.

    q (..., L, E), k (..., S, E), v (..., S, Ev): L*S*E + L*S*Ev per leading index, exactly
    what fvcore's matmul rule gives the two matmuls of an explicitly written attention.
    Scaling, masking and softmax are elementwise (zero), as for the explicit form.
    """
    q, k, v = (_shape(t) for t in inputs[:3])
    rows = math.prod(q[:-1])
    return rows * k[-2] * q[-1] + rows * k[-2] * v[-1]


def flop_analyzer(module: nn.Module, inputs: tuple[Tensor, ...]):
    """mmengine's ``FlopAnalyzer`` (fvcore's counter) with the rules DToP needs added."""
    from mmengine.analysis import FlopAnalyzer

    fa = FlopAnalyzer(module, inputs)
    fa.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    for op in ZERO_FLOP_OPS:
        fa.set_op_handle(op, None)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    return fa


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs (not giga) of one image, split where the paper's breakdown splits them."""

    backbone: float
    heads: float
    resize: float

    @property
    def total(self) -> float:
        return self.backbone + self.heads + self.resize

    def __add__(self, other: FlopBreakdown) -> FlopBreakdown:
        return FlopBreakdown(self.backbone + other.backbone, self.heads + other.heads,
                             self.resize + other.resize)

    def scaled(self, factor: float) -> FlopBreakdown:
        return FlopBreakdown(self.backbone * factor, self.heads * factor, self.resize * factor)

    def gflops(self) -> dict:
        """{backbone, heads, resize} in GFLOPs (what reports print)."""
        return {"backbone": self.backbone / GIGA, "heads": self.heads / GIGA, "resize": self.resize / GIGA}


class _CountedForward(nn.Module):
    """What one inference forward computes: ``forward_dtop`` + the bilinear resize of the
    class scores to the input size (mmseg's ``encode_decode``).

    Forced exit masks come in as extra trace inputs so they are data, not constants baked
    into the graph. The trace drops every op whose result nothing reads; with forced exits
    nothing reads the auxiliary heads' presence logits, although in a real pruned forward
    they decide the exits. So every head's presence logits are returned as well: the count
    is then that of the real forward, forced or not.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, *forced_exits: Tensor) -> tuple[Tensor, ...]:
        out = self.model.forward_dtop(inputs, list(forced_exits) if forced_exits else None)
        scores = F.interpolate(out.scores, size=inputs.shape[-2:], mode="bilinear",
                               align_corners=self.model.align_corners)
        return (scores, *(p for p in out.stage_presence if p is not None))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def trace_flops(model: nn.Module, inputs: Tensor,
                forced_exits: Sequence[Tensor] | None = None) -> FlopBreakdown:
    """FLOPs per image of one forward of ``model`` on ``inputs`` (B, 3, H, W), by tracing.

    The count covers the whole batch and is divided by B. With B > 1 and exits, the
    padded token slots of the batched path are counted too (the hardware computes them);
    the paper's convention is batch 1, where there is no padding.
    """
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be (B, 3, H, W), got {tuple(inputs.shape)}")
    wrapper = _CountedForward(model)
    args = (inputs, *(forced_exits or ()))
    with _eval_mode(model), torch.no_grad():
        fa = flop_analyzer(wrapper, args)
        by_module = fa.by_module()
    total = float(by_module[""])
    heads = float(by_module.get("model.decode_head", 0)) + float(by_module.get("model.auxiliary_head", 0))
    in_model = float(by_module.get("model", 0))
    # ops of forward_dtop outside any submodule (exit glue: zero-cost) go with the backbone;
    # what lies outside the model is the final resize
    br = FlopBreakdown(backbone=in_model - heads, heads=heads, resize=total - in_model)
    return br.scaled(1.0 / inputs.shape[0])


def count_gflops(model: nn.Module, inputs: Tensor, forced_exits: Sequence[Tensor] | None = None) -> float:
    """GFLOPs per image of one forward (``forward_dtop`` + final resize), traced with
    mmengine's FlopAnalyzer and the handles above. See :func:`trace_flops`."""
    return trace_flops(model, inputs, forced_exits).total / GIGA


# --------------------------------------------------------------------------- closed form


def _linear(layer: nn.Linear, rows: int) -> int:
    return rows * layer.in_features * layer.out_features


def _layer_norm(norm: nn.LayerNorm, rows: int) -> int:
    # fvcore: 5 per element with an affine transform, 4 without
    return rows * math.prod(norm.normalized_shape) * (5 if norm.elementwise_affine else 4)


def _self_attention(attn: nn.Module, n: int) -> int:
    """Packed in-projection, SDPA (2 matmuls over n x n), out-projection."""
    three_d, d = attn.in_proj_weight.shape
    dims = three_d // 3
    return n * three_d * d + 2 * n * n * dims + _linear(attn.out_proj, n)


def vit_layer_flops(layer: nn.Module, n: int) -> int:
    """One pre-norm ViT layer on n tokens: norms and linears ~ n, attention ~ n^2."""
    fc1, fc2 = layer.ffn.layers[0][0], layer.ffn.layers[1]
    return (_layer_norm(layer.ln1, n) + _self_attention(layer.attn.attn, n) + _layer_norm(layer.ln2, n)
            + _linear(fc1, n) + _linear(fc2, n))


def atm_head_flops(head: nn.Module, n: int) -> int:
    """One ATM head reading n tokens with K class queries (K fixed, so only the token
    projections and the cross-attention grow with n)."""
    K = head.q.num_embeddings
    flops = _linear(head.input_proj, n) + _layer_norm(head.proj_norm, n)
    for lay in head.decoder.layers:
        ca = lay.multihead_attn
        C = ca.q.out_features
        flops += _self_attention(lay.self_attn, K) + _layer_norm(lay.norm1, K)
        flops += _linear(ca.q, K) + _linear(ca.k, n) + _linear(ca.v, n) + 2 * K * n * C + _linear(ca.proj, K)
        flops += _layer_norm(lay.norm2, K) + _linear(lay.linear1, K) + _linear(lay.linear2, K)
        flops += _layer_norm(lay.norm3, K)
    return flops + _linear(head.class_embed, K)


def _upsample(channels: int, hw: tuple[int, int], scale: int) -> int:
    """Bilinear upsample: fvcore counts 4 per output element."""
    return 4 * channels * hw[0] * scale * hw[1] * scale


def setr_head_flops(head: nn.Module, n: int) -> int:
    """SETR-Up head per token (``forward``): LayerNorm, 1x1 conv + BatchNorm (2 per element
    in eval) per block, 1x1 classifier; ReLU counts zero."""
    flops = _layer_norm(head.norm, n)
    for block in head.up_convs:
        conv = block[0].conv
        flops += n * conv.in_channels * conv.out_channels + 2 * n * conv.out_channels
    return flops + n * head.conv_seg.in_channels * head.conv_seg.out_channels


def setr_dense_flops(head: nn.Module, hw: tuple[int, int]) -> int:
    """SETR-Up head as mmseg runs it on the whole grid (``dense_scores``): each block at its
    resolution, its x`up_scale` upsample of the features, the classifier at the end."""
    h, w = hw
    flops = _layer_norm(head.norm, h * w)
    for block in head.up_convs:
        conv = block[0].conv
        flops += h * w * (conv.in_channels * conv.out_channels + 2 * conv.out_channels)
        flops += _upsample(conv.out_channels, (h, w), head.up_scale)
        h, w = h * head.up_scale, w * head.up_scale
    return flops + h * w * head.conv_seg.in_channels * head.conv_seg.out_channels


def mask_transformer_flops(head: nn.Module, n: int) -> int:
    """Segmenter's mask transformer on n tokens + K class embeddings: input projection,
    ViT layers over n + K, norm, the two projections, the class-token product, mask norm.
    The L2 normalisations are elementwise (zero)."""
    K = head.num_classes
    flops = _linear(head.dec_proj, n) + sum(vit_layer_flops(lay, n + K) for lay in head.layers)
    flops += _layer_norm(head.decoder_norm, n + K) + _linear(head.patch_proj, n) + _linear(head.classes_proj, K)
    return flops + n * head.patch_proj.out_features * K + _layer_norm(head.mask_norm, n)


def linear_head_flops(head: nn.Module, n: int) -> int:
    """LayerNorm + Linear per token."""
    return _layer_norm(head.norm, n) + _linear(head.classifier, n)


def head_flops(head: nn.Module, n: int) -> int:
    """One stage head reading n tokens (its ``forward``), by the head's kind."""
    rules = {"atm": atm_head_flops, "setr-up": setr_head_flops, "mask-transformer": mask_transformer_flops,
             "linear": linear_head_flops}
    return rules[head.kind](head, n)


def output_flops(head: nn.Module, hw: tuple[int, int]) -> int:
    """The head's ``class_scores`` on an (h, w) grid of merged logits: SETR's upsamples."""
    if head.kind != "setr-up":
        return 0
    total = 0
    for _ in head.up_convs:
        total += _upsample(head.num_classes, hw, head.up_scale)
        hw = (hw[0] * head.up_scale, hw[1] * head.up_scale)
    return total


def patch_embed_flops(backbone: nn.Module, hw: tuple[int, int]) -> int:
    """The patch convolution: every output position costs the full kernel."""
    w = backbone.patch_embed.projection.weight
    return hw[0] * hw[1] * w.numel()


def resize_flops(num_classes: int, out_hw: tuple[int, int]) -> int:
    """Bilinear resize of the class scores: fvcore counts 4 per output element."""
    return 4 * num_classes * out_hw[0] * out_hw[1]


def aux_heads_active(model: nn.Module) -> list[bool]:
    """Which auxiliary heads inference runs: those whose stage can retire tokens (its
    threshold < 1), or all of them when their own prediction is asked for (``eval_stage``)."""
    if getattr(model, "eval_stage", None) is not None:
        return [True] * (model.num_stages - 1)
    return heads_that_run(model.threshold, model.num_stages - 1)


def cost_from_counts(model: nn.Module, hw: tuple[int, int], counts: Sequence[int],
                     out_hw: tuple[int, int] | None = None, aux_heads: bool | Sequence[bool] | None = None
                     ) -> FlopBreakdown:
    """FLOPs of one forward of one image from the tokens each stage ran on.

    hw: token grid (h, w). counts: tokens each stage's layers ran on (a row of
    ``DToPOutput.active_counts``); head s reads the tokens stage s produced, so it sees
    counts[s] too. out_hw: pixel size the scores are resized to (default: grid x patch).
    aux_heads: whether the auxiliary heads ran, all of them or one flag per head (default:
    from the model's thresholds and eval_stage, see :func:`aux_heads_active`). Padding slots are not counted: this is the cost of this image alone.
    """
    bb = model.backbone
    bounds = bb.stage_bounds()
    counts = [int(c) for c in counts]
    if len(counts) != len(bounds):
        raise ValueError(f"expected {len(bounds)} stage counts, got {len(counts)}")
    if aux_heads is None:
        aux_heads = aux_heads_active(model)
    if isinstance(aux_heads, bool):
        aux_heads = [aux_heads] * (len(bounds) - 1)
    if out_hw is None:
        out_hw = (hw[0] * bb.patch_size, hw[1] * bb.patch_size)
    heads = model.heads()
    backbone = patch_embed_flops(bb, hw)
    extra = 1 if bb.with_cls_token else 0  # the class token: one more token in every layer
    stage_heads = 0
    S = len(bounds)
    eval_stage = getattr(model, "eval_stage", None)
    out_stage = S if eval_stage is None else int(eval_stage)
    # every token reached the last stage: the segmentor asks the decode head for its dense
    # output (mmseg's own computation, `dense_scores`), where the head has one
    dense = counts[-1] == hw[0] * hw[1] and out_stage == S and hasattr(model.decode_head, "dense_scores")
    for s, ((start, end), n) in enumerate(zip(bounds, counts)):
        backbone += sum(vit_layer_flops(bb.layers[i], n + extra) for i in range(start, end))
        if bb.final_norm and end == len(bb.layers):
            backbone += _layer_norm(bb.ln1, n + extra)
        if s == S - 1 and dense:
            stage_heads += setr_dense_flops(heads[s], hw)
        elif s == S - 1 or aux_heads[s]:
            stage_heads += head_flops(heads[s], n)
    if not dense:  # the output head's upsampling of the merged logits (SETR)
        stage_heads += output_flops(heads[out_stage - 1], hw)
    resize = resize_flops(model.decode_head.num_classes, out_hw)
    return FlopBreakdown(float(backbone), float(stage_heads), float(resize))


def gflops_from_counts(model: nn.Module, hw: tuple[int, int], counts: Sequence[int],
                       out_hw: tuple[int, int] | None = None, aux_heads: bool | Sequence[bool] | None = None
                       ) -> float:
    """GFLOPs of one forward of one image from its active token counts (see cost_from_counts)."""
    return cost_from_counts(model, hw, counts, out_hw, aux_heads).total / GIGA


def protocol_gflops(model: nn.Module, windows: Sequence[tuple[int, int, Sequence[int]]]) -> float:
    """GFLOPs one image cost under the test protocol (``gflops_protocol``): the sum over the
    forward windows (h, w in pixels, active counts per stage) it was run on
    (``metainfo['dtop_windows']``). Not the paper's convention, which counts one crop-size
    window (see :mod:`dtop_cli.measure`); on slide-mode presets the two differ about twofold."""
    ps = model.backbone.patch_size
    total = 0.0
    for h, w, counts in windows:
        hw = (-(-int(h) // ps), -(-int(w) // ps))
        total += cost_from_counts(model, hw, counts, out_hw=(int(h), int(w))).total
    return total / GIGA
