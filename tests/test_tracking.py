"""Watching a run: `--log-to tensorboard,wandb`, the pruning scalars of training batches, `dtop curves`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtop_cli.commands.curves import find_runs, head_losses, read_scalars, series
from dtop_cli.cost import gflops_from_counts
from dtop_cli.data.synthetic import make_synthetic
from dtop_cli.errors import UserError
from dtop_cli.model.build import build_model
from dtop_cli.presets import load_preset
from dtop_cli.runtime.tracking import exit_scalars, parse_log_to

PRESET = "tiny-synthetic"


def dtop(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, "-m", "dtop_cli.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, n_train=8, n_val=3, size=64)
    return root


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base checkpoint as `dtop train` writes it (weights of a seeded untrained model)."""
    torch.manual_seed(0)
    p = load_preset(PRESET)
    path = tmp_path_factory.mktemp("base") / "iter_1.pth"
    torch.save({"state_dict": build_model(p).state_dict(),
                "meta": {"dtop": {"preset": p.name, "phase": "base", "preset_yaml": p.to_yaml(),
                                  "threshold": 1.0}}}, path)
    return path


# --------------------------------------------------------------------------- pure parts


def test_parse_log_to() -> None:
    assert parse_log_to(None) == () and parse_log_to("") == ()
    assert parse_log_to("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb")
    with pytest.raises(UserError, match="unknown tracker 'mlflow'"):
        parse_log_to("tensorboard,mlflow")


def test_exit_scalars_of_a_batch() -> None:
    model = build_model(load_preset(PRESET)).eval()
    S = model.num_stages
    hw = (4, 4)
    n = 16
    # image 0: 8 tokens retire at stage 1, 4 at stage 2, 4 reach the end; image 1: nothing exits
    stage0 = torch.tensor([1] * 8 + [2] * 4 + [S] * 4).reshape(4, 4)
    exit_stage = torch.stack([stage0, torch.full((4, 4), S)])
    counts = torch.tensor([[n, 8, 4], [n, n, n]])
    got = exit_scalars(model, exit_stage, counts, hw)
    assert got["exit.share_1"] == pytest.approx(8 / 32)
    assert got["exit.share_2"] == pytest.approx(4 / 32)
    assert got["exit.share_3"] == pytest.approx(20 / 32)
    assert got["active.after_1"] == pytest.approx((8 + 16) / 32)
    assert got["active.after_2"] == pytest.approx((4 + 16) / 32)
    dense = gflops_from_counts(model, hw, [n] * S, aux_heads=False)
    full = gflops_from_counts(model, hw, [n] * S, aux_heads=True)
    pruned = gflops_from_counts(model, hw, [n, 8, 4], aux_heads=True)
    assert got["gflops_ratio"] == pytest.approx((pruned + full) / 2 / dense)
    assert full > dense > pruned  # the exit heads cost something; retiring tokens saves more


def test_curves_reading_tolerates_a_run_in_progress(tmp_path: Path) -> None:
    run = tmp_path / "prune"
    first, second = run / "20260101_000000" / "vis_data", run / "20260102_000000" / "vis_data"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    (first / "scalars.json").write_text(
        json.dumps({"lr": 0.1, "loss": 3.0, "decode.loss_mask": 1.0, "decode.loss_dice": 0.5,
                    "aux_0.loss_mask": 1.5, "iter": 1, "step": 1}) + "\n"
        + json.dumps({"lr": 0.1, "loss": 9.0, "decode.loss_mask": 9.0, "iter": 2, "step": 2}) + "\n")
    # resumed at iteration 2 (redone), still writing its third line
    (second / "scalars.json").write_text(
        json.dumps({"lr": 0.05, "loss": 2.0, "decode.loss_mask": 1.2, "decode.loss_dice": 0.3,
                    "aux_0.loss_mask": 0.5, "exit.share_1": 0.25, "iter": 2, "step": 2}) + "\n"
        + json.dumps({"mIoU": 40.0, "aAcc": 80.0, "step": 2}) + "\n" + '{"lr": 0.01, "lo')
    runs = find_runs(tmp_path)
    assert list(runs) == ["prune"] and [f.parent.parent.name for f in runs["prune"]] == [
        "20260101_000000", "20260102_000000"]
    rows = [r for f in runs["prune"] for r in read_scalars(f)]
    assert len(rows) == 4  # the half-written line is skipped
    train, val = series(rows)
    assert train["loss"] == ([1, 2], [3.0, 2.0])  # the resumed run's iteration 2 wins
    assert val["mIoU"] == ([2], [40.0])
    heads = head_losses(train)
    assert list(heads) == ["total", "aux_0", "decode"]
    assert heads["decode"] == ([1, 2], [1.5, 1.5]) and heads["aux_0"] == ([1, 2], [1.5, 0.5])


