"""`dtop bench`: wall-clock time of the dense and the pruned model, side by side.

FLOPs are the paper's currency; users pay in seconds. This measures both forwards of one
model (the same weights; dense = threshold 1.0, only the last head runs) on the same
inputs, in one process:

* runs are interleaved (dense, pruned, pruned, dense, ...) after a warm-up, so drift of a
  shared machine (other jobs, clocks) hits both alike; the speed-up is the ratio of the
  two medians of one run (``speedup_paired``, the median of the per-round ratios, is
  given beside it: it holds up better when the machine's load changes mid-run);
* ``--exits F1,F2`` forces the exits so speed does not depend on trained weights: F1 of
  all tokens retire after stage 1, F2 of all tokens have retired by the end of stage 2
  (cumulative), at random grid positions drawn with a fixed seed, the same share in every
  image (so the batched path needs no padding);
* with ``--ckpt`` and no ``--exits`` the real exit rule runs at the checkpoint's (or
  ``--thresh``) threshold, on the validation images under ``--data-root`` when given,
  random inputs otherwise;
* beside the measured ratio it reports the FLOP ratio (dense GFLOPs / pruned GFLOPs of
  the same forward, auxiliary heads included, so below 1 when nothing exits) and the
  ideal ratio (backbone token-layer work left, heads excluded);
* peak memory of each forward: on CUDA ``torch.cuda.max_memory_allocated`` above what was
  allocated before the forward; on a CPU the peak of the tensor bytes torch's CPU
  allocator held during the forward above what it held before (from the profiler's
  allocation events). Both count tensors only (activations, not weights or inputs, not
  allocator caching or library scratch space), of one eager forward.

On CUDA both models are by default replayed as CUDA graphs (``--graphs``), the dense one
as one graph, the pruned one per stage (see :mod:`dtop_cli.model.graphs`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import UserError
from ..metrics import token_shares
from ..presets import check_threshold, heads_that_run, prunes, threshold_value

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXIT_SEED = 0  # positions of forced exits: fixed, so runs and machines compare
MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated during one eager forward, minus what was allocated before it",
    "cpu": "peak tensor bytes held by torch's CPU allocator during one eager forward, minus what it held "
           "before (torch.profiler allocation events)",
}


# --------------------------------------------------------------------------- forced exits


def parse_exits(text: str, n_exits: int) -> tuple:
    """'F1,F2' -> (F1, F2): cumulative shares of all tokens retired after each non-final
    stage. Non-decreasing, in [0, 1): at least the last stage must get tokens."""
    try:
        shares = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"--exits takes {n_exits} comma-separated numbers like 0.3,0.65 (got '{text}')") from None
    if len(shares) != n_exits:
        raise UserError(f"--exits needs {n_exits} shares for a model with {n_exits + 1} stages (got '{text}')")
    if any(not 0.0 <= f < 1.0 for f in shares):
        raise UserError(f"--exits shares must be in [0, 1) (got '{text}')")
    if any(b < a for a, b in zip(shares, shares[1:])):
        raise UserError(f"--exits shares are cumulative and cannot decrease (got '{text}')")
    return shares


def retired_counts(n_tokens: int, shares: Sequence[float]) -> List[int]:
    """Tokens retired by the end of each non-final stage (cumulative), per image."""
    return [min(int(round(f * n_tokens)), n_tokens - 1) for f in shares]


def stage_counts(n_tokens: int, shares: Sequence[float]) -> List[int]:
    """Tokens each stage's layers run on under forced exits: [N, N - n1, N - n2, ...]."""
    return [n_tokens] + [n_tokens - r for r in retired_counts(n_tokens, shares)]


def forced_exit_masks(batch: int, n_tokens: int, shares: Sequence[float], seed: int = EXIT_SEED,
                      device: Union[str, torch.device] = "cpu") -> List[Tensor]:
    """One (B, N) bool mask per non-final stage: the tokens retired by the end of it.

    Each image draws its own random order of the grid positions (fixed seed) and retires a
    growing prefix of it, so the masks are nested and every image retires the same number.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n_tokens, generator=g) for _ in range(batch)])
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_tokens).expand(batch, n_tokens).contiguous())
    return [(rank < r).to(device) for r in retired_counts(n_tokens, shares)]


def ideal_ratio(model, counts: Sequence[float]) -> float:
    """1 / share of the backbone's token-layer work left: sum over layers of N over the
    sum over layers of the tokens each ran on. Heads and attention's n^2 are left out."""
    n = counts[0]
    layers = [end - start for start, end in model.backbone.stage_bounds()]
    return sum(k * n for k in layers) / sum(k * c for k, c in zip(layers, counts))


# --------------------------------------------------------------------------- measuring


