"""`dtop prepare coco-stuff10k` on a tiny cocostuff-10k-v1.1.zip with MATLAB v5 label files."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dtop_cli.cli import main
from dtop_cli.data import prepare_dataset, verify_dataset
from dtop_cli.errors import UserError

# From the dataset documentation, typed independently of the code under test.
UNUSED = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
TO171 = {0: 0, **{cid: i + 1 for i, cid in enumerate(c for c in range(1, 183) if c not in UNUSED)}}

TRAIN = [
    ("COCO_train2014_000000000077", 20, 24),
    ("COCO_train2014_000000000078", 13, 31),
    ("COCO_train2014_000000000109", 30, 18),
]
TEST = [("COCO_train2014_000000000113", 16, 16), ("COCO_train2014_000000000212", 22, 9)]


def _jpeg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        buf, format="JPEG"
    )
    return buf.getvalue()


def _mat(s: np.ndarray, key: str = "S") -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {key: s, "names": np.array(["x"], dtype=object)}, format="5")
    return buf.getvalue()


def build_coco_zip(
    path: Path,
    *,
    value: int | None = None,
    drop_mat: bool = False,
    wrong_key: bool = False,
    bad_size: bool = False,
) -> dict[str, np.ndarray]:
    """cocostuff-10k-v1.1.zip layout; returns the expected 171-class map of every name."""
    rng = np.random.default_rng(3)
    used = np.array(sorted(set(range(0, 183)) - UNUSED))
    expected = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("imageLists/train.txt", "".join(n + "\n" for n, _, _ in TRAIN))
        z.writestr("imageLists/test.txt", "".join(n + "\n" for n, _, _ in TEST))
        z.writestr("imageLists/all.txt", "".join(n + "\n" for n, _, _ in TRAIN + TEST))
        for i, (name, h, w) in enumerate(TRAIN + TEST):
            s = rng.choice(used, (h, w)).astype(np.uint16)
            s[0, 0], s[0, 1], s[1, 0] = 0, 182, 1
            if value is not None and i == 3:
                s[2, 2] = value
            expected[name] = np.vectorize(lambda v: TO171.get(int(v), 0))(s).astype(np.uint8)
            z.writestr(f"images/{name}.jpg", _jpeg(h + (1 if bad_size and i == 1 else 0), w))
            if not (drop_mat and i == 4):
                z.writestr(f"annotations/{name}.mat", _mat(s, "T" if wrong_key and i == 2 else "S"))
    return expected


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_prepare_coco_stuff_every_pixel(tmp_path, capsys):
    z = tmp_path / "cocostuff-10k-v1.1.zip"
    expected = build_coco_zip(z)
    root = tmp_path / "data"
    code, out, err = _run(
        capsys,
        ["prepare", "coco-stuff10k", "--src", str(z), "--data-root", str(root), "--json", "--workers", "2"],
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["splits"]["train"]["pairs"] == 3 and res["splits"]["val"]["pairs"] == 2
    assert res["splits"]["train"]["official"] == 9000 and res["splits"]["val"]["official"] == 1000
    assert res["warnings"] == []
    ds = root / "coco_stuff10k"
    for names, split in ((TRAIN, "train2014"), (TEST, "test2014")):
        for name, h, w in names:
            got = np.asarray(Image.open(ds / "annotations" / split / f"{name}_labelTrainIds.png"))
            np.testing.assert_array_equal(got, expected[name], err_msg=name)
            assert Image.open(ds / "images" / split / f"{name}.jpg").size == (w, h)
    assert got.max() <= 171 and 171 in np.unique(np.concatenate([v.ravel() for v in expected.values()]))
    assert sorted(p.name for p in ds.iterdir()) == [
        ".dtop-prepared.json",
        "annotations",
        "imageLists",
        "images",
    ]
    assert sorted(p.name for p in (ds / "annotations").iterdir()) == ["test2014", "train2014"]
    assert sorted(p.name for p in root.iterdir()) == ["coco_stuff10k"]
    rep = verify_dataset("coco-stuff10k", root, workers=1, allow_partial=True)
    assert rep["ok"], rep["problems"]
    assert prepare_dataset("coco-stuff10k", [z], root, workers=1)["status"] == "already prepared"


def test_unused_id_becomes_unlabeled_with_warning(tmp_path):
    z = tmp_path / "cocostuff-10k-v1.1.zip"
    expected = build_coco_zip(z, value=12)
    res = prepare_dataset("coco-stuff10k", [z], tmp_path / "data", workers=1)
    assert len(res["warnings"]) == 1 and res["warnings"][0].startswith("1 pixels carried one of the unused")
    name = TEST[0][0]
    got = np.asarray(
        Image.open(tmp_path / f"data/coco_stuff10k/annotations/test2014/{name}_labelTrainIds.png")
    )
    assert got[2, 2] == 0
    np.testing.assert_array_equal(got, expected[name])


def test_from_extracted_folder_leaves_it_alone(tmp_path):
    z = tmp_path / "cocostuff-10k-v1.1.zip"
    expected = build_coco_zip(z)
    src = tmp_path / "cocostuff-10k-v1.1"
    with zipfile.ZipFile(z) as zf:
        zf.extractall(src)
    before = sorted((str(p), p.stat().st_size) for p in src.rglob("*"))
    res = prepare_dataset("coco-stuff10k", [src], tmp_path / "data", workers=1)
    assert res["splits"]["val"]["pairs"] == 2
    assert sorted((str(p), p.stat().st_size) for p in src.rglob("*")) == before
    name = TRAIN[1][0]
    got = np.asarray(
        Image.open(tmp_path / f"data/coco_stuff10k/annotations/train2014/{name}_labelTrainIds.png")
    )
    np.testing.assert_array_equal(got, expected[name])

    # Extracted where the presets look: new split folders are added beside the user's files.
    root2 = tmp_path / "data2"
    with zipfile.ZipFile(z) as zf:
        zf.extractall(root2 / "coco_stuff10k")
    res = prepare_dataset("coco-stuff10k", [root2 / "coco_stuff10k"], root2, workers=1)
    assert res["splits"]["train"]["pairs"] == 3
    assert (root2 / "coco_stuff10k" / "annotations" / f"{name}.mat").is_file()
    assert (root2 / "coco_stuff10k" / "annotations" / "train2014" / f"{name}_labelTrainIds.png").is_file()
    assert verify_dataset("coco-stuff10k", root2, workers=1, allow_partial=True)["ok"]


@pytest.mark.parametrize(
    "kw, msg",
    [
        (
            {"value": 183},
            "annotations/COCO_train2014_000000000113.mat has label values [183] outside the COCO ids 0..182",
        ),
        (
            {"drop_mat": True},
            "lists COCO_train2014_000000000212 in imageLists but has no "
            "annotations/COCO_train2014_000000000212.mat",
        ),
        ({"wrong_key": True}, "annotations/COCO_train2014_000000000109.mat has no field S"),
        (
            {"bad_size": True},
            "COCO_train2014_000000000078.mat is 13x31 but images/COCO_train2014_000000000078.jpg is 14x31",
        ),
    ],
)
def test_bad_coco_input_is_exit_2_and_leaves_nothing(tmp_path, capsys, kw, msg):
    z = tmp_path / "cocostuff-10k-v1.1.zip"
    build_coco_zip(z, **kw)
    root = tmp_path / "data"
    code, _, err = _run(
        capsys, ["prepare", "coco-stuff10k", "--src", str(z), "--data-root", str(root), "--workers", "1"]
    )
    assert code == 2, err
    assert msg in err.replace("\n", "")
    assert not root.exists()


def test_wrong_archive_and_corrupt_mat(tmp_path):
    ade = tmp_path / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(ade, "w") as z:
        z.writestr("ADEChallengeData2016/images/training/ADE_train_00000001.jpg", _jpeg(4, 4))
    with pytest.raises(UserError, match="is not the COCO-Stuff-10K zip .* looks like the ADE20K zip"):
        prepare_dataset("coco-stuff10k", [ade], tmp_path / "data", workers=1)
    z = tmp_path / "cocostuff-10k-v1.1.zip"
    build_coco_zip(z)
    src = tmp_path / "x"
    with zipfile.ZipFile(z) as zf:
        zf.extractall(src)
    (src / "annotations" / f"{TRAIN[0][0]}.mat").write_bytes(b"MATLAB 5.0 garbage" * 3)
    with pytest.raises(UserError, match=f"annotations/{TRAIN[0][0]}.mat is not a readable MATLAB file"):
        prepare_dataset("coco-stuff10k", [src], tmp_path / "data", workers=1)
    assert not (tmp_path / "data").exists()


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


def test_mmseg_cocostuff_dataset_reads_prepared_folder(tmp_path):
    z = tmp_path / "cocostuff-10k-v1.1.zip"
    expected = build_coco_zip(z)
    prepare_dataset("coco-stuff10k", [z], tmp_path / "data", workers=1)
    for split, n in (("train", 3), ("val", 2)):
        samples = _mmseg_samples("segvit-large-cocostuff", tmp_path / "data", split)
        assert len(samples) == n
        for s in samples:
            gt = s["gt_seg_map"]
            stem = Path(s["seg_map_path"]).name[: -len("_labelTrainIds.png")]
            exp = expected[stem].astype(np.int64) - 1  # reduce_zero_label
            exp[exp < 0] = 255
            np.testing.assert_array_equal(gt, exp)
            assert gt.shape == s["img"].shape[:2]
            assert set(np.unique(gt)) <= set(range(171)) | {255}