def test_curves_bad_input(run_cli, tmp_path: Path) -> None:
    r = run_cli(["curves", str(tmp_path / "nowhere")])
    assert r.code == 2 and r.err.count("\n") == 1 and "not a folder" in r.err
    r = run_cli(["curves", str(tmp_path)])
    assert r.code == 2 and "no vis_data/scalars.json" in r.err


def test_missing_tracker_package_is_exit_2_before_anything(run_cli, data_root: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    wd = tmp_path / "w"
    r = run_cli(["train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd),
                 "--log-to", "tensorboard,wandb"])
    assert r.code == 2 and r.err.count("\n") == 1
    assert "pip install 'dtop[wandb]'" in r.err
    assert not wd.exists()
    r = run_cli(["train", "-p", PRESET, "--data-root", str(data_root), "--log-to", "comet"])
    assert r.code == 2 and "unknown tracker 'comet'" in r.err


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_prune_run_logs_exit_shares_to_tensorboard_and_curves_draws_them(data_root: Path, base_ckpt: Path,
                                                                        tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wd = tmp_path / "prune"
    r = dtop("prune", "--from", str(base_ckpt), "--data-root", str(data_root), "--work-dir", str(wd),
             "--max-iters", "6", "--thresh", "0.2", "--log-to", "tensorboard", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"tensorboard --logdir {wd}" in r.stderr
    events = list(wd.glob("*/vis_data/events.out.tfevents.*"))
    assert len(events) == 1, list(wd.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "decode.loss_mask", "aux_0.loss_dice", "exit.share_1", "exit.share_2", "exit.share_3",
            "active.after_1", "gflops_ratio"} <= tags, tags
    shares = [acc.Scalars(f"exit.share_{s}") for s in (1, 2, 3)]
    assert [e.step for e in shares[0]] == [1, 2, 3, 4, 5, 6]
    for step in range(6):  # every token is retired by exactly one stage
        assert sum(s[step].value for s in shares) == pytest.approx(1.0, abs=1e-5)
    assert all(0 < e.value < 2 for e in acc.Scalars("gflops_ratio"))

    r = dtop("curves", str(wd), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pictures = json.loads(r.stdout)["pictures"]
    assert sorted(Path(p).name for p in pictures) == ["exits.png", "loss.png", "lr.png", "miou.png"]
    for p in pictures:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_wandb_offline_writes_a_local_run(data_root: Path, tmp_path: Path) -> None:
    wd = tmp_path / "base"
    r = dtop("train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd), "--max-iters", "2",
             "--log-to", "wandb", "--wandb-project", "dtop-test", "--json", cwd=tmp_path,
             env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list(wd.glob("*/vis_data/wandb/offline-run-*"))
    assert len(runs) == 1, list(wd.rglob("*"))[:50]
    assert list(runs[0].glob("*.wandb")), list(runs[0].iterdir())
    assert not (tmp_path / "wandb").exists()  # nothing written outside the work dir
