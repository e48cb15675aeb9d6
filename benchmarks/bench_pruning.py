"""Speed benchmarks of the pruned path (pytest-benchmark). Not part of the test suite.

    .venv/bin/python -m pytest benchmarks/bench_pruning.py              # all
    .venv/bin/python -m pytest benchmarks/bench_pruning.py -k tiny      # the quick ones
    .venv/bin/python benchmarks/bench_pruning.py train --repeats 20     # interleaved ratio

pytest-benchmark times each case on its own; the ratios that matter (dense vs pruned,
threshold 1.0 vs exits in training) come from *interleaved* runs, which this file records
in each case's ``extra_info`` (see ``--benchmark-json``) and the ``train`` entry point
prints. On a shared machine only those ratios are worth comparing.

Cases:
* forward, batch 1, fp32, CPU: segvit-base-ade 512x512 (the issue's CPU target) and
  tiny-synthetic, dense and with forced exits 0,0 / 0.3,0.65 / 0.5,0.8;
* one training step of tiny-synthetic (batch 8, AdamW), threshold 1.0 vs exits on: the
  exit threshold is set on the batch itself so that a given share of tokens leaves after
  stage 1 (random weights are rarely confident), and at the preset's 0.9 where nothing
  leaves (the cost of the decision alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dtop_cli import presets as P  # noqa: E402
from dtop_cli.commands import bench as BN  # noqa: E402
from dtop_cli.model.build import build_model  # noqa: E402

THREADS = 2  # the CPU measurements; keep it the same for every case
EXITS = [(0.0, 0.0), (0.3, 0.65), (0.5, 0.8)]


def _model(preset: str, threshold: float = 0.9):
    torch.manual_seed(0)
    return build_model(P.load_preset(preset), threshold=threshold).eval()


def _forward_pair(model, batch: int, shares):
    """(dense, pruned) callables on the same crop-size random input."""
    H, W = (int(v) for v in model.dtop_crop)
    x = torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(0))
    N = (H // model.backbone.patch_size) * (W // model.backbone.patch_size)
    masks = BN.forced_exit_masks(batch, N, shares)
    thr = model.threshold

    def dense():
        model.threshold = 1.0
        try:
            with torch.no_grad():
                return model.forward_dtop(x)
        finally:
            model.threshold = thr

    def pruned():
        with torch.no_grad():
            return model.forward_dtop(x, forced_exits=masks)

    return dense, pruned


@pytest.fixture(scope="module", params=["tiny-synthetic", "segvit-base-ade"])
def fwd_model(request):
    torch.set_num_threads(THREADS)
    m = _model(request.param)
    m.dtop_crop = P.load_preset(request.param).data.crop
    return m


@pytest.mark.parametrize("shares", [None, *EXITS], ids=lambda s: "dense" if s is None else f"exits{s[0]},{s[1]}")
def test_forward_batch1(benchmark, fwd_model, shares):
    dense, pruned = _forward_pair(fwd_model, 1, shares or (0.0, 0.0))
    fn = dense if shares is None else pruned
    rounds = 3 if fwd_model.backbone.layers[0].ln1.normalized_shape[0] >= 768 else 20
    if shares is not None:  # the interleaved ratio, the number that means something here
        t = BN.time_interleaved({"dense": dense, "pruned": pruned}, repeats=rounds, warmup=1)
        d, p = statistics.median(t["dense"]), statistics.median(t["pruned"])
        benchmark.extra_info.update(interleaved_dense_ms=d * 1e3, interleaved_pruned_ms=p * 1e3, speedup=d / p)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)


# ----------------------------------------------------------------- training step


def _train_setup(batch: int = 8, seed: int = 0):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    torch.manual_seed(seed)
    p = P.load_preset("tiny-synthetic")
    model = build_model(p, threshold=1.0).train()
    H, W = (int(v) for v in p.data.crop)
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, H, W, generator=g)
    samples = []
    for _ in range(batch):
        ds = SegDataSample()
        ds.gt_sem_seg = PixelData(data=torch.randint(0, p.data.num_classes, (1, H, W), generator=g))
        samples.append(ds)
    # lr 0: every step does the full work of AdamW, but the weights (and so which tokens
    # are confident: random weights give nearly equal scores) stay as they were set up
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    return model, img, samples, opt


def threshold_for_share(model, img: torch.Tensor, share: float) -> float:
    """Exit threshold at which `share` of this batch's tokens are confident after stage 1."""
    from dtop_cli.model import exits as X

    was = model.training
    model.eval()
    with torch.no_grad():
        N = model.backbone.embed(img)[0].shape[1]
        none = [torch.zeros(img.shape[0], N, dtype=torch.bool)] * (model.num_stages - 1)
        out = model.forward_dtop(img, forced_exits=none)
        best = X.token_scores(out.stage_presence[0], out.stage_masks[0].flatten(2)).max(1).values.flatten()
    model.train(was)
    return float(torch.quantile(best, 1.0 - share)) if share > 0 else 1.0 - 1e-6