def time_interleaved(variants: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                     sync: Callable[[], None] = lambda: None,
                     tick: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each variant, runs interleaved after `warmup` untimed rounds.

    The order alternates every round (A B, B A, ...) so that neither variant always runs
    right after the other (caches, clocks). sync waits for the device before and after.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
        if tick:
            tick()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            variants[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
        if tick:
            tick()
    return times


@contextlib.contextmanager
def _stderr_fd_silenced() -> Iterator[None]:
    """The profiler's C++ side writes start/stop lines straight to file descriptor 2;
    keep them out of the user's terminal (Python-level stderr is untouched)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes of tensors allocated by fn above those live when it started (CPU).

    Replays the profiler's allocation events (sizes, frees negative) in time order.
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - profiler internals moved
        return None
    with _stderr_fd_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak extra memory of one call of fn on `device` (see MEMORY_MEASURE)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak_bytes(fn)


# --------------------------------------------------------------------------- inputs


def image_batch(model, preset, data_root: Union[str, Path], batch: int) -> Tensor:
    """The first `batch` validation images (repeated if there are fewer), each as the paper's
    cost convention sees it (:func:`~dtop_cli.data.mmseg.paper_window`): resized as the test
    pipeline resizes, central crop-size window, normalised, padded to the crop size."""
    from ..data.mmseg import paper_window, read_test_image, val_image_paths

    files = val_image_paths(preset, data_root, images=batch)
    crop = (int(preset.data.crop[0]), int(preset.data.crop[1]))
    return torch.cat([paper_window(model, read_test_image(preset, files[i % len(files)]), crop)
                      for i in range(batch)])


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class BenchOptions:
    """Everything `dtop bench` takes, checked once (:meth:`checked`) before any work."""

    preset: Union[str, Any]  # a preset name / YAML path, or a loaded Preset
    device: str = "cpu"
    batch: int = 1
    dtype: str = "fp32"
    exits: Optional[str] = None
    ckpt: Optional[Union[str, Path]] = None
    thresh: Optional[float] = None
    repeats: int = 10
    warmup: int = 2
    data_root: Optional[Union[str, Path]] = None
    threads: Optional[int] = None
    graphs: str = "auto"
    bucket: int = 16
    memory: bool = True
    seed: int = 0
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def checked(self) -> "BenchOptions":
        """Self, after every check that needs no model; raises UserError with one line."""
        if self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise UserError("--batch and --repeats must be >= 1, --warmup >= 0")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got '{self.dtype}')")
        if self.graphs not in ("auto", "on", "off"):
            raise UserError(f"--graphs must be auto, on or off (got '{self.graphs}')")
        if self.bucket < 1:
            raise UserError(f"--bucket must be >= 1 (got {self.bucket})")
        if self.exits is None and self.ckpt is None:
            raise UserError("give --exits F1,F2 (forced exit shares, any weights) or --ckpt CKPT (the real exit rule)")
        if self.thresh is not None and self.exits is not None:
            raise UserError("--thresh sets the real exit rule; it does not combine with --exits")
        if self.thresh is not None:
            check_threshold(self.thresh)  # the count is checked against the model (load_model)
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1 (got {self.threads})")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device must be cpu or cuda (got '{self.device}')")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available to this torch")
        if self.graphs == "on" and self.device != "cuda":
            raise UserError("--graphs on needs --device cuda (CUDA graphs)")
        return self

    @property
    def use_graphs(self) -> bool:
        return self.graphs == "on" or (self.graphs == "auto" and self.device == "cuda")


def run_bench(opts: BenchOptions, model=None, log: Callable[[str], None] = lambda msg: None) -> dict:
    """What `dtop bench` reports (see the module doc). `model`: reuse a built model of
    this preset (scripts timing several settings); it is cast and moved in place."""
    from ..cost import gflops_from_counts
    from ..presets import Preset, load_preset

    opts = opts.checked()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    dev = torch.device(opts.device)
    p = opts.preset if isinstance(opts.preset, Preset) else load_preset(opts.preset, list(opts.overrides))

    if model is None:
        log(f"building {p.name}")
        if opts.ckpt is not None:
            from .. import api

            model = api.load_model(p, opts.ckpt, threshold=opts.thresh)
        else:
            from ..model.build import build_model

            torch.manual_seed(opts.seed)
            model = build_model(p)
            model.dtop_preset = p
    model = model.to(device=dev, dtype=DTYPES[opts.dtype]).eval()
    model.disable_cuda_graphs()
    pruned_threshold = model.checked_threshold(model.threshold if opts.thresh is None else opts.thresh)
    if opts.exits is None and not prunes(pruned_threshold):
        raise UserError("the checkpoint's threshold is 1.0 (nothing exits): pass --thresh T < 1 or --exits")

    batch = opts.batch
    H, W = (int(v) for v in p.data.crop)
    if opts.data_root is not None:
        log(f"reading {batch} validation image(s)")
        x = image_batch(model, p, opts.data_root, batch)
        inputs_kind = "images"
    else:
        g = torch.Generator().manual_seed(opts.seed)
        x = torch.randn(batch, 3, H, W, generator=g)
        inputs_kind = "random"
    x = x.to(device=dev, dtype=DTYPES[opts.dtype])
    ps = model.backbone.patch_size
    grid = (-(-H // ps), -(-W // ps))
    N = grid[0] * grid[1]
    S = model.num_stages
    shares = parse_exits(opts.exits, S - 1) if opts.exits is not None else None
    masks = forced_exit_masks(batch, N, shares, device=dev) if shares is not None else None

    def dense() -> object:
        with model.exit_mode(threshold=1.0):
            return model.forward_dtop(x)

    def pruned() -> object:
        with model.exit_mode(threshold=pruned_threshold):
            return model.forward_dtop(x, forced_exits=masks)

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        # what the pruned forward does (eager: the reference), and what that costs in FLOPs
        out = pruned()
        counts = out.active_counts.float()  # (B, S)
        if shares is not None:
            expected = stage_counts(N, shares)
            if out.active_counts.tolist() != [expected] * batch:
                raise RuntimeError(f"forced exits ran {out.active_counts.tolist()}, expected {expected} per image")
        dense_gflops = gflops_from_counts(model, grid, [N] * S, out_hw=(H, W), aux_heads=False)
        # forced exits run every head; the exit rule skips the heads of stages at threshold 1.0
        heads = True if shares is not None else heads_that_run(pruned_threshold, S - 1)
        pruned_gflops = statistics.fmean(gflops_from_counts(model, grid, c, out_hw=(H, W), aux_heads=heads)
                                         for c in out.active_counts.tolist())
        mean_counts = counts.mean(0).tolist()
        ideal = ideal_ratio(model, mean_counts)
        exit_share, _ = token_shares(counts.sum(0).tolist())
        del out

        peaks: Dict[str, Optional[int]] = {"dense": None, "pruned": None}
        if opts.memory:
            log("measuring peak memory")
            for name, fn in (("dense", dense), ("pruned", pruned)):
                fn()  # allocator warm
                peaks[name] = peak_memory_bytes(fn, dev)

        if opts.use_graphs and not model.graph_ready:
            if opts.graphs == "on":
                raise UserError(f"--graphs on: CUDA graphs support ATM-head presets only, not '{p.name}'")
            log("CUDA graphs are for ATM-head presets only: timing the eager forward")
        elif opts.use_graphs:
            model.enable_cuda_graphs(bucket=opts.bucket)
        log(f"timing: {opts.warmup} warm-up + {opts.repeats} timed rounds, interleaved")
        try:
            times = time_interleaved({"dense": dense, "pruned": pruned}, opts.repeats, opts.warmup, sync)
        finally:
            captured = model.graph_runner.captured if model.graph_runner is not None else 0
            model.disable_cuda_graphs()

    dense_ms = statistics.median(times["dense"]) * 1e3
    pruned_ms = statistics.median(times["pruned"]) * 1e3
    speedup = dense_ms / pruned_ms
    # each round runs both back to back: the median of the per-round ratios resists a
    # shared machine changing its load in the middle of a run better than either median
    paired = statistics.median(d / q for d, q in zip(times["dense"], times["pruned"]))
    flop_ratio = dense_gflops / pruned_gflops

    def mb(v: Optional[int]) -> Optional[float]:
        return None if v is None else round(v / 2**20, 3)

    return {
        "preset": p.name,
        "mode": "forced" if shares is not None else "threshold",
        "exits": list(shares) if shares is not None else None,
        "threshold": None if shares is not None else threshold_value(pruned_threshold),
        "inputs": inputs_kind,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": opts.dtype,
        "batch": batch,
        "shape": [H, W],
        "tokens": N,
        "active_counts": [round(c, 2) for c in mean_counts],
        "exit_share": exit_share,
        "dense_ms": dense_ms,
        "pruned_ms": pruned_ms,
        "speedup": speedup,
        "speedup_paired": paired,
        "dense_gflops": dense_gflops,
        "pruned_gflops": pruned_gflops,
        "flop_ratio": flop_ratio,
        "ideal_ratio": ideal,
        "speedup_over_flop_ratio": speedup / flop_ratio,
        "dense_peak_mb": mb(peaks["dense"]),
        "pruned_peak_mb": mb(peaks["pruned"]),
        "memory_measure": MEMORY_MEASURE[dev.type] if opts.memory else None,
        "graphs": opts.use_graphs,
        "graphs_captured": captured,
        "bucket": opts.bucket if opts.use_graphs else None,
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dense_runs_ms": [t * 1e3 for t in times["dense"]],
        "pruned_runs_ms": [t * 1e3 for t in times["pruned"]],
    }
