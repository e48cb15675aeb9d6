"""`dtop infer` and `dtop sweep` on tiny-synthetic: the files they write and what they claim.

A session fixture makes a small synthetic dataset and trains the tiny-synthetic model (at a
128-pixel crop, so the test stays short) for a few dozen steps into an mmengine-style
checkpoint. So short a training gives a weak model whose token confidences sit in a narrow
band; the thresholds the tests use are therefore taken from the model's own stage-1
confidences (quantiles), which guarantees that some tokens exit early and some do not.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from fitting import fit_tiny

from dtop_cli import viz
from dtop_cli.commands.infer import find_images
from dtop_cli.commands.sweep import parse_thresholds, to_csv
from dtop_cli.errors import UserError
from dtop_cli.fsutil import atomic_write
from dtop_cli.metrics import finalised, token_shares
from dtop_cli.presets import load_preset

SIZE = 128  # crop and test scale of the test preset: 8x8 tokens of 16 px
STEPS = 80
N_VAL = 3


@dataclass
class Trained:
    root: Path
    data_root: Path
    preset: Path
    ckpt: Path
    val_images: list
    thresholds: list  # from low to high, all < 1, each splitting the stage-1 confidences


def _preset_file(path: Path) -> Path:
    size = f"[{SIZE},{SIZE}]"
    p = load_preset("tiny-synthetic", [f"data.{k}={size}" for k in ("crop", "test_scale", "train_scale",
                                                                     "test_stride")])
    path.write_text(yaml.safe_dump(p.to_dict(), sort_keys=False))
    return path


def _train(preset_path: Path, data: Path, ckpt: Path) -> None:
    """A few AdamW steps of the real training loss (all heads supervised, nothing exits)."""
    model, p = fit_tiny(preset_path, data, STEPS)
    torch.save({"meta": {"dtop": {"threshold": p.exit.threshold}, "iter": STEPS},
                "state_dict": model.state_dict()}, ckpt)


@torch.no_grad()
def _stage1_thresholds(preset_path: Path, ckpt: Path, images: list) -> list:
    """Quantiles of the stage-1 head's best token score over the validation images."""
    from dtop_cli import api
    from dtop_cli.model import exits as X

    model = api.load_model(str(preset_path), ckpt, threshold=0.5)
    best = []
    for f in images:
        x = torch.from_numpy(cv2.imread(str(f))).permute(2, 0, 1)
        inputs = model.data_preprocessor({"inputs": [x]}, training=False)["inputs"]
        n = inputs.shape[-2] * inputs.shape[-1] // model.backbone.patch_size ** 2
        none = [torch.zeros(1, n, dtype=torch.bool)] * (model.num_stages - 1)
        out = model.forward_dtop(inputs, forced_exits=none)
        scores = X.token_scores(out.stage_presence[0], out.stage_masks[0].flatten(2))
        best.append(scores.max(1).values.flatten())
    q = torch.quantile(torch.cat(best), torch.tensor([0.2, 0.5, 0.8])).tolist()
    return [round(v, 6) for v in q]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    from dtop_cli.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("infer_sweep")
    make_synthetic(root / "data", seed=0, n_train=12, n_val=N_VAL, size=SIZE)
    data = root / "data" / "synthetic"
    preset = _preset_file(root / "tiny-128.yaml")
    ckpt = root / "tiny.pth"
    _train(preset, data, ckpt)
    val = sorted((data / "images" / "validation").glob("*.jpg"))
    ths = _stage1_thresholds(preset, ckpt, val)
    assert ths[0] < ths[-1] < 1.0, ths
    return Trained(root, root / "data", preset, ckpt, val, ths)


