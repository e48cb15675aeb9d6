"""`dtop prepare ade20k` on tiny archives in the official ADEChallengeData2016.zip format."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop_cli.cli import main
from dtop_cli.data import prepare_dataset, verify_dataset
from dtop_cli.errors import UserError

SIZES = {"training": [(20, 30), (17, 23), (32, 16)], "validation": [(24, 24), (15, 40)]}


def _jpeg(h: int, w: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def build_ade_zip(
    path: Path, *, bad_value: bool = False, bad_size: bool = False, orphan_image: bool = False
) -> dict[str, np.ndarray]:
    """An ADEChallengeData2016.zip with the official tree; returns the label of every stem."""
    labels: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(
            "ADEChallengeData2016/objectInfo150.txt", "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n"
        )
        z.writestr("ADEChallengeData2016/sceneCategories.txt", "ADE_train_00000001 airport\n")
        for split, sizes in SIZES.items():
            tag = "train" if split == "training" else "val"
            for i, (h, w) in enumerate(sizes):
                stem = f"ADE_{tag}_{i + 1:08d}"
                lbl = rng.integers(0, 151, (h, w))
                lbl[0, 0], lbl[0, 1] = 0, 150
                if bad_value and split == "validation" and i == 1:
                    lbl[3, 3] = 151
                labels[stem] = lbl
                ih, iw = (h + 1, w) if (bad_size and split == "training" and i == 2) else (h, w)
                z.writestr(f"ADEChallengeData2016/images/{split}/{stem}.jpg", _jpeg(ih, iw, i))
                z.writestr(f"ADEChallengeData2016/annotations/{split}/{stem}.png", _png(lbl))
        if orphan_image:
            z.writestr("ADEChallengeData2016/images/training/ADE_train_00000099.jpg", _jpeg(8, 8, 0))
    return labels


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_prepare_ade_from_zip_every_pixel(tmp_path, capsys):
    z = tmp_path / "ADEChallengeData2016.zip"
    labels = build_ade_zip(z)
    root = tmp_path / "data"
    code, out, err = _run(
        capsys, ["prepare", "ade20k", "--src", str(z), "--data-root", str(root), "--json", "--workers", "2"]
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["status"] == "prepared"
    assert res["splits"]["train"] == {
        "pairs": 3,
        "official": 20210,
        "classes_seen": res["splits"]["train"]["classes_seen"],
    }
    assert res["splits"]["val"]["pairs"] == 2 and res["splits"]["val"]["official"] == 2000
    ds = root / "ade" / "ADEChallengeData2016"
    for stem, lbl in labels.items():
        split = "training" if "_train_" in stem else "validation"
        got = np.asarray(Image.open(ds / "annotations" / split / f"{stem}.png"))
        np.testing.assert_array_equal(got, lbl)
        assert Image.open(ds / "images" / split / f"{stem}.jpg").size == lbl.shape[::-1]
    seen_train = set().union(*(set(np.unique(v)) for k, v in labels.items() if "_train_" in k)) - {0}
    assert res["splits"]["train"]["classes_seen"] == len(seen_train)
    assert (ds / "objectInfo150.txt").is_file()
    # Nothing but the dataset next to it: the staging folder is gone.
    assert sorted(p.name for p in (root / "ade").iterdir()) == ["ADEChallengeData2016"]


def test_rerun_is_quick_and_verify_passes(tmp_path, capsys):
    z = tmp_path / "ADEChallengeData2016.zip"
    build_ade_zip(z)
    root = tmp_path / "data"
    first = prepare_dataset("ade20k", [z], root, workers=1)
    before = _listing(root)
    again = prepare_dataset("ade20k", [z], root, workers=1)
    assert again["status"] == "already prepared"
    assert again["splits"] == first["splits"]
    assert _listing(root) == before
    # A tiny dataset has fewer pairs than the official one: an error unless --allow-partial.
    code, out, _ = _run(
        capsys, ["prepare", "ade20k", "--verify", "--data-root", str(root), "--json", "--workers", "1"]
    )
    rep = json.loads(out)
    assert code == 1 and not rep["ok"]
    assert rep["problems"] == [
        "train: 3 pairs, the official dataset has 20210",
        "val: 2 pairs, the official dataset has 2000",
    ]
    code, out, _ = _run(
        capsys, ["prepare", "ade20k", "--verify", "--allow-partial", "--data-root", str(root), "--json"]
    )
    rep = json.loads(out)
    assert code == 0 and rep["ok"] and len(rep["warnings"]) == 2


def test_verify_finds_damaged_labels(tmp_path, capsys):
    z = tmp_path / "ADEChallengeData2016.zip"
    build_ade_zip(z)
    root = tmp_path / "data"
    prepare_dataset("ade20k", [z], root, workers=1)
    ds = root / "ade" / "ADEChallengeData2016"
    lab = ds / "annotations" / "validation" / "ADE_val_00000001.png"
    arr = np.asarray(Image.open(lab)).copy()
    arr[1, 1] = 200
    Image.fromarray(arr).save(lab)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(
        ds / "annotations" / "training" / "ADE_train_00000002.png"
    )
    rep = verify_dataset("ade20k", root, workers=1, allow_partial=True)
    assert not rep["ok"]
    assert any("ADE_val_00000001.png has values [200]" in p for p in rep["problems"])
    assert any("ADE_train_00000002.png is 5x5 but its image is 17x23" in p for p in rep["problems"])
    code, out, _ = _run(
        capsys, ["prepare", "ade20k", "--verify", "--allow-partial", "--data-root", str(root)]
    )
    assert code == 1 and "ADE_val_00000001.png" in out


def test_prepare_from_extracted_folder_and_in_place(tmp_path):
    z = tmp_path / "ADEChallengeData2016.zip"
    labels = build_ade_zip(z)
    with zipfile.ZipFile(z) as zf:
        zf.extractall(tmp_path / "unpacked")
    src = tmp_path / "unpacked"
    before = _listing(src)
    res = prepare_dataset("ade20k", [src], tmp_path / "data", workers=1)
    assert res["splits"]["train"]["pairs"] == 3
    assert _listing(src) == before  # the user's folder is untouched
    got = np.asarray(
        Image.open(tmp_path / "data/ade/ADEChallengeData2016/annotations/training/ADE_train_00000001.png")
    )
    np.testing.assert_array_equal(got, labels["ADE_train_00000001"])

    # Extracted where the presets look: checked and marked in place, nothing moved.
    root2 = tmp_path / "data2"
    (root2 / "ade").mkdir(parents=True)
    with zipfile.ZipFile(z) as zf:
        zf.extractall(root2 / "ade")
    res = prepare_dataset("ade20k", [root2 / "ade" / "ADEChallengeData2016"], root2, workers=1)
    assert res["status"] == "prepared" and res["splits"]["val"]["pairs"] == 2
    assert (root2 / "ade" / "ADEChallengeData2016" / ".dtop-prepared.json").is_file()


def test_foreign_target_is_left_alone(tmp_path):
    z = tmp_path / "ADEChallengeData2016.zip"
    build_ade_zip(z)
    mine = tmp_path / "data" / "ade" / "ADEChallengeData2016" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    with pytest.raises(UserError, match="was not made by `dtop prepare`"):
        prepare_dataset("ade20k", [z], tmp_path / "data", workers=1)
    assert _listing(tmp_path / "data") == [
        "ade",
        "ade/ADEChallengeData2016",
        "ade/ADEChallengeData2016/notes.txt",
    ]


@pytest.mark.parametrize(
    "kind, msg",
    [
        ("bad_value", "ADE_val_00000002.png has values [151] outside 0..150"),
        ("bad_size", "ADE_train_00000003.png is 32x16 but its image is 33x16"),
        ("orphan_image", "ADE_train_00000099.jpg has no label"),
    ],
)
def test_bad_ade_content_is_exit_2_and_leaves_nothing(tmp_path, capsys, kind, msg):
    z = tmp_path / "ADEChallengeData2016.zip"
    build_ade_zip(z, **{kind: True})
    root = tmp_path / "data"
    code, out, err = _run(
        capsys, ["prepare", "ade20k", "--src", str(z), "--data-root", str(root), "--workers", "1"]
    )
    assert code == 2
    assert msg in err
    assert len(err.strip().splitlines()) == 1 or msg in err.replace("\n", "")
    assert not root.exists()


def test_wrong_archive_is_named(tmp_path, capsys):
    coco = tmp_path / "cocostuff-10k-v1.1.zip"
    with zipfile.ZipFile(coco, "w") as z:
        z.writestr("imageLists/train.txt", "a\n")
        z.writestr("imageLists/test.txt", "b\n")
        z.writestr("images/a.jpg", _jpeg(4, 4, 0))
    code, _, err = _run(capsys, ["prepare", "ade20k", "--src", str(coco), "--data-root", str(tmp_path / "d")])
    assert code == 2
    assert "is not the ADE20K archive" in err and "COCO-Stuff-10K zip" in err
    assert not (tmp_path / "d").exists()


def test_missing_and_truncated_inputs(tmp_path, capsys):
    code, _, err = _run(
        capsys, ["prepare", "ade20k", "--src", str(tmp_path / "nope.zip"), "--data-root", str(tmp_path / "d")]
    )
    assert code == 2 and "file not found" in err
    z = tmp_path / "ADEChallengeData2016.zip"
    build_ade_zip(z)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(z.read_bytes()[: z.stat().st_size - 200])
    code, _, err = _run(capsys, ["prepare", "ade20k", "--src", str(cut), "--data-root", str(tmp_path / "d")])
    assert code == 2 and "truncated or corrupt" in err
    assert not (tmp_path / "d").exists()


def test_src_sha256_checked(tmp_path, capsys):
    z = tmp_path / "ADEChallengeData2016.zip"
    build_ade_zip(z)
    code, _, err = _run(
        capsys,
        ["prepare", "ade20k", "--src", str(z), "--sha256", "0" * 64, "--data-root", str(tmp_path / "d")],
    )
    assert code == 2 and "expected 0000" in err
    assert z.exists() and not (tmp_path / "d").exists()  # the user's file is never removed
    import hashlib

    good = hashlib.sha256(z.read_bytes()).hexdigest()
    res = prepare_dataset("ade20k", [z], tmp_path / "d", sha256=[good], workers=1)
    assert res["sources"][0]["sha256"] == good


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    z = tmp_path / "ADEChallengeData2016.zip"
    build_ade_zip(z)
    from dtop_cli.data import prepare_ade

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_ade, "scan_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("ade20k", [z], tmp_path / "data", workers=1)
    assert not (tmp_path / "data").exists()
    assert os.listdir(tmp_path) == ["ADEChallengeData2016.zip"]


def _mmseg_samples(preset: str, data_root: Path, split: str) -> list[dict]:
    """Every sample of a split as mmseg's own dataset class loads it with the preset's paths."""
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    from dtop_cli.presets import load_preset

    register_all_modules()
    d = load_preset(preset).data
    sp = getattr(d, f"{split}_split")
    cfg = dict(
        type=d.type,
        data_root=str(data_root / d.root),
        data_prefix=dict(img_path=sp.img, seg_map_path=sp.ann),
        reduce_zero_label=d.reduce_zero_label,
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")],
    )
    if sp.list:
        cfg["ann_file"] = sp.list
    ds = DATASETS.build(cfg)
    return [ds[i] for i in range(len(ds))]


def test_mmseg_ade20k_dataset_reads_prepared_folder(tmp_path):
    z = tmp_path / "ADEChallengeData2016.zip"
    labels = build_ade_zip(z)
    prepare_dataset("ade20k", [z], tmp_path / "data", workers=1)
    for split, n in (("train", 3), ("val", 2)):
        samples = _mmseg_samples("segvit-base-ade", tmp_path / "data", split)
        assert len(samples) == n
        for s in samples:
            gt = s["gt_seg_map"]
            exp = labels[Path(s["seg_map_path"]).stem].astype(np.int64) - 1  # reduce_zero_label
            exp[exp < 0] = 255
            np.testing.assert_array_equal(gt, exp)
            assert gt.shape == s["img"].shape[:2]
            assert set(np.unique(gt)) <= set(range(150)) | {255}
