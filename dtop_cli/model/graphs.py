"""DToP inference replayed as CUDA graphs: one graph per stage and padded token count.

Why: a GPU runs a ViT stage at batch 1 faster than the host can launch its kernels, and a
pruned forward adds host work between stages (the exit decision, the gather plan, one
device->host read of the new token count). Captured graphs turn each stage, exit decision
and compaction included, into a single launch; what is left on the host per stage is
that one read of (largest count, smallest count, leavers), which picks the next graph.

How: all state that crosses a stage boundary lives in persistent buffers (one set per
input signature) at full token count N: tokens ``x``, their grid positions ``pos``, the
padding mask ``valid``, the merged mask logits after every stage, the exit-stage map and
the counts. The graph of stage s at width W reads the first W slots, runs the layers and
the head, decides the exits and writes the compacted batch back into the first W slots,
so any graph of stage s+1 can read it at its own width W' <= W. Widths are rounded up to
a multiple of ``bucket`` (padding slots are masked as keys), so a few graphs per stage
cover every count. A stage met at a new width first runs eagerly (that run is this
forward's work and the capture's warm-up), then is captured for the next time.

The dense model (threshold 1.0: no decisions, no host reads) is captured whole, so a
dense/pruned comparison gives both the same treatment. With per-stage thresholds every
stage of a pruned forward runs its head (a stage at 1.0 then retires nothing), where the
eager forward skips that head: same result, a little more work.

With ``capture=False`` the same staged program runs without graphs on any device: the
tests check it against the eager forward on a CPU.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import exits as X
from .exits import DToPOutput

logger = logging.getLogger(__name__)


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def next_width(hi: int, lo: int, width: int, bucket: int) -> Tuple[int, bool]:
    """Width of the next stage's batch and whether it has padding slots.

    hi / lo: largest and smallest count of tokens an image keeps; width: the current width
    (the compacted batch lives in its first slots, so the next one cannot be wider).
    """
    w = min(round_up(hi, bucket), width)
    return w, not (lo == hi == w)


class _State:
    """Persistent buffers of one input signature (shape, dtype, device, exit mode)."""

    def __init__(self, model, inputs: Tensor, forced: bool) -> None:
        B, _, H, W = inputs.shape
        ps = model.backbone.patch_size
        self.grid = (-(-H // ps), -(-W // ps))
        N = self.grid[0] * self.grid[1]
        D = model.backbone.pos_embed.shape[-1]
        K = model.decode_head.num_classes
        S = model.num_stages
        dev, dt = inputs.device, model.backbone.pos_embed.dtype
        self.S, self.N, self.B = S, N, B
        self.img = torch.empty_like(inputs)
        self.x = torch.zeros(B, N, D, dtype=dt, device=dev)
        self.pos = torch.zeros(B, N, dtype=torch.long, device=dev)
        self.valid = torch.zeros(B, N, dtype=torch.bool, device=dev)
        self.merged = [torch.zeros(B, K, N, dtype=dt, device=dev) for _ in range(S)]
        self.presence = [torch.zeros(B, K, 2, dtype=dt, device=dev) for _ in range(S)]
        self.scores = torch.zeros(B, K, N, dtype=dt, device=dev)
        self.exit_stage = torch.zeros(B, N, dtype=torch.long, device=dev)
        self.counts = torch.zeros(B, S, dtype=torch.long, device=dev)
        self.stats = torch.zeros(max(S - 1, 1), 3, dtype=torch.long, device=dev)
        self.forced = [torch.zeros(B, N, dtype=torch.bool, device=dev) for _ in range(S - 1)] if forced else None
        # (stage, width, padded) -> captured graph, or None where capture is off / failed
        self.graphs: Dict[Tuple[int, int, bool], Optional[object]] = {}

    def output(self):
        """A DToPOutput of copies: the buffers are overwritten by the next forward."""
        B, (gh, gw) = self.B, self.grid
        return DToPOutput(
            self.scores.clone().view(B, -1, gh, gw),
            self.exit_stage.clone().view(B, gh, gw),
            self.counts.clone(),
            [p.clone() for p in self.presence],
            [m.clone().view(B, -1, gh, gw) for m in self.merged],
        )


def stage_body(model, st: _State, s: int, width: int, padded: bool, threshold: tuple, keep_topk: int) -> None:
    """Stage s of a pruned forward on the first `width` slots of the buffers, in place.

    The eager forward's stage (``DToPSegmentor._forward_eager``): the same layers, head,
    exit rule (``leaving_tokens``) and compaction (``exits.compact``), without the host
    read, so that it can be captured: it always compacts (the order is kept when nothing
    leaves) and reports the new counts in ``st.stats[s]`` instead of branching on them.
    """
    S = st.S
    if s == 0:
        x, _ = model.backbone.embed(st.img)
        B, N = x.shape[:2]
        pos = torch.arange(N, device=x.device).expand(B, N)
        valid = None
        st.exit_stage.fill_(S)
        st.counts[:, 0].fill_(N)
    else:
        x = st.x[:, :width]
        pos = st.pos[:, :width]
        valid = st.valid[:, :width] if padded else None
    start, end = model.backbone.stage_bounds()[s]
    y = model.backbone.forward_layers(x, start, end, valid)
    presence, masks = model.heads()[s](y, valid)
    merged = masks if s == 0 else X.scatter_tokens(st.merged[s - 1], masks, pos, valid)
    st.merged[s].copy_(merged)
    st.presence[s].copy_(presence)
    if s == S - 1:
        st.scores.copy_(X.token_scores(presence, merged))
        return
    leaving = model.leaving_tokens(s, presence, masks, valid, pos, st.forced)
    c = X.compact(leaving, valid)  # the eager path's compaction, without its host read
    X.mark_exits(st.exit_stage, c.leaving, pos, s + 1)
    width = y.shape[1]
    st.x[:, :width].copy_(X.gather_tokens(y, c.order))
    st.pos[:, :width].copy_(pos.gather(1, c.order))
    st.valid[:, :width].copy_(X.slot_valid(c.counts, width))
    st.counts[:, s + 1].copy_(c.counts)
    st.stats[s].copy_(c.stats())


class StageGraphRunner:
    """Runs ``forward_dtop`` of a model as replayed stage graphs (see the module doc).

    Not an nn.Module on purpose: it holds no weights, only buffers and graphs that point
    at the model's current parameters (the cache key includes their address, dtype and
    device, so a model moved or cast gets fresh graphs).
    """

    def __init__(self, bucket: int = 16, capture: bool = True) -> None:
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.bucket = int(bucket)
        self.capture = bool(capture)
        self._states: Dict[tuple, _State] = {}
        self._dense: Dict[tuple, tuple] = {}
        self._pool = None
        self.captured = 0  # graphs captured so far (reported by benchmarks)

    # ------------------------------------------------------------------ policy
    def accepts(self, model, inputs: Tensor) -> bool:
        """Inference without gradients, per-stage evaluation or tracing; CUDA when capturing."""
        if model.training or model.eval_stage is not None or torch.is_grad_enabled():
            return False
        if torch.jit.is_tracing():
            return False
        if self.capture and not (inputs.is_cuda and torch.cuda.is_available()):
            return False
        if inputs.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        return True

    def reset(self) -> None:
        """Forget every buffer and graph (they are rebuilt on the next forward)."""
        self._states.clear()
        self._dense.clear()
        self._pool = None
        self.captured = 0

    def _key(self, model, inputs: Tensor, *extra) -> tuple:
        p = model.backbone.pos_embed
        return (tuple(inputs.shape), inputs.dtype, str(inputs.device), p.data_ptr(), p.dtype, *extra)

    # ------------------------------------------------------------------ graphs
    def _graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _run_eager(self, fn) -> None:
        """Run fn; before a capture it runs on a side stream (CUDA's recommended warm-up)."""
        if not self.capture:
            fn()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, fn):
        """Capture fn as a CUDA graph (nothing runs); None, with a warning, if it cannot be."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._graph_pool()):
                fn()
        except RuntimeError as e:  # an op that cannot be captured: stay eager for this shape
            logger.warning("CUDA graph capture failed, running this stage eagerly: %s", e)
            return None
        self.captured += 1
        return graph

    # ------------------------------------------------------------------ forward
    def forward(self, model, inputs: Tensor, forced_exits: Optional[List[Tensor]] = None):
        with torch.inference_mode(False), torch.no_grad():
            if not (min(model.stage_thresholds(), default=1.0) < 1.0 or forced_exits is not None):
                return self._forward_dense(model, inputs)
            return self._forward_pruned(model, inputs, forced_exits)

    def _forward_dense(self, model, inputs: Tensor):
        if not self.capture:
            return model._forward_eager(inputs)
        key = self._key(model, inputs)
        entry = self._dense.get(key)
        if entry is None:
            img = inputs.clone()
            self._run_eager(lambda: model._forward_eager(img))
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._graph_pool()):
                    out = model._forward_eager(img)
            except RuntimeError as e:
                logger.warning("CUDA graph capture of the dense forward failed, running eagerly: %s", e)
                self.capture = False
                return model._forward_eager(inputs)
            self.captured += 1
            entry = self._dense[key] = (img, graph, out)
        img, graph, out = entry
        img.copy_(inputs)
        graph.replay()
        def copy(t):
            return None if t is None else t.clone()

        return DToPOutput(out.scores.clone(), out.exit_stage.clone(), out.active_counts.clone(),
                          [copy(p) for p in out.stage_presence], [copy(m) for m in out.stage_masks])

    def _forward_pruned(self, model, inputs: Tensor, forced_exits: Optional[List[Tensor]]):
        forced = forced_exits is not None
        threshold, keep_topk = model.stage_thresholds(), int(model.keep_topk)
        key = self._key(model, inputs, forced, None if forced else threshold, keep_topk)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State(model, inputs, forced)
        st.img.copy_(inputs)
        if forced:
            if len(forced_exits) != st.S - 1:
                raise ValueError(f"forced_exits needs {st.S - 1} masks, got {len(forced_exits)}")
            for buf, m in zip(st.forced, forced_exits):
                buf.copy_(m.reshape(buf.shape))
        width, padded = st.N, False
        for s in range(st.S):
            self._run_stage(model, st, s, width, padded, threshold, keep_topk)
            if s < st.S - 1:
                hi, lo, _ = st.stats[s].tolist()  # the one host read of a stage
                width, padded = next_width(hi, lo, width, self.bucket)
        return st.output()

    def _run_stage(self, model, st: _State, s: int, width: int, padded: bool, threshold: tuple,
                   keep_topk: int) -> None:
        def fn() -> None:
            stage_body(model, st, s, width, padded, threshold, keep_topk)

        k = (s, width, padded)
        if k in st.graphs:
            graph = st.graphs[k]
            if graph is None:
                fn()
            else:
                graph.replay()
            return
        # first time at this width: the eager run is this forward's work and the warm-up;
        # the capture afterwards records without running, so the buffers stay as they are
        self._run_eager(fn)
        st.graphs[k] = self._capture(fn) if self.capture else None