def train_step_times(shares=(0.0, 0.3, 0.5), repeats: int = 10, warmup: int = 2, batch: int = 8,
                     preset_threshold: float = 0.9) -> List[Dict]:
    """Interleaved seconds per training step at threshold 1.0 and with exits on.

    One row per exit setting: the threshold used, the tokens each stage ran on (mean per
    image), median seconds of both and base / exits (> 1: exits make the step faster).
    """
    torch.set_num_threads(THREADS)
    model, img, samples, opt = _train_setup(batch)

    def step(thr: float):
        def run():
            model.threshold = thr
            losses = model.loss(img, samples)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
        return run

    settings = {f"preset threshold {preset_threshold}": preset_threshold}
    settings.update({f"{int(100 * s)}% exit after stage 1": threshold_for_share(model, img, s) for s in shares if s})
    rows = []
    for name, thr in settings.items():
        model.threshold = thr
        model.eval()
        with torch.no_grad():
            counts = model.forward_dtop(img).active_counts.float().mean(0).tolist()
        model.train()
        t = BN.time_interleaved({"base": step(1.0), "exits": step(thr)}, repeats, warmup)
        b, e = statistics.median(t["base"]), statistics.median(t["exits"])
        rows.append(dict(setting=name, threshold=thr, active_counts=counts, base_ms=b * 1e3, exits_ms=e * 1e3,
                         base_over_exits=b / e))
    return rows


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5], ids=lambda s: "base" if s == 0 else f"exit{s}")
def test_train_step_tiny(benchmark, share):
    torch.set_num_threads(THREADS)
    model, img, samples, opt = _train_setup()
    thr = threshold_for_share(model, img, share) if share else 1.0

    def run():
        model.threshold = thr
        total = sum(model.loss(img, samples).values())
        opt.zero_grad()
        total.backward()
        opt.step()

    benchmark.extra_info.update(threshold=thr)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)


def test_train_step_tiny_interleaved(benchmark):
    rows = benchmark.pedantic(train_step_times, kwargs=dict(repeats=6, warmup=1), rounds=1, iterations=1)
    benchmark.extra_info.update(rows=rows)
    for r in rows:
        print(r)


# ----------------------------------------------------------------- entry point


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["train"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    for r in train_step_times(repeats=a.repeats, warmup=a.warmup):
        print(f"{r['setting']:28s} thr {r['threshold']:.4f} tokens/stage "
              f"{'/'.join(f'{c:.0f}' for c in r['active_counts'])}: base {r['base_ms']:.1f} ms, "
              f"exits {r['exits_ms']:.1f} ms, base/exits {r['base_over_exits']:.3f}")
    print(f"({time.perf_counter() - t0:.0f} s, {THREADS} threads, medians of {a.repeats} interleaved steps)")


if __name__ == "__main__":
    main()
