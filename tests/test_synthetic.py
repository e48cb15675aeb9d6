"""The embedded demo dataset: layout, determinism, atomic/idempotent writing, fairness."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from dtop_cli.data import synthetic as S
from dtop_cli.errors import UserError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_matches_ade20k(tmp_path: Path) -> None:
    info = S.make_synthetic(tmp_path, seed=3, n_train=4, n_val=2, size=64)
    root = tmp_path / "synthetic"
    assert info["created"] is True and info["root"] == str(root)
    assert (info["train"], info["val"]) == (4, 2)
    for split, n in (("training", 4), ("validation", 2)):
        imgs = sorted((root / "images" / split).glob("*.jpg"))
        anns = sorted((root / "annotations" / split).glob("*.png"))
        assert len(imgs) == n and len(anns) == n
        assert [p.stem for p in imgs] == [p.stem for p in anns]
        for ip, ap in zip(imgs, anns, strict=True):
            img = cv2.imread(str(ip), cv2.IMREAD_UNCHANGED)
            ann = cv2.imread(str(ap), cv2.IMREAD_UNCHANGED)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            assert ann.shape == (64, 64) and ann.dtype == np.uint8
            assert set(np.unique(ann)) <= set(range(len(S.CLASSES) + 1))
            assert (ann > 0).mean() > 0.8  # seams are thin
    assert (root / "classes.txt").read_text().split() == list(S.CLASSES)
    # nothing left beside the dataset (no temporary folders)
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]


def test_deterministic_from_seed(tmp_path: Path) -> None:
    S.make_synthetic(tmp_path / "a", seed=7, n_train=3, n_val=1, size=64)
    S.make_synthetic(tmp_path / "b", seed=7, n_train=3, n_val=1, size=64)
    S.make_synthetic(tmp_path / "c", seed=8, n_train=3, n_val=1, size=64)
    a, b, c = (_files(tmp_path / x / "synthetic") for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert any(a[k] != c[k] for k in a if k.endswith(".png") and "annotations" in k)
    # one image can be regenerated alone, independent of how many came before it
    img1, ann1 = S.render_scene(S._image_rng(7, "training", 2), 64)
    img2, ann2 = S.render_scene(S._image_rng(7, "training", 2), 64)
    assert np.array_equal(img1, img2) and np.array_equal(ann1, ann2)
    stored = cv2.imread(str(tmp_path / "a/synthetic/annotations/training/syn_train_00000002.png"),
                        cv2.IMREAD_UNCHANGED)
    assert np.array_equal(stored, ann1)


def test_idempotent_and_safe(tmp_path: Path) -> None:
    S.make_synthetic(tmp_path, seed=0, n_train=2, n_val=1, size=64)
    manifest = tmp_path / "synthetic" / S.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    again = S.make_synthetic(tmp_path, seed=0, n_train=2, n_val=1, size=64)
    assert again["created"] is False and manifest.stat().st_mtime_ns == stamp

    with pytest.raises(UserError, match="other settings"):
        S.make_synthetic(tmp_path, seed=1, n_train=2, n_val=1, size=64)
    replaced = S.make_synthetic(tmp_path, seed=1, n_train=2, n_val=1, size=64, overwrite=True)
    assert replaced["created"] is True and json.loads(manifest.read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_never_touches_a_foreign_folder(tmp_path: Path) -> None:
    mine = tmp_path / "synthetic"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not made by"):
        S.make_synthetic(tmp_path, n_train=1, n_val=1, size=64, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = S._write_split

    def boom(root: Path, split: str, *a: object) -> None:
        real(root, split, *a)
        if split == "validation":
            raise KeyboardInterrupt

    monkeypatch.setattr(S, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        S.make_synthetic(tmp_path, n_train=2, n_val=1, size=64)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        S.make_synthetic(tmp_path, n_train=0)
    with pytest.raises(UserError):
        S.make_synthetic(tmp_path, size=100)


def test_twins_share_the_look_and_differ_by_marker() -> None:
    """The twin classes must be a context problem: same texture statistics, only a marker differs."""
    seen = np.zeros(len(S.CLASSES) + 1, int)
    marker_hits = {5: 0, 6: 0, 7: 0, 8: 0}
    twins_total = {5: 0, 6: 0, 7: 0, 8: 0}
    for i in range(40):
        img, ann = S.render_scene(S._image_rng(0, "training", i), 128)
        present = np.unique(ann)
        seen[present] += 1
        # each look at most once per image: twins of one look never share an image
        assert not ({5, 6} <= set(present)) and not ({7, 8} <= set(present))
        grey = img.astype(int)
        # markers are near-black or near-white, saturated-free blobs
        near_bw = (np.abs(grey - grey.mean(-1, keepdims=True)).max(-1) < 25) & (
            (grey.mean(-1) < 45) | (grey.mean(-1) > 215))
        for c in marker_hits:
            region = ann == c
            if region.sum() > 0:
                twins_total[c] += 1
                marker_hits[c] += int((near_bw & region).sum() >= 6)
    assert (seen[1:] > 0).all(), seen  # every class occurs
    for c in marker_hits:  # (random colours can also be near black/white; markers must be there)
        assert marker_hits[c] >= 0.9 * twins_total[c], (c, marker_hits, twins_total)


@pytest.mark.parametrize("shape", [S._RING, S._SQUARE])
def test_markers_are_sparse_and_tell_the_twins_apart(shape: int) -> None:
    """Most patches of a twin region see no marker; light rings vs dark squares."""
    size = 256
    mask = np.zeros((size, size), bool)
    mask[16:240, 16:240] = True  # 50176 px: the density rule asks for more than the cap
    img = np.full((size, size, 3), 128.0, np.float32)
    S._place_markers(np.random.default_rng(0), img, mask, shape)
    changed = np.abs(img - 128.0).max(-1) > 1
    assert not changed[~mask].any()  # markers stay inside their region
    n, lab = cv2.connectedComponents(changed.astype(np.uint8))
    assert n - 1 == S._MAX_MARKERS
    centres = np.array([np.argwhere(lab == i).mean(0) for i in range(1, n)])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + 1e9 * np.eye(n - 1)
    assert gaps.min() >= S._MARKER_GAP
    # share of the region's 16x16 patches that a marker touches: well under half
    touched = changed.reshape(16, 16, 16, 16).any(axis=(1, 3))
    inside = mask.reshape(16, 16, 16, 16).all(axis=(1, 3))
    assert touched.sum() / inside.sum() < 0.4
    light = (img.mean(-1) > 200) & changed
    dark = (img.mean(-1) < 60) & changed
    if shape == S._RING:
        for y, x in centres.round().astype(int):  # hollow: the middle keeps the region's colour
            assert abs(float(img[y, x].mean()) - 128.0) < 1
        assert light.sum() > 0.5 * dark.sum()
    else:
        assert dark.sum() > 3 * light.sum()
    small = np.zeros((size, size), bool)
    small[100:140, 100:140] = True  # 1600 px: one marker
    img2 = np.full((size, size, 3), 128.0, np.float32)
    S._place_markers(np.random.default_rng(0), img2, small, shape)
    assert cv2.connectedComponents((np.abs(img2 - 128.0).max(-1) > 1).astype(np.uint8))[0] - 1 == 1


def test_full_default_set_is_quick_enough_to_generate(tmp_path: Path) -> None:
    """Default settings: size and counts the tiny-synthetic preset expects (crop 256, 64 val)."""
    info = S.make_synthetic(tmp_path, n_train=8, n_val=2)
    img = cv2.imread(str(next((tmp_path / "synthetic/images/training").glob("*.jpg"))))
    assert img.shape == (256, 256, 3) and info["size"] == 256


def test_parallel_drawing_writes_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawing in two processes gives the very bytes of drawing in one (each image has its own stream)."""
    monkeypatch.setattr(S, "_workers", lambda n: 1)
    S.make_synthetic(tmp_path / "one", n_train=9, n_val=2, size=64)
    monkeypatch.setattr(S, "_workers", lambda n: 2)
    S.make_synthetic(tmp_path / "two", n_train=9, n_val=2, size=64)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert len(one) == 2 * (9 + 2) + 2 and one == two
