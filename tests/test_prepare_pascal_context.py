"""`dtop prepare pascal-context` on a tiny VOC2010 tar and a trainval_merged.json with real RLE."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from dtop_cli.cli import main
from dtop_cli.data import prepare_dataset, verify_dataset
from dtop_cli.data.prepare_pascal_context import rle_counts
from dtop_cli.errors import UserError

# Typed from the dataset documentation, independently of the code under test.
CONTEXT60 = [
    int(x)
    for x in """0 2 9 18 19 22 23 25 31 33 34 44 45 46 59 65 68 72 80 85 98 104 105 113 115 144 158 159
162 187 189 207 220 232 258 259 260 284 295 296 308 324 326 347 349 354 355 360 366 368
397 415 416 420 424 427 440 445 454 458""".split()
]
TO59 = {cid: i for i, cid in enumerate(CONTEXT60)}
# Category ids used in the fixtures: some of the 59, some that fold into background.
POOL = [2, 9, 458, 259, 104, 1, 3, 100, 459, 457, 31]

IMAGES = [  # (file stem, phase, h, w, number of annotations)
    ("2008_000002", "train", 20, 28, 4),
    ("2008_000003", "val", 18, 16, 3),
    ("2008_000007", "train", 25, 19, 6),
    ("2009_000001", "val", 14, 30, 0),
    ("2010_000005", "train", 16, 16, 2),
]


def _jpeg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        buf, format="JPEG"
    )
    return buf.getvalue()


def _rle(mask: np.ndarray) -> dict:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in enc["size"]], "counts": enc["counts"].decode("ascii")}


def build_pascal(
    tmp: Path, *, drop_jpeg: str | None = None
) -> tuple[Path, Path, dict, dict[str, np.ndarray]]:
    """VOCtrainval tar + trainval_merged.json; returns (tar, json, json data, expected 59-class maps)."""
    rng = np.random.default_rng(7)
    images, annos, expected = [], [], {}
    aid = 1
    for stem, phase, h, w, n in IMAGES:
        iid = int(stem.replace("_", ""))
        images.append(
            {
                "image_id": iid,
                "file_name": f"{stem}.jpg",
                "phase": phase,
                "height": h,
                "width": w,
                "date_captured": "x",
            }
        )
        paint = np.zeros((h, w), np.int64)
        for _ in range(n):
            m = np.zeros((h, w), bool)
            y0, x0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
            m[y0 : y0 + rng.integers(3, h), x0 : x0 + rng.integers(3, w)] = True
            m ^= rng.random((h, w)) < 0.1  # ragged edges: many runs
            cat = int(rng.choice(POOL))
            annos.append(
                {
                    "id": aid,
                    "image_id": iid,
                    "category_id": cat,
                    "segmentation": _rle(m),
                    "area": int(m.sum()),
                    "bbox": [0, 0, 1, 1],
                }
            )
            aid += 1
            paint[m] = cat
        expected[stem] = np.vectorize(lambda v: TO59.get(int(v), 0))(paint).astype(np.uint8)
    # An image of another phase is ignored.
    images.append(
        {"image_id": 2011000001, "file_name": "2011_000001.jpg", "phase": "test", "height": 4, "width": 4}
    )
    data = {
        "info": {},
        "images": images,
        "annos_segmentation": annos,
        "categories": [{"category_id": i, "name": f"c{i}", "supercategory": "s"} for i in range(1, 460)],
        "parts": [],
        "actions": [],
    }
    js = tmp / "trainval_merged.json"
    js.write_text(json.dumps(data))
    tar = tmp / "VOCtrainval_03-May-2010.tar"
    with tarfile.open(tar, "w") as t:

        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))

        for stem, _, h, w, _ in IMAGES:
            if stem != drop_jpeg:
                add(f"VOCdevkit/VOC2010/JPEGImages/{stem}.jpg", _jpeg(h, w))
            add(f"VOCdevkit/VOC2010/Annotations/{stem}.xml", b"<annotation/>")
        add("VOCdevkit/VOC2010/ImageSets/Main/train.txt", b"2008_000002\n")
    return tar, js, data, expected


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_rle_counts_matches_pycocotools():
    m = np.random.default_rng(0).random((37, 23)) < 0.4
    enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    counts = rle_counts(enc["counts"].decode())
    assert sum(counts) == m.size
    flat = m.flatten(order="F")
    runs, cur, n = [], False, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    assert counts == runs
    with pytest.raises(ValueError):
        rle_counts(enc["counts"].decode()[:-1] + "z")


def test_prepare_pascal_context_every_pixel(tmp_path, capsys):
    tar, js, _, expected = build_pascal(tmp_path)
    root = tmp_path / "data"
    code, out, err = _run(
        capsys,
        [
            "prepare",
            "pascal-context",
            "--src",
            str(tar),
            "--src",
            str(js),
            "--data-root",
            str(root),
            "--json",
            "--workers",
            "2",
        ],
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["splits"]["train"]["pairs"] == 3 and res["splits"]["val"]["pairs"] == 2
    assert res["splits"]["train"]["official"] == 4996 and res["splits"]["val"]["official"] == 5104
    voc = root / "VOCdevkit" / "VOC2010"
    for stem, exp in expected.items():
        got = np.asarray(Image.open(voc / "SegmentationClassContext" / f"{stem}.png"))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, exp, err_msg=stem)
    assert (
        voc / "ImageSets/SegmentationContext/train.txt"
    ).read_text() == "2008_000002\n2008_000007\n2010_000005\n"
    assert (voc / "ImageSets/SegmentationContext/val.txt").read_text() == "2008_000003\n2009_000001\n"
    assert (voc / "ImageSets/Main/train.txt").is_file() and (voc / "Annotations/2008_000002.xml").is_file()
    assert not np.any(np.asarray(Image.open(voc / "SegmentationClassContext/2009_000001.png")))
    all_seen = set().union(*(set(np.unique(v)) for v in expected.values())) - {0}
    assert res["classes_seen"] == len(all_seen)
    assert sorted(p.name for p in (root / "VOCdevkit").iterdir()) == ["VOC2010"]
    rep = verify_dataset("pascal-context", root, workers=1, allow_partial=True)
    assert rep["ok"], rep["problems"]
    again = prepare_dataset("pascal-context", [tar, js], root, workers=1)
    assert again["status"] == "already prepared"


def test_in_place_on_extracted_voc(tmp_path):
    tar, js, _, expected = build_pascal(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(tar) as t:
        t.extractall(root, filter="data")
    before = sorted(str(p) for p in (root / "VOCdevkit").rglob("*"))
    res = prepare_dataset("pascal-context", [root / "VOCdevkit", js], root, workers=1)
    assert res["splits"]["val"]["pairs"] == 2
    after = sorted(str(p) for p in (root / "VOCdevkit").rglob("*"))
    assert set(before) <= set(after)  # only additions
    got = np.asarray(Image.open(root / "VOCdevkit/VOC2010/SegmentationClassContext/2008_000007.png"))
    np.testing.assert_array_equal(got, expected["2008_000007"])


def _mutate_json(js: Path, fn) -> None:
    data = json.loads(js.read_text())
    fn(data)
    js.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda d: d.pop("annos_segmentation"), "lacks the key(s) annos_segmentation"),
        (
            lambda d: d["annos_segmentation"][2].update(category_id=999),
            "annotation 3 of 2008_000002.jpg has category_id 999",
        ),
        (
            lambda d: d["annos_segmentation"][0]["segmentation"].update(size=[5, 5]),
            "annotation 1 of 2008_000002.jpg in trainval_merged.json: mask size [5, 5]",
        ),
        (
            lambda d: d["annos_segmentation"][5]["segmentation"].update(
                counts=d["annos_segmentation"][5]["segmentation"]["counts"][:-3]
            ),
            "run lengths do not add up",
        ),
        (lambda d: d["images"][0].pop("phase"), "images entry 0 lacks one of the keys"),
        (lambda d: d["images"][1].update(file_name="../../etc/x.jpg"), "refusing image name"),
    ],
)
def test_bad_json_is_exit_2_and_leaves_nothing(tmp_path, capsys, mutate, msg):
    tar, js, _, _ = build_pascal(tmp_path)
    _mutate_json(js, mutate)
    root = tmp_path / "data"
    code, _, err = _run(
        capsys,
        [
            "prepare",
            "pascal-context",
            "--src",
            str(tar),
            "--src",
            str(js),
            "--data-root",
            str(root),
            "--workers",
            "1",
        ],
    )
    assert code == 2, err
    assert msg in err.replace("\n", "")
    assert not root.exists()


def test_truncated_json_and_missing_image(tmp_path):
    tar, js, _, _ = build_pascal(tmp_path, drop_jpeg="2008_000003")
    with pytest.raises(
        UserError, match="lists 2008_000003.jpg but the VOC input .* has no JPEGImages/2008_000003.jpg"
    ):
        prepare_dataset("pascal-context", [tar, js], tmp_path / "data", workers=1)
    js.write_text(js.read_text()[:500])
    with pytest.raises(UserError, match="not valid JSON"):
        prepare_dataset("pascal-context", [tar, js], tmp_path / "data", workers=1)
    with pytest.raises(UserError, match="takes two --src"):
        prepare_dataset("pascal-context", [tar], tmp_path / "data", workers=1)
    assert not (tmp_path / "data").exists()


def test_image_size_differs_from_json(tmp_path):
    tar, js, _, _ = build_pascal(tmp_path)
    _mutate_json(js, lambda d: d["images"][2].update(height=26))
    with pytest.raises(UserError, match="2008_000007.jpg is 25x19 but trainval_merged.json says 26x19"):
        prepare_dataset("pascal-context", [tar, js], tmp_path / "data", workers=1)
    assert not (tmp_path / "data").exists()


def test_wrong_archive_for_voc(tmp_path):
    _, js, _, _ = build_pascal(tmp_path)
    ade = tmp_path / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(ade, "w") as z:
        z.writestr("ADEChallengeData2016/images/training/ADE_train_00000001.jpg", _jpeg(4, 4))
    with pytest.raises(UserError, match="is not the VOC2010 tar .* looks like the ADE20K zip"):
        prepare_dataset("pascal-context", [ade, js], tmp_path / "data", workers=1)
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


def test_mmseg_pascal_context59_dataset_reads_prepared_folder(tmp_path):
    tar, js, _, expected = build_pascal(tmp_path)
    prepare_dataset("pascal-context", [tar, js], tmp_path / "data", workers=1)
    for split, n in (("train", 3), ("val", 2)):
        samples = _mmseg_samples("segvit-large-pc", tmp_path / "data", split)
        assert len(samples) == n
        for s in samples:
            gt = s["gt_seg_map"]
            exp = expected[Path(s["seg_map_path"]).stem].astype(np.int64) - 1  # reduce_zero_label
            exp[exp < 0] = 255
            np.testing.assert_array_equal(gt, exp)
            assert gt.shape == s["img"].shape[:2]
            assert set(np.unique(gt)) <= set(range(59)) | {255}
