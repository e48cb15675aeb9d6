"""Training survives what clusters do to it: stop signals, a checkpoint write that dies, a
truncated checkpoint, a non-finite loss, a damaged image, a full disk; and bf16 autocast.

Runs use the tiny preset on 64-pixel crops of a tiny synthetic set, data loaded in the main
process (num_workers 0), so that a run is exactly reproducible and takes seconds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtop_cli.data.synthetic import make_synthetic
from dtop_cli.safeload import load_checkpoint

PRESET = "tiny-synthetic"
SMALL = ["data.crop=[64,64]", "data.train_scale=[64,64]", "data.test_scale=[64,64]", "data.test_stride=[64,64]",
         "data.num_workers=0", "data.batch_size=2", "schedule.checkpoint_interval=2"]


def _sets(*extra: str) -> list[str]:
    out: list[str] = []
    for s in (*SMALL, *extra):
        out += ["--set", s]
    return out


def _env() -> dict:
    return dict(os.environ, COLUMNS="200", OMP_WAIT_POLICY="PASSIVE")


def dtop(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtop_cli.cli", *args], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=_env())


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dtop_cli.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def dtop_patched(patch: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``dtop ARGS`` in a fresh process after running ``patch`` (the failure to simulate)."""
    code = f"{patch}\nimport sys\nfrom dtop_cli.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=_env())


def one_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def logged_losses(work_dir: Path) -> dict[int, float]:
    """iteration -> the loss mmengine logged, over every run in the work dir."""
    out: dict[int, float] = {}
    for f in sorted(work_dir.glob("*/vis_data/scalars.json")):
        for ln in f.read_text().splitlines():
            e = json.loads(ln)
            if "loss" in e:
                out[int(e["iter"])] = float(e["loss"])
    return out


