"""dtop train / prune / eval / config / quickstart on the tiny preset and a tiny synthetic set.

Training runs go through a real subprocess (as a user runs them) for a couple of iterations;
bad-input checks run in-process, they stop before any runner is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config

from dtop_cli.data.synthetic import make_synthetic
from dtop_cli.safeload import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
PRESET = "tiny-synthetic"


def dtop(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "dtop_cli.cli", *args], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def one_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, n_train=8, n_val=3, size=64)
    return root


@pytest.fixture(scope="module")
def base_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-iteration base run shared by the tests below."""
    wd = tmp_path_factory.mktemp("base")
    r = dtop("train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd),
             "--max-iters", "2", "--json", cwd=wd)
    res = one_json(r)
    res["_stderr"] = r.stderr
    return res


@pytest.mark.slow
def test_console_is_quiet_and_the_log_file_complete(base_run: dict, data_root: Path, tmp_path: Path) -> None:
    """mmengine's environment dump, config and hook table go to the log file, not the terminal."""
    err = base_run["_stderr"]
    for chatter in ("System environment", "Hooks will be executed", "FileClient", "The draw is False"):
        assert chatter not in err, chatter
    (log,) = Path(base_run["work_dir"]).glob("*/*.log")
    text = log.read_text()
    assert "System environment" in text and "Iter(train) [2/2]" in text
    r = dtop("train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(tmp_path / "v"),
             "--max-iters", "1", "--verbose", "--json", cwd=tmp_path)
    assert one_json(r)["iters"] == 1
    assert "System environment" in r.stderr and "Iter(train) [1/1]" in r.stderr


def _weights(path: str) -> dict:
    return {k: tuple(v.shape) for k, v in load_checkpoint(path)["state_dict"].items()}


@pytest.mark.slow
def test_train_checkpoint_resume_eval_cycle(base_run: dict, data_root: Path, tmp_path: Path) -> None:
    wd = Path(base_run["work_dir"])
    assert base_run["checkpoint"] == str(wd / "iter_2.pth") and base_run["iters"] == 2
    assert (wd / "last_checkpoint").read_text() == base_run["checkpoint"]
    meta = load_checkpoint(base_run["checkpoint"])["meta"]
    assert meta["iter"] == 2 and meta["dtop"]["phase"] == "base" and meta["dtop"]["threshold"] == 1.0

    # continue the same run to 3 iterations: it must resume from iteration 2, not restart
    res = one_json(dtop("train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd),
                        "--max-iters", "3", "--resume", "--json", cwd=tmp_path))
    assert res["resumed_from"] == str(wd / "iter_2.pth")
    assert res["checkpoint"] == str(wd / "iter_3.pth")
    assert load_checkpoint(res["checkpoint"])["meta"]["iter"] == 3
    assert sorted(p.name for p in wd.glob("*.pth")) == ["iter_2.pth", "iter_3.pth"]
    assert not list(wd.glob(".*part"))

    # dtop eval scores the checkpoint exactly as mmseg's own validation loop did at its end
    ev = one_json(dtop("eval", "-p", PRESET, "--ckpt", res["checkpoint"], "--data-root", str(data_root),
                       "--json", cwd=tmp_path))
    assert ev["threshold"] == 1.0 and ev["images"] == 3
    assert 0.0 <= ev["miou"] <= 100.0 and 0.0 <= ev["aacc"] <= 100.0
    assert ev["miou"] == pytest.approx(res["metrics"]["mIoU"], abs=0.011)
    assert ev["aacc"] == pytest.approx(res["metrics"]["aAcc"], abs=0.011)
    assert "exit_share" not in ev  # only with --flops


@pytest.mark.slow
def test_prune_changes_the_work_not_the_architecture(base_run: dict, data_root: Path, tmp_path: Path) -> None:
    # A very low threshold: even an untrained model retires most tokens after stage 1.
    r = dtop("prune", "-p", PRESET, "--from", base_run["checkpoint"], "--thresh", "0.05",
             "--data-root", str(data_root), "--work-dir", str(tmp_path / "prune"), "--max-iters", "1",
             "--json", cwd=tmp_path)
    pr = one_json(r)
    # mmengine print()s where it loads the weights from: the log file has it, the console not
    assert "Loads checkpoint" not in r.stderr
    (log,) = (tmp_path / "prune").glob("*/*.log")
    assert "Loads checkpoint" in log.read_text()
    assert pr["threshold"] == 0.05 and pr["phase"] == "prune"
    assert _weights(pr["checkpoint"]) == _weights(base_run["checkpoint"])  # same architecture
    assert load_checkpoint(pr["checkpoint"])["meta"]["dtop"]["threshold"] == 0.05

    common = ["-p", PRESET, "--data-root", str(data_root), "--json", "--flops"]
    eb = one_json(dtop("eval", "--ckpt", base_run["checkpoint"], *common, cwd=tmp_path))
    # no --thresh: the threshold recorded in the pruned checkpoint
    ep = one_json(dtop("eval", "--ckpt", pr["checkpoint"], *common, cwd=tmp_path))
    assert ep["threshold"] == 0.05 and eb["threshold"] == 1.0
    assert eb["exit_share"] == [0.0, 0.0, 1.0]
    assert ep["exit_share"][0] > 0.3
    assert ep["gflops"] < eb["gflops"]