def _stage_of_blocks(exits_png: np.ndarray, grid: tuple, colours: np.ndarray) -> np.ndarray:
    """Read the stage of every 16x16 token block back from the flat exit map (majority colour)."""
    gh, gw = grid
    body = exits_png[: gh * 16, : gw * 16].astype(np.int32)
    bgr = colours[:, ::-1].astype(np.int32)
    dist = np.abs(body[:, :, None, :] - bgr[None, None]).sum(-1)  # (H, W, S)
    exact = dist.min(-1) == 0
    stage = np.where(exact, dist.argmin(-1) + 1, 0)
    out = np.zeros(grid, np.int64)
    for i in range(gh):
        for j in range(gw):
            block = stage[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
            votes = np.bincount(block.ravel(), minlength=len(colours) + 1)
            votes[0] = 0
            out[i, j] = int(votes.argmax())
    return out


# --------------------------------------------------------------------------- infer


@pytest.mark.slow
def test_infer_writes_pictures_that_match_the_reported_numbers(trained, run_cli, tmp_path):
    from PIL import Image

    from dtop_cli import api

    src = tmp_path / "in"
    src.mkdir()
    for f in trained.val_images:
        (src / f.name).write_bytes(f.read_bytes())
    wide = cv2.imread(str(trained.val_images[0]))[10:110, :]  # 100 x 128: resized, not square
    cv2.imwrite(str(src / "wide.png"), wide)
    (src / "broken.jpg").write_bytes(b"not an image at all")
    thr = trained.thresholds[1]
    out_dir = tmp_path / "out"
    r = run_cli(["infer", str(src), "--preset", str(trained.preset), "--ckpt", str(trained.ckpt),
                 "--out", str(out_dir), "--thresh", str(thr)])
    assert r.code == 0, r.err
    assert "broken.jpg" in r.err and "skipped" in r.err
    lines = [json.loads(ln) for ln in r.out.splitlines() if ln.strip()]
    assert len(lines) == N_VAL + 1  # every readable image, one JSON line each
    assert {Path(rec["image"]).name for rec in lines} == {f.name for f in trained.val_images} | {"wide.png"}
    model = api.load_model(str(trained.preset), trained.ckpt, threshold=thr)
    colours = viz.stage_colours(model.num_stages)
    mixed = False
    for rec in lines:
        img = cv2.imread(rec["image"])
        H, W = img.shape[:2]
        assert (rec["height"], rec["width"]) == (H, W)
        assert rec["threshold"] == pytest.approx(thr)
        assert rec["gflops"] is None or rec["gflops"] > 0
        assert sum(rec["exit_share"]) == pytest.approx(1.0)
        for kind in ("labels", "overlay", "exits", "panel"):
            assert Path(rec["outputs"][kind]).is_file()
        # labels: a palette PNG whose values are the class ids api.predict gives
        lab = np.array(Image.open(rec["outputs"]["labels"]))
        assert lab.shape == (H, W)
        pred = api.predict(model, img)
        assert np.array_equal(lab, pred.labels)
        assert cv2.imread(rec["outputs"]["labels"]).shape == (H, W, 3)  # viewers see colours
        assert cv2.imread(rec["outputs"]["overlay"]).shape == (H, W, 3)
        panel = cv2.imread(rec["outputs"]["panel"])
        assert panel is not None and panel.shape[1] > 2 * W
        ex = cv2.imread(rec["outputs"]["exits"])
        assert ex.shape[1] == W and ex.shape[0] > H  # the map at the photo's size + legend strip
        if (H, W) == (SIZE, SIZE):  # no resize: tokens are exact 16x16 blocks of the map
            grid = tuple(rec["tokens"])
            assert grid == (SIZE // 16, SIZE // 16)
            stages = _stage_of_blocks(ex, grid, colours)
            assert np.array_equal(stages, pred.exit_stage)
            counts = np.bincount(stages.ravel(), minlength=model.num_stages + 1)[1:]
            assert np.allclose(counts / stages.size, rec["exit_share"], atol=1e-9)
            mixed |= int((counts > 0).sum()) > 1
    assert mixed, "the median stage-1 confidence as threshold should retire some tokens but not all"
    # nothing but the pictures (no temporary files) is left in the output folder
    names = sorted(p.name for p in out_dir.iterdir())
    assert len(names) == 4 * (N_VAL + 1) and not any(n.startswith(".") for n in names)


@pytest.mark.slow
def test_infer_json_globs_and_unreadable_inputs(trained, run_cli, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    pattern = str(trained.val_images[0].parent / "*_00000001.jpg")
    r = run_cli(["infer", pattern, str(bad), str(tmp_path / "missing.jpg"), "--preset", str(trained.preset),
                 "--ckpt", str(trained.ckpt), "--out", str(tmp_path / "o"), "--json"])
    assert r.code == 0, r.err
    obj = r.json()
    assert [Path(x["image"]).name for x in obj["images"]] == ["syn_val_00000001.jpg"]
    assert {Path(s["image"]).name for s in obj["skipped"]} == {"bad.png", "missing.jpg"}
    # the preset's threshold, recorded in the checkpoint's meta
    assert obj["threshold"] == pytest.approx(load_preset("tiny-synthetic").exit.threshold)
    # no image readable at all: exit 2, one line, and no output folder left behind
    r = run_cli(["infer", str(bad), "--preset", str(trained.preset), "--ckpt", str(trained.ckpt),
                 "--out", str(tmp_path / "o2")])
    assert r.code == 2
    assert "could be read" in r.err
    assert not (tmp_path / "o2").exists()
    r = run_cli(["infer", str(trained.val_images[0]), "--preset", str(trained.preset), "--ckpt",
                 str(trained.ckpt), "--out", str(tmp_path / "o3"), "--thresh", "1.5"])
    assert r.code == 2 and "--thresh" in r.err


# --------------------------------------------------------------------------- sweep


@pytest.mark.slow
def test_sweep_csv_plot_and_trade_off(trained, run_cli, tmp_path):
    ths = trained.thresholds + [1.0]
    out_dir = tmp_path / "sweep"
    r = run_cli(["sweep", "--preset", str(trained.preset), "--ckpt", str(trained.ckpt), "--thresholds",
                 ",".join(map(str, ths)), "--data-root", str(trained.data_root), "--out", str(out_dir),
                 "--json"])
    assert r.code == 0, r.err
    obj = r.json()
    assert obj["images"] == N_VAL
    rows = list(csv.DictReader((out_dir / "sweep.csv").open()))
    assert len(rows) == len(ths)
    assert [float(x["threshold"]) for x in rows] == sorted(ths, reverse=True)
    assert list(rows[0]) == ["threshold", "miou", "aacc", "gflops", "exit_share_stage1", "exit_share_stage2",
                             "exit_share_stage3"]
    for row, js in zip(rows, obj["rows"]):
        assert float(row["miou"]) == pytest.approx(js["miou"], abs=1e-3)
        assert 0.0 <= js["miou"] <= 100.0
        assert sum(js["exit_share"]) == pytest.approx(1.0)
    plot = cv2.imread(str(out_dir / "sweep.png"))
    assert plot is not None and plot.shape[0] > 100 and plot.shape[1] > 100
    gf = [float(x["gflops"]) for x in rows]  # thresholds from high to low
    share1 = [float(x["exit_share_stage1"]) for x in rows]
    assert share1[0] == 0.0 and gf[0] > 0  # 1.0: the base model, nothing leaves early
    assert share1[-1] > 0.3
    # below 1.0 the auxiliary heads run, so cost can only fall as the threshold falls further
    assert all(a >= b - 1e-9 for a, b in zip(gf[1:], gf[2:])), gf
    assert gf[-1] < gf[0], gf
    # eval and sweep share one measurement path: the same numbers for the same threshold
    for t, row in ((1.0, obj["rows"][0]), (ths[0], obj["rows"][-1])):
        r = run_cli(["eval", "--preset", str(trained.preset), "--ckpt", str(trained.ckpt), "--thresh", str(t),
                     "--data-root", str(trained.data_root), "--flops", "--json"])
        assert r.code == 0, r.err
        ev = r.json()
        assert abs(ev["miou"] - row["miou"]) < 1e-9 and abs(ev["gflops"] - row["gflops"]) < 1e-9
        assert ev["exit_share"] == pytest.approx(row["exit_share"], abs=1e-12)
        # crop-size images, one whole window each: the protocol's cost is the paper window's
        assert ev["gflops_protocol"] == pytest.approx(ev["gflops"], rel=1e-12)


@pytest.mark.slow
def test_sweep_bad_inputs(trained, run_cli, tmp_path):
    base = ["sweep", "--preset", str(trained.preset), "--ckpt", str(trained.ckpt),
            "--out", str(tmp_path / "s")]
    r = run_cli(base + ["--thresholds", "0.9,abc", "--data-root", str(trained.data_root)])
    assert r.code == 2 and "abc" in r.err
    r = run_cli(base + ["--thresholds", "0.9", "--data-root", str(tmp_path / "nowhere")])
    assert r.code == 2 and "validation" in r.err
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- pure pieces


def test_parse_thresholds():
    assert parse_thresholds("0.8, 0.9,1.0,0.9") == [1.0, 0.9, 0.8]
    for bad in ("", "0", "1.2", "x", "-0.5"):
        with pytest.raises(UserError):
            parse_thresholds(bad)


def test_finalised_per_stage_and_csv():
    fin = finalised([256, 100, 40]) + finalised([128, 128, 128])
    assert fin.tolist() == [156 + 0, 60 + 0, 40 + 128]
    exit_share, active = token_shares([256 + 128, 100 + 128, 40 + 128])
    assert exit_share == pytest.approx([156 / 384, 60 / 384, 168 / 384]) and active[0] == 1.0
    rows = [{"threshold": 1.0, "miou": 50.0, "aacc": 80.0, "gflops": 0.25, "exit_share": [0.0, 0.0, 1.0]}]
    text = to_csv(rows, 3).decode().splitlines()
    assert text[0].startswith("threshold,miou,aacc,gflops,exit_share_stage1")
    assert text[1].split(",")[3] == "0.25"


def test_token_grid_maps_onto_non_square_photos():
    # 300 x 200 photo, resized by the test pipeline to 256 x 171: an 16 x 11 token grid
    grid = np.arange(16 * 11).reshape(16, 11) % 3 + 1
    stage, rows, cols = viz.stage_pixels(grid, 300, 200, (256, 171), 16)
    assert stage.shape == (300, 200)
    assert rows[0] == 0 and rows[-1] == 15 and cols[0] == 0 and cols[-1] == 10
    assert np.all(np.diff(rows) >= 0) and np.all(np.diff(cols) >= 0)
    assert set(np.unique(rows)) == set(range(16)) and set(np.unique(cols)) == set(range(11))
    # a photo pixel takes the stage of the token its centre falls into
    y, x = 150, 100
    assert stage[y, x] == grid[int((y + 0.5) * 256 / 300) // 16, int((x + 0.5) * 171 / 200) // 16]


def test_label_png_round_trip_and_palettes(tmp_path):
    from PIL import Image

    names, palette = viz.dataset_meta(load_preset("tiny-synthetic"))
    assert len(names) == len(palette) == 8 and names[0] == "stripes"
    names, palette = viz.dataset_meta(load_preset("segvit-base-ade"))
    assert len(palette) == 150 and palette[0].tolist() == [120, 120, 120]  # mmseg's ADE20K colours
    labels = np.random.default_rng(0).integers(0, 150, (37, 53))
    path = tmp_path / "l.png"
    atomic_write(path, viz.label_png(labels, palette))
    assert np.array_equal(np.array(Image.open(path)), labels)
    rgb = cv2.imread(str(path))[..., ::-1]
    assert np.array_equal(rgb, palette[labels])
    assert [p.name for p in tmp_path.iterdir()] == ["l.png"]  # no temporary file left


def test_find_images_files_folders_globs(tmp_path):
    for n in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path), str(tmp_path / "*.jpg"), str(tmp_path / "empty"), str(tmp_path / "nope.jpg")]
    found = find_images(args)
    assert [p.name for p in found.files] == ["a.png", "b.jpg"]  # folder order, glob hit not repeated
    assert [w for _, w in found.problems] == ["folder holds no images", "no such file or folder"]
    # the output folder's own pictures are never taken as inputs
    found = find_images([str(tmp_path)], exclude=tmp_path)
    assert found.files == []