def max_weight_difference(a: Path, b: Path) -> float:
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def stop_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("stopped:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def interrupt_at(proc: subprocess.Popen, work_dir: Path, iteration: int, timeout: float = 300) -> None:
    """SIGTERM ``proc`` once its log shows ``iteration`` iterations done."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(logged_losses(work_dir)) >= iteration or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, n_train=8, n_val=3, size=64)
    return root


# --------------------------------------------------------------------------- stop signals


@pytest.mark.slow
def test_sigterm_then_resume_equals_an_uninterrupted_run(data_root: Path, tmp_path: Path) -> None:
    n = 12
    at = random.Random().randint(2, 7)  # a different iteration on every run of the test
    common = ["train", "-p", PRESET, "--data-root", str(data_root), "--max-iters", str(n), *_sets(), "--json"]
    straight = one_json(dtop(*common, "--work-dir", str(tmp_path / "straight"), cwd=tmp_path))

    wd = tmp_path / "stopped"
    proc = start(*common, "--work-dir", str(wd), cwd=tmp_path)
    interrupt_at(proc, wd, at)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert out.strip() == ""  # no result object from a run that did not finish
    line = stop_line(err)
    stopped_after = int(line.split("SIGTERM after iteration ")[1].split()[0])
    assert at <= stopped_after < n, line
    ckpt = wd / f"iter_{stopped_after}.pth"
    assert str(ckpt) in line and "--resume" in line
    assert (wd / "last_checkpoint").read_text() == str(ckpt)
    saved = load_checkpoint(ckpt)
    assert saved["meta"]["iter"] == stopped_after
    state = saved["dtop_train_state"]
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"} and state["sampler"]["seed"] is not None

    resumed = one_json(dtop(*common, "--work-dir", str(wd), "--resume", cwd=tmp_path))
    assert resumed["resumed_from"] == str(ckpt)
    diff = max_weight_difference(Path(resumed["checkpoint"]), Path(straight["checkpoint"]))
    print(f"stopped after iteration {stopped_after} of {n}: max weight difference {diff:.3g}")
    assert diff <= 1e-5
    # the same batches, augmentations and optimiser steps: every later logged loss is the same
    a, b = logged_losses(wd), logged_losses(tmp_path / "straight")
    assert sorted(a) == list(range(1, n + 1))
    for it in range(stopped_after + 1, n + 1):
        assert a[it] == pytest.approx(b[it], rel=1e-6, abs=1e-9), it


@pytest.mark.slow
def test_two_processes_stop_and_resume_at_the_same_iteration(data_root: Path, tmp_path: Path) -> None:
    """--gpus 2 on CPU (gloo): SIGTERM to the launcher reaches both ranks through torchrun;
    both stop after the same iteration, rank 0 writes; `--resume auto` first starts a fresh
    run, then continues the stopped one to the weights of a run never stopped."""
    n = 8
    common = ["train", "-p", PRESET, "--data-root", str(data_root), "--max-iters", str(n), "--gpus", "2",
              *_sets(), "--json"]
    straight = one_json(dtop(*common, "--work-dir", str(tmp_path / "straight"), cwd=tmp_path))

    wd = tmp_path / "stopped"
    proc = start(*common, "--work-dir", str(wd), "--resume", "auto", cwd=tmp_path)
    interrupt_at(proc, wd, 2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    line = stop_line(err)
    stopped_after = int(line.split("SIGTERM after iteration ")[1].split()[0])
    assert 2 <= stopped_after < n
    ckpt = load_checkpoint(wd / f"iter_{stopped_after}.pth")
    assert len(ckpt["dtop_train_state"]["rng"]) == 2  # the state of both ranks

    resumed = one_json(dtop(*common, "--work-dir", str(wd), "--resume", "auto", cwd=tmp_path))
    assert resumed["resumed_from"] == str(wd / f"iter_{stopped_after}.pth")
    diff = max_weight_difference(Path(resumed["checkpoint"]), Path(straight["checkpoint"]))
    print(f"2 processes, stopped after iteration {stopped_after} of {n}: max weight difference {diff:.3g}")
    assert diff <= 1e-5


# --------------------------------------------------------------------------- checkpoints that go wrong

KILL_HALF_WAY = """
import os, signal
from mmengine.fileio.backends.local_backend import LocalBackend

put, parts = LocalBackend.put, []

def dying_put(self, obj, filepath):
    if str(filepath).endswith(".part"):
        parts.append(filepath)
        if len(parts) == 2:  # the second checkpoint: half its bytes reach the disk, then SIGKILL
            with open(filepath, "wb") as f:
                f.write(obj[: len(obj) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return put(self, obj, filepath)

LocalBackend.put = dying_put
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_loses_only_the_iterations_since_the_last(data_root: Path,
                                                                                    tmp_path: Path) -> None:
    wd = tmp_path / "w"
    common = ["train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd), "--max-iters", "6",
              *_sets()]
    r = dtop_patched(KILL_HALF_WAY, *common, cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (wd / ".iter_4.pth.part").is_file() and not (wd / "iter_4.pth").exists()
    assert (wd / "last_checkpoint").read_text() == str(wd / "iter_2.pth")

    res = one_json(dtop(*common, "--resume", "--json", cwd=tmp_path))
    assert res["resumed_from"] == str(wd / "iter_2.pth")  # iterations 3-4 are redone, nothing more
    assert load_checkpoint(res["checkpoint"])["meta"]["iter"] == 6
    assert not list(wd.glob(".*.part"))


@pytest.fixture(scope="module")
def four_iterations(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 4 iterations with checkpoints after 2 and 4."""
    wd = tmp_path_factory.mktemp("four")
    one_json(dtop("train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd), "--max-iters", "4",
                  *_sets(), "--json", cwd=wd))
    assert (wd / "iter_2.pth").is_file() and (wd / "iter_4.pth").is_file()
    return wd


@pytest.mark.slow
def test_truncated_last_checkpoint_resumes_from_the_one_before(four_iterations: Path, data_root: Path,
                                                               tmp_path: Path) -> None:
    import shutil

    wd = tmp_path / "w"
    shutil.copytree(four_iterations, wd)
    (wd / "last_checkpoint").write_text(str(wd / "iter_4.pth"))
    full = (wd / "iter_4.pth").read_bytes()
    (wd / "iter_4.pth").write_bytes(full[:4096])  # a copy cut short

    r = dtop("train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd), "--max-iters", "6",
             *_sets(), "--resume", "--json", cwd=tmp_path)
    res = one_json(r)
    assert res["resumed_from"] == str(wd / "iter_2.pth")
    warning = [ln for ln in r.stderr.splitlines() if "warning:" in ln]
    assert len(warning) == 1 and "iter_4.pth is not a readable checkpoint" in warning[0], r.stderr[-3000:]
    assert "iter_2.pth" in warning[0]
    # the bad file is kept, byte for byte, where the resumed run cannot write over it
    assert (wd / "iter_4.pth.unreadable").read_bytes() == full[:4096]
    assert load_checkpoint(wd / "iter_6.pth")["meta"]["iter"] == 6


def test_no_readable_checkpoint_names_every_file(run_cli, data_root: Path, tmp_path: Path) -> None:
    wd = tmp_path / "w"
    wd.mkdir()
    for n in (2, 4):
        (wd / f"iter_{n}.pth").write_bytes(b"PK\x03\x04" + os.urandom(2000))
    (wd / "last_checkpoint").write_text(str(wd / "iter_4.pth"))
    for mode in (["--resume"], ["--resume", "auto"]):  # auto does not start over unreadable files either
        r = run_cli(["train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd), *mode])
        assert r.code == 2, r.err
        assert "no readable checkpoint" in r.err and "iter_4.pth" in r.err and "iter_2.pth" in r.err
        assert len(r.err.strip().splitlines()) == 1
    assert sorted(p.name for p in wd.iterdir()) == ["iter_2.pth", "iter_4.pth", "last_checkpoint"]


DISK_FULL = """
import errno, os
from mmengine.fileio.backends.local_backend import LocalBackend

put, parts = LocalBackend.put, []

def failing_put(self, obj, filepath):
    if str(filepath).endswith(".part"):
        parts.append(filepath)
        if len(parts) == 2:  # the second checkpoint: some bytes made it, then the disk is full
            with open(filepath, "wb") as f:
                f.write(obj[:1000])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return put(self, obj, filepath)

LocalBackend.put = failing_put
"""


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(data_root: Path, tmp_path: Path) -> None:
    wd = tmp_path / "w"
    r = dtop_patched(DISK_FULL, "train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd),
                     "--max-iters", "4", *_sets(), cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    line = stop_line(r.stderr)
    assert "No space left on device" in line and "iter_4.pth" in line
    assert "a checkpoint needs about" in line and "MiB" in line  # how much room to make
    assert f"{wd / 'iter_2.pth'} and last_checkpoint are unchanged" in line
    assert (wd / "last_checkpoint").read_text() == str(wd / "iter_2.pth")
    assert load_checkpoint(wd / "iter_2.pth")["meta"]["iter"] == 2
    assert not (wd / "iter_4.pth").exists() and not list(wd.glob(".*.part"))


# --------------------------------------------------------------------------- non-finite loss

NAN_AT_ITERATION_3 = """
import sys
from dtop_cli.model.segmentor import DToPSegmentor

loss, calls = DToPSegmentor.loss, []

def poisoned(self, inputs, data_samples):
    losses = loss(self, inputs, data_samples)
    calls.append(1)
    print(f"loss call {len(calls)}", file=sys.__stderr__, flush=True)
    if len(calls) == 3:
        losses["decode.loss_mask"] = losses["decode.loss_mask"] * float("nan")
    return losses

DToPSegmentor.loss = poisoned
"""


@pytest.mark.slow
def test_nan_loss_stops_at_its_iteration_and_names_the_term(data_root: Path, tmp_path: Path) -> None:
    wd = tmp_path / "w"
    r = dtop_patched(NAN_AT_ITERATION_3, "train", "-p", PRESET, "--data-root", str(data_root), "--work-dir",
                     str(wd), "--max-iters", "4", *_sets(), cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    line = stop_line(r.stderr)
    assert "non-finite loss at iteration 3: decode.loss_mask=nan;" in line
    assert "aux_0" not in line and f"the last good checkpoint is {wd / 'iter_2.pth'}" in line
    assert "loss call 3" in r.stderr and "loss call 4" not in r.stderr  # stopped there
    assert sorted(p.name for p in wd.glob("*.pth")) == ["iter_2.pth"]
    assert (wd / "last_checkpoint").read_text() == str(wd / "iter_2.pth")


# --------------------------------------------------------------------------- damaged data


def test_corrupt_jpeg_is_named_by_training_and_by_verify(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_synthetic(root, n_train=8, n_val=3, size=64)
    images = sorted((root / "synthetic" / "images" / "training").glob("*.jpg"))
    bad = images[3]
    bad.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))  # a JPEG start, then noise
    label = f"annotations/training/{bad.stem}.png"

    r = dtop("train", "-p", PRESET, "--data-root", str(root), "--work-dir", str(tmp_path / "w"),
             "--max-iters", "2", *_sets("data.batch_size=8"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    err = " ".join(r.stderr.split())  # rich may wrap
    assert f"images/training/{bad.name} + {label}" in err
    assert f"in dataset folder {root / 'synthetic'}" in err
    assert "image cannot be read" in err and "dtop prepare synthetic --verify" in err

    r = run_cli(["prepare", "synthetic", "--verify", "--data-root", str(root), "--json", "--workers", "1"])
    assert r.code == 1
    problems = r.json()["problems"]
    assert len(problems) == 1 and f"images/training/{bad.name}" in problems[0], problems


# --------------------------------------------------------------------------- bf16 autocast


@pytest.mark.slow
def test_bf16_autocast_trains_with_exits_and_predicts_like_fp32(data_root: Path, tmp_path: Path) -> None:
    """What `--amp` does on a GPU (mmengine's autocast, bf16), on the CPU: training steps of
    the tiny preset with exits on keep the loss finite, and the labels it predicts agree with
    fp32 inference of the same weights. The weights are first fitted (fp32) to a few images:
    an untrained model's near-uniform scores would flip under any rounding, a trained one's
    do not."""
    import random

    import numpy as np
    import torch
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import OptimWrapper
    from mmengine.registry import DefaultScope
    from mmengine.runner.amp import autocast
    from mmseg.registry import DATASETS

    from dtop_cli.data.mmseg import register_modules
    from dtop_cli.model.build import build_model
    from dtop_cli.presets import load_preset
    from dtop_cli.runtime.config import RunOptions, build_config
    random.seed(0)
    np.random.seed(0)  # the train pipeline's flips draw from numpy
    torch.manual_seed(0)
    p = load_preset(PRESET, [s for s in SMALL if s.startswith("data.") and "batch" not in s])
    register_modules()
    cfg = build_config(p, RunOptions("prune", data_root=data_root, work_dir=tmp_path), cuda=False)
    with DefaultScope.overwrite_default_scope("mmseg"):
        train_set = DATASETS.build(cfg.train_dataloader.dataset)
        val_set = DATASETS.build(cfg.val_dataloader.dataset)
    model = build_model(p, threshold=0.3)  # low enough that tokens exit
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=3e-3))
    batch = pseudo_collate([train_set[i] for i in range(4)])
    for _ in range(120):
        model.train_step(batch, optim)
    for _ in range(3):
        with autocast(device_type="cpu", dtype=torch.bfloat16):
            log_vars = model.train_step(batch, optim)
        assert all(torch.isfinite(v).all() for v in log_vars.values()), log_vars

    model.eval()
    images = pseudo_collate([val_set[i] for i in range(len(val_set))] + [train_set[i] for i in range(4)])
    with torch.no_grad():
        fp32 = model.test_step(images)
        with autocast(device_type="cpu", dtype=torch.bfloat16):
            bf16 = model.test_step(images)
    exits = [int((s.exit_stage.data == 1).sum()) for s in fp32]
    assert sum(exits) > 0  # the exit path ran
    agree = [(a.pred_sem_seg.data == b.pred_sem_seg.data).float().mean().item() for a, b in zip(fp32, bf16)]
    fitted = agree[len(val_set):]
    print(f"bf16 vs fp32 labels: {100 * np.mean(agree):.2f}% of pixels agree "
          f"(the fitted images: {100 * min(fitted):.2f}% at least)")
    # On the images the weights were fitted to the scores have margin: rounding must not move
    # the labels. On unseen images some tokens sit near the exit threshold, and a flipped exit
    # decision changes the labels of a whole token: those may differ a little more.
    assert min(fitted) >= 0.98
    assert np.mean(agree) >= 0.95
