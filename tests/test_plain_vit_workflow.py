"""A tiny SETR-like and a tiny Segmenter-like preset through the workflow on synthetic data:
train (auxiliary heads), prune, eval; and flops / sweep / infer / bench on the result.

The Segmenter-like run starts as the issue's users do: from a "released" file without
auxiliary heads (`dtop train --init`), backbone and decode head frozen by the preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_train_cli import dtop, one_json

from dtop_cli import presets as P
from dtop_cli.data.synthetic import make_synthetic
from dtop_cli.model.build import build_model
from dtop_cli.safeload import load_checkpoint

TINY_DATA = {"crop": [48, 48], "train_scale": [64, 64], "test_scale": [64, 64], "test_mode": "slide",
             "test_stride": [32, 32], "batch_size": 2, "num_workers": 0, "val_images": 3}
MODEL = {"embed_dims": 32, "num_heads": 2, "mlp_ratio": 2, "drop_path_rate": 0.0, "pretrained": None,
         "with_cls_token": True}
TINY = {
    "setr": {**MODEL, "num_layers": 4, "stage_ends": [0, 1, 2, 3], "interpolate_mode": "bilinear",
             "head": {"type": "setr-up", "channels": 16, "num_heads": 1, "num_layers": 1, "dropout": 0.0},
             "aux_head": {"type": "setr-up", "channels": 16, "num_heads": 1, "num_layers": 2, "dropout": 0.0}},
    "segmenter": {**MODEL, "num_layers": 3, "stage_ends": [0, 1, 2], "interpolate_mode": "bicubic",
                  "final_norm": True, "aux_heads_added": True,
                  "head": {"type": "mask-transformer", "channels": 32, "num_heads": 2, "num_layers": 1,
                           "dropout": 0.0},
                  "aux_head": {"type": "linear", "channels": 32, "num_heads": 1, "num_layers": 1,
                               "dropout": 0.0}},
}


def tiny_preset(tmp: Path, family: str) -> Path:
    data = P.load_preset("tiny-synthetic").to_dict()
    data["name"] = f"tiny-{family}"
    data["model"].update(TINY[family])
    data["data"].update(TINY_DATA)
    data["loss"]["aux_weight"] = 0.4
    data["optim"].update(lr=1e-3, warmup_iters=1)
    data["pretrain"] = None
    if family == "segmenter":
        data["schedule"]["base"]["frozen"] = ["backbone", "decode_head"]
    path = tmp / f"tiny-{family}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    P.load_preset(str(path))  # valid
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, n_train=6, n_val=3, size=64)
    return root


def _prune_and_eval(preset: Path, base_ckpt: str, data_root: Path, tmp: Path) -> dict:
    pr = one_json(dtop("prune", "-p", str(preset), "--from", base_ckpt, "--thresh", "0.3", "--data-root",
                       str(data_root), "--work-dir", str(tmp / "prune"), "--max-iters", "2", "--json", cwd=tmp))
    assert pr["phase"] == "prune" and pr["threshold"] == 0.3
    ev = one_json(dtop("eval", "-p", str(preset), "--ckpt", pr["checkpoint"], "--data-root", str(data_root),
                       "--json", cwd=tmp))
    assert 0.0 <= ev["miou"] <= 100.0
    return pr


@pytest.mark.slow
def test_tiny_setr_trains_prunes_and_evaluates(data_root: Path, tmp_path: Path) -> None:
    preset = tiny_preset(tmp_path, "setr")
    base = one_json(dtop("train", "-p", str(preset), "--data-root", str(data_root), "--work-dir",
                         str(tmp_path / "base"), "--max-iters", "3", "--json", cwd=tmp_path))
    state = load_checkpoint(base["checkpoint"])["state_dict"]
    assert any(k.startswith("auxiliary_head.2.up_convs.1.0.bn.") for k in state)  # SETR's two-block aux heads
    _prune_and_eval(preset, base["checkpoint"], data_root, tmp_path)


@pytest.mark.slow
def test_tiny_segmenter_from_a_released_file(data_root: Path, tmp_path: Path, run_cli) -> None:
    preset = tiny_preset(tmp_path, "segmenter")
    torch.manual_seed(0)
    released = {k: v for k, v in build_model(P.load_preset(str(preset))).state_dict().items()
                if not k.startswith("auxiliary_head.")}
    zoo = tmp_path / "released.pth"
    torch.save({"state_dict": released, "meta": {}}, zoo)

    r = dtop("train", "-p", str(preset), "--init", str(zoo), "--data-root", str(data_root), "--work-dir",
             str(tmp_path / "heads"), "--max-iters", "3", "--json", cwd=tmp_path)
    base = one_json(r)
    assert "new keys" in r.stderr and "auxiliary_head" in r.stderr
    state = load_checkpoint(base["checkpoint"])["state_dict"]
    for k, v in released.items():  # frozen by the preset: backbone and decode head unchanged
        assert torch.equal(state[k], v), k
    assert any(k.startswith("auxiliary_head.1.classifier") for k in state)
    pr = _prune_and_eval(preset, base["checkpoint"], data_root, tmp_path)

    # the other commands take the new preset unchanged
    ckpt = pr["checkpoint"]
    f = run_cli(["flops", "--preset", str(preset), "--ckpt", ckpt, "--data-root", str(data_root), "--json"])
    assert f.code == 0, f.err
    s = run_cli(["sweep", "--preset", str(preset), "--ckpt", ckpt, "--thresholds", "0.3,1.0", "--data-root",
                 str(data_root), "--out", str(tmp_path / "sweep"), "--json"])
    assert s.code == 0, s.err
    img = sorted((data_root / "synthetic").rglob("*.jpg"))[:1] or sorted(data_root.rglob("*.jpg"))[:1]
    i = run_cli(["infer", str(img[0]), "--preset", str(preset), "--ckpt", ckpt, "--out", str(tmp_path / "o")])
    assert i.code == 0, i.err
    rec = json.loads(i.out.splitlines()[0])
    assert rec["gflops"] > 0
    b = run_cli(["bench", "--preset", str(preset), "--exits", "0.3,0.6", "--repeats", "1", "--warmup", "0",
                 "--json"])
    assert b.code == 0, b.err


def test_init_and_phase_errors_are_one_line(run_cli, tmp_path: Path) -> None:
    r = run_cli(["train", "--preset", "segmenter-base-ade", "--init", str(tmp_path / "nope.pth"),
                 "--data-root", str(tmp_path), "--work-dir", str(tmp_path / "w")])
    assert r.code == 2
    r = run_cli(["train", "--preset", "segmenter-base-ade", "--init", str(tmp_path / "a.pth"),
                 "--pretrained", str(tmp_path / "b.pth"), "--work-dir", str(tmp_path / "w")])
    assert r.code == 2 and "--init" in r.err and len(r.err.strip().splitlines()) == 1