@pytest.mark.slow
def test_two_cpu_processes(data_root: Path, tmp_path: Path) -> None:
    """--gpus 2 on a CPU machine: torchrun starts 2 gloo processes; rank 0 alone writes."""
    wd = tmp_path / "ddp"
    r = dtop("train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(wd), "--max-iters", "2",
             "--gpus", "2", "--json", cwd=tmp_path)
    res = one_json(r)  # torchrun exits 0 only when every rank did; one JSON line = rank 0 alone
    assert res["checkpoint"] == str(wd / "iter_2.pth")
    assert sorted(p.name for p in wd.glob("*.pth")) == ["iter_2.pth"]
    cfg = Config.fromfile(str(next(wd.glob("*.py"))))  # the config mmengine dumped
    assert cfg.launcher == "pytorch" and cfg.train_dataloader.batch_size == 4  # 8 split over 2


@pytest.mark.slow
def test_eval_over_two_cpu_processes_equals_one(data_root: Path, tmp_path: Path) -> None:
    """eval --gpus 2: each rank scores its share of the images; the all-reduced confusion,
    cost and exit tallies give exactly the single-process numbers."""
    import torch

    from dtop_cli.model.build import build_model
    from dtop_cli.presets import load_preset

    torch.manual_seed(0)
    p = load_preset(PRESET)
    ckpt = tmp_path / "model.pth"
    torch.save({"state_dict": build_model(p).state_dict(),
                "meta": {"dtop": {"preset": p.name, "preset_yaml": p.to_yaml(), "threshold": 0.2}}}, ckpt)
    args = ("eval", "--ckpt", str(ckpt), "--data-root", str(data_root), "--flops", "--stages", "--json")
    one = one_json(dtop(*args, cwd=tmp_path))
    two = one_json(dtop(*args, "--gpus", "2", cwd=tmp_path))
    for res in (one, two):
        res.pop("seconds", None)
    assert sum(one["exit_share"][:-1]) > 0  # something exits, so the exit tallies are exercised
    assert one.keys() == two.keys()
    for k in one:
        if isinstance(one[k], str):
            assert two[k] == one[k], k
        else:
            assert two[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k


# --------------------------------------------------------------------------- bad input


def test_missing_dataset_names_the_prepare_command(run_cli, tmp_path: Path) -> None:
    r = run_cli(["train", "-p", PRESET, "--data-root", str(tmp_path / "nowhere"),
                 "--work-dir", str(tmp_path / "w")])
    assert r.code == 2
    assert "dtop prepare synthetic" in r.err and len(r.err.strip().splitlines()) == 1


def test_preset_dataset_mismatch(run_cli, data_root: Path, tmp_path: Path) -> None:
    r = run_cli(["train", "-p", PRESET, "--set", "data.num_classes=5", "--data-root", str(data_root),
                 "--work-dir", str(tmp_path / "w")])
    assert r.code == 2 and "8 classes" in r.err
    # a dataset dtop does not know: the labels give it away (a public-code checkpoint: --preset says what it is)
    import torch

    torch.save({"state_dict": {}, "meta": {}}, tmp_path / "x.pth")
    r = run_cli(["eval", "-p", PRESET, "--set", "data.dataset=mine", "--set", "data.type=BaseSegDataset",
                 "--set", "data.num_classes=2", "--ckpt", str(tmp_path / "x.pth"),
                 "--data-root", str(data_root)])
    assert r.code == 2 and "do not match" in r.err


def test_wrong_architecture_checkpoint(run_cli, data_root: Path, tmp_path: Path) -> None:
    import torch

    bad = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.pos_embed": torch.zeros(1, 5, 7)}}, bad)
    r = run_cli(["prune", "-p", PRESET, "--from", str(bad), "--data-root", str(data_root),
                 "--work-dir", str(tmp_path / "w")])
    assert r.code == 2 and "does not fit" in r.err
    r = run_cli(["eval", "-p", PRESET, "--ckpt", str(bad), "--data-root", str(data_root)])
    assert r.code == 2 and "does not fit" in r.err


def test_unwritable_work_dir(run_cli, data_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli(["train", "-p", PRESET, "--data-root", str(data_root), "--work-dir", str(blocker / "sub")])
    assert r.code == 2 and "cannot write to work dir" in r.err
    assert blocker.read_text() == "not a folder"


def test_other_bad_options(run_cli, data_root: Path, tmp_path: Path) -> None:
    common = ["-p", PRESET, "--data-root", str(data_root), "--work-dir", str(tmp_path / "w")]
    r = run_cli(["train", *common, "--resume"])
    assert r.code == 2 and "nothing to resume" in r.err
    r = run_cli(["train", *common, "--max-iters", "0"])
    assert r.code == 2
    r = run_cli(["prune", *common, "--from", str(tmp_path / "missing.pth")])
    assert r.code == 2 and "not found" in r.err
    import torch

    torch.save({"state_dict": {}, "meta": {}}, tmp_path / "x.pth")
    if not torch.cuda.is_available():
        r = run_cli(["train", *common, "--amp"])
        assert r.code == 2 and "--amp" in r.err
        r = run_cli(["eval", "-p", PRESET, "--ckpt", str(tmp_path / "x.pth"), "--data-root", str(data_root),
                     "--device", "cuda"])
        assert r.code == 2 and "CUDA" in r.err


# --------------------------------------------------------------------------- config


def test_config_command(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "prune_cfg.py"
    r = run_cli(["config", "-p", PRESET, "--phase", "prune", "--out", str(out), "--max-iters", "20",
                 "--thresh", "0.8"])
    assert r.code == 0, r.err
    cfg = Config.fromfile(str(out))
    assert cfg.model.exit_cfg.threshold == 0.8 and cfg.train_cfg.max_iters == 20
    r = run_cli(["config", "-p", PRESET])
    assert r.code == 0
    assert "custom_imports" in r.out and "DToPSegmentor" in r.out
    (tmp_path / "stdout_cfg.py").write_text(r.out)
    assert Config.fromfile(str(tmp_path / "stdout_cfg.py")).model.exit_cfg.threshold == 1.0
    r = run_cli(["config", "-p", PRESET, "--phase", "finetune"])
    assert r.code == 2


# --------------------------------------------------------------------------- quickstart


@pytest.mark.slow
def test_quickstart_smoke(tmp_path: Path) -> None:
    wd = tmp_path / "qs"
    s = one_json(dtop("quickstart", "--work-dir", str(wd), "--base-iters", "2",
                      "--prune-iters", "1", "--train-images", "8", "--val-images", "3", "--json",
                      cwd=tmp_path))
    assert json.loads((wd / "summary.json").read_text()) == s
    assert set(s) >= {"base", "pruned", "seconds"}
    assert set(s["base"]) >= {"miou", "gflops", "stage_miou"} and len(s["base"]["stage_miou"]) == 3
    assert set(s["pruned"]) >= {"miou", "gflops", "exit_share"} and len(s["pruned"]["exit_share"]) == 3
    assert s["base"]["gflops"] > 0
    # the shipped demo backbone, not a pretraining run
    assert s["pretrain"]["shipped"] and Path(s["pretrain"]["path"]).name == "tiny-synthetic-vit.pth"
    assert not (wd / "pretrain").exists()
    # two runners in one process: each run's scalars in its own file, never appended to the other's
    for run, iters in (("base", [1, 2]), ("prune", [1])):
        files = list((wd / run).glob("*/vis_data/scalars.json"))
        assert len(files) == 1, files
        logged = [json.loads(ln) for ln in files[0].read_text().splitlines()]
        assert [e["iter"] for e in logged if "loss" in e] == iters, run


# --------------------------------------------------------------------------- any number of stages


@pytest.mark.slow
def test_four_stage_preset_trains_prunes_and_evaluates(data_root: Path, tmp_path: Path) -> None:
    """stage_ends may have any length: four stages means three auxiliary heads and exits."""
    import yaml

    spec = yaml.safe_load((REPO / "presets" / f"{PRESET}.yaml").read_text())
    spec["name"] = "tiny-four-stages"
    spec["model"].update(num_layers=8, stage_ends=[1, 3, 5, 7], pretrained=None)  # the shipped backbone has 6
    preset = tmp_path / "four.yaml"
    preset.write_text(yaml.safe_dump(spec))
    common = ["-p", str(preset), "--data-root", str(data_root), "--json"]
    base = one_json(dtop("train", *common, "--work-dir", str(tmp_path / "b"), "--max-iters", "2", cwd=tmp_path))
    state = load_checkpoint(base["checkpoint"])["state_dict"]
    assert {k.split(".")[1] for k in state if k.startswith("auxiliary_head.")} == {"0", "1", "2"}
    pr = one_json(dtop("prune", *common, "--from", base["checkpoint"], "--thresh", "0.05", "--max-iters", "1",
                       "--work-dir", str(tmp_path / "p"), cwd=tmp_path))
    ev = one_json(dtop("eval", *common, "--ckpt", pr["checkpoint"], "--flops", "--stages", cwd=tmp_path))
    assert len(ev["exit_share"]) == 4 and len(ev["stage_miou"]) == 4
    assert sum(ev["exit_share"]) == pytest.approx(1.0) and ev["exit_share"][0] > 0.3
