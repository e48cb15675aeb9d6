"""Per-stage thresholds and `dtop calibrate` on a tiny model trained in the test.

The model is the tiny-synthetic preset at a 128-pixel crop (8x8 tokens), trained for a few
dozen steps so its token confidences spread over (0, 1). Grid evaluations use the stage
memo, so the first stage of every image is computed once for the whole grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fitting import fit_tiny

from dtop_cli.errors import UserError
from dtop_cli.presets import check_threshold, format_threshold, load_preset, stage_thresholds

SIZE = 128
STEPS = 60
N_VAL = 6


# --------------------------------------------------------------------------- parsing


def test_threshold_parsing_takes_one_number_or_one_per_stage():
    assert check_threshold("0.9") == 0.9
    assert check_threshold(0.9) == 0.9
    assert check_threshold("0.97,0.9") == (0.97, 0.9)
    assert check_threshold([0.97, 0.9], stages=2) == (0.97, 0.9)
    assert check_threshold([0.8]) == 0.8
    assert format_threshold((0.97, 0.9)) == "0.97,0.9"
    assert stage_thresholds(0.9, 2) == (0.9, 0.9)
    for bad in ("0", "1.5", "0.9,0", "a,b", "", "0.9,,"):
        with pytest.raises(UserError):
            check_threshold(bad)
    with pytest.raises(UserError, match="non-final"):
        check_threshold("0.9,0.8,0.7", stages=2)


def test_preset_accepts_per_stage_thresholds_and_checks_their_count():
    from dtop_cli.presets import PresetError

    p = load_preset("tiny-synthetic", ["exit.threshold=[0.97, 0.9]"])
    assert p.exit.threshold == [0.97, 0.9]
    assert yaml.safe_load(p.to_yaml())["exit"]["threshold"] == [0.97, 0.9]
    with pytest.raises(PresetError, match="exit.threshold"):
        load_preset("tiny-synthetic", ["exit.threshold=[0.97, 0.9, 0.8]"])
    with pytest.raises(PresetError, match="exit.threshold"):
        load_preset("tiny-synthetic", ["exit.threshold=[0.97, 1.2]"])


# --------------------------------------------------------------------------- a trained model


@dataclass
class Trained:
    data_root: Path
    preset: Path
    ckpt: Path


def _train(preset_path: Path, data: Path, ckpt: Path) -> None:
    model, p = fit_tiny(preset_path, data, STEPS)
    torch.save({"meta": {"dtop": {"threshold": 0.95, "preset": p.name, "preset_yaml": p.to_yaml(),
                                  "data_root": str(data.parent)}},
                "state_dict": model.state_dict()}, ckpt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    from dtop_cli.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("calibrate")
    make_synthetic(root / "data", seed=0, n_train=12, n_val=N_VAL, size=SIZE)
    size = f"[{SIZE},{SIZE}]"
    p = load_preset("tiny-synthetic", [f"data.{k}={size}" for k in ("crop", "test_scale", "train_scale",
                                                                     "test_stride")] + ["exit.keep_topk=1"])
    preset = root / "tiny-128.yaml"
    preset.write_text(yaml.safe_dump(p.to_dict(), sort_keys=False))
    ckpt = root / "tiny.pth"
    _train(preset, root / "data" / "synthetic", ckpt)
    return Trained(root / "data", preset, ckpt)


def _samples(trained: Trained):
    from dtop_cli import api
    from dtop_cli.data.mmseg import val_dataset

    model = api.load_model(str(trained.preset), trained.ckpt)
    ds = val_dataset(model.dtop_preset, trained.data_root)
    return model, [ds[i] for i in range(len(ds))]


# --------------------------------------------------------------------------- model


@torch.no_grad()
def test_per_stage_thresholds_and_the_memo_give_the_plain_forward(trained):
    """A stage at 1.0 retires nothing and skips its head; the memo changes no number."""
    from dtop_cli.model.memo import StageMemo

    model, samples = _samples(trained)
    x = model.data_preprocessor({"inputs": [samples[0]["inputs"]]}, training=False)["inputs"]
    memo = StageMemo()
    for t in (0.6, (0.6, 0.8), (1.0, 0.5), (0.5, 1.0), 1.0):
        with model.exit_mode(threshold=t):
            ref = model.forward_dtop(x)
        for _ in range(2):
            with model.exit_mode(threshold=t, memo=memo):
                out = model.forward_dtop(x)
            assert torch.equal(out.exit_stage, ref.exit_stage)
            assert torch.allclose(out.scores, ref.scores, atol=1e-6)
            assert torch.equal(out.active_counts, ref.active_counts)
        ts = stage_thresholds(t, 2)
        if ts[0] == 1.0:
            assert out.stage_presence[0] is None  # its head did not run
            assert not (ref.exit_stage == 1).any()
        if ts[1] == 1.0:
            assert not (ref.exit_stage == 2).any()
    assert memo.hits > 0
    with pytest.raises(ValueError):
        with model.exit_mode(threshold=(0.5, 0.6, 0.7)):
            pass


@torch.no_grad()
def test_staged_graph_program_takes_per_stage_thresholds(trained):
    """The CUDA-graph runner's staged program (run without capture on the CPU) retires the
    same tokens as the eager forward with one threshold per stage."""
    model, samples = _samples(trained)
    x = model.data_preprocessor({"inputs": [s["inputs"] for s in samples[:2]]}, training=False)["inputs"]
    for t in ((0.6, 0.8), (1.0, 0.5), (0.5, 1.0)):
        with model.exit_mode(threshold=t):
            ref = model.forward_dtop(x)
        model.enable_cuda_graphs(capture=False)
        try:
            with model.exit_mode(threshold=t):
                out = model.forward_dtop(x)
        finally:
            model.disable_cuda_graphs()
        assert torch.equal(out.exit_stage, ref.exit_stage)
        assert torch.allclose(out.scores, ref.scores, atol=1e-5)


def test_cost_counts_only_the_heads_that_run(trained):
    from dtop_cli.cost import aux_heads_active, cost_from_counts

    model, _ = _samples(trained)
    with model.exit_mode(threshold=(1.0, 0.5)):
        assert aux_heads_active(model) == [False, True]
        a = cost_from_counts(model, (8, 8), [64, 64, 64])
    with model.exit_mode(threshold=0.5):
        b = cost_from_counts(model, (8, 8), [64, 64, 64])
    assert a.heads < b.heads and a.backbone == b.backbone


# --------------------------------------------------------------------------- calibrate


def test_single_threshold_answer_is_as_good_as_a_fine_grid(trained):
    """No threshold of a 0.005 grid that meets the same budget scores more than 0.2 mIoU
    above the calibrated single threshold, which itself meets the budget."""
    from dtop_cli.commands.calibrate import Search, Target, base_gflops, single_search
    from dtop_cli.measure import measure
    from dtop_cli.model.memo import StageMemo

    model, samples = _samples(trained)
    memo = StageMemo()
    grid = [round(0.005 * i, 3) for i in range(1, 201)]
    rows = [t.result() for t in measure(model, samples, grid, memo=memo)]
    base = base_gflops(model)
    ratios = sorted(r["gflops"] / base for r in rows)
    assert ratios[0] < ratios[-1]  # the grid spans a range of costs
    target = Target("ratio", float(np.quantile(ratios, 0.4)))
    search = Search(model, samples, target, base, memo=memo, max_evals=40)
    best = single_search(search)
    assert best.meets and best.gflops_ratio <= target.value
    assert search.evaluations <= 30
    fitting = [r for r in rows if r["gflops"] / base <= target.value + 1e-12]
    assert fitting
    top = max(r["miou"] for r in fitting)
    assert top <= best.miou + 0.2, (top, best.miou, best.threshold)


def test_calibrate_cli_meets_the_budget_that_eval_measures(trained, run_cli, tmp_path):
    out = tmp_path / "cal"
    r = run_cli(["calibrate", "--ckpt", str(trained.ckpt), "--target-ratio", "0.9", "--images", str(N_VAL),
                 "--data-root", str(trained.data_root), "--out", str(out), "--apply", "--json"])
    assert r.code == 0, r.err
    res = r.json()
    for k in ("threshold", "miou", "gflops", "gflops_ratio", "exit_share", "candidates", "seconds",
              "evaluations"):
        assert k in res
    assert res["gflops_ratio"] <= 0.9
    assert res["evaluations"] == len(res["candidates"]) >= 2
    assert json.loads((out / "calibration.json").read_text())["threshold"] == res["threshold"]
    applied = Path(res["applied"])
    assert applied.is_file()
    # eval --flops on the same images, with the calibrated checkpoint's own threshold
    e = run_cli(["eval", "--ckpt", str(applied), "--data-root", str(trained.data_root), "--images", str(N_VAL),
                 "--flops", "--json"])
    assert e.code == 0, e.err
    ev = e.json()
    assert ev["threshold"] == res["threshold"]
    assert ev["miou"] == pytest.approx(res["miou"], abs=1e-9)
    assert ev["gflops"] == pytest.approx(res["gflops"], rel=1e-9)
    assert ev["gflops"] / res["base_gflops"] <= 0.9


def test_calibrate_per_stage_is_no_worse_than_single(trained, run_cli, tmp_path):
    r = run_cli(["calibrate", "--ckpt", str(trained.ckpt), "--target-ratio", "0.85", "--images", str(N_VAL),
                 "--data-root", str(trained.data_root), "--out", str(tmp_path), "--per-stage",
                 "--max-evals", "30", "--json"])
    assert r.code == 0, r.err
    res = r.json()
    assert res["evaluations"] <= 30
    assert res["gflops_ratio"] <= 0.85
    assert res["miou"] >= res["single"]["miou"]
    t = res["threshold"]
    assert isinstance(t, float) or (isinstance(t, list) and len(t) == 2)


def test_calibrate_to_wall_time_uses_the_bench_timing(trained, run_cli, tmp_path):
    r = run_cli(["calibrate", "--ckpt", str(trained.ckpt), "--target-ms", "100000", "--images", "2",
                 "--data-root", str(trained.data_root), "--out", str(tmp_path), "--device", "cpu",
                 "--repeats", "1", "--max-evals", "3", "--json"])
    assert r.code == 0, r.err
    res = r.json()
    assert res["evaluations"] == 3
    assert all(c["ms"] > 0 and c["meets"] for c in res["candidates"])
    assert res["ms"] is not None and res["timing"]["device"] == "cpu"


@pytest.mark.parametrize("args, text", [
    (["--target-ratio", "0.5", "--batch", "4"], "--target-ms"),
    (["--target-ratio", "0.00001"], "unreachable"),
    (["--target-ratio", "0.5", "--target-gflops", "1"], "exactly one"),
    ([], "exactly one"),
    (["--target-ratio", "-1"], "positive"),
])
def test_calibrate_bad_input_is_one_line_and_exit_2(trained, run_cli, tmp_path, args, text):
    r = run_cli(["calibrate", "--ckpt", str(trained.ckpt), "--images", "2", "--data-root", str(trained.data_root),
                 "--out", str(tmp_path), *args])
    assert r.code == 2, (r.code, r.err)
    assert text in r.err and "Traceback" not in r.err
    assert len([ln for ln in r.err.splitlines() if "error" in ln.lower()]) == 1


@pytest.mark.parametrize("thresh, text", [("0.9,0.8,0.7", "non-final"), ("1.5", "(0, 1]"), ("0", "(0, 1]")])
def test_eval_thresh_is_checked(trained, run_cli, thresh, text):
    r = run_cli(["eval", "--ckpt", str(trained.ckpt), "--data-root", str(trained.data_root), "--images", "1",
                 "--thresh", thresh])
    assert r.code == 2 and text in r.err and "Traceback" not in r.err


def test_eval_and_sweep_take_per_stage_thresholds(trained, run_cli, tmp_path):
    e = run_cli(["eval", "--ckpt", str(trained.ckpt), "--data-root", str(trained.data_root), "--images", "2",
                 "--thresh", "0.97,0.9", "--flops", "--json"])
    assert e.code == 0, e.err
    assert e.json()["threshold"] == [0.97, 0.9]
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"threshold": [0.97, 0.9], "gflops": 0.1, "miou": 1.0}))
    s = run_cli(["sweep", "--ckpt", str(trained.ckpt), "--data-root", str(trained.data_root), "--images", "2",
                 "--thresholds", "0.9,1.0", "--per-stage", "--calibration", str(cal), "--out", str(tmp_path / "sw"),
                 "--json"])
    assert s.code == 0, s.err
    rows = s.json()["rows"]
    assert [r["threshold"] for r in rows] == [1.0, [1.0, 0.9], [0.9, 1.0], 0.9]
    assert (tmp_path / "sw" / "sweep.png").is_file()
    assert "0.9,1" in (tmp_path / "sw" / "sweep.csv").read_text()
