"""`dtop prepare` argument handling shared by all datasets (the converters have their own files)."""

from __future__ import annotations

import pytest

from dtop_cli.data import OFFICIAL_URLS, layout
from dtop_cli.data import synthetic as synthetic_module


def test_layouts_come_from_the_presets():
    assert layout("ade20k").root == "ade/ADEChallengeData2016"
    pc = layout("pascal-context")
    assert pc.root == "VOCdevkit/VOC2010" and pc.num_classes == 59
    assert pc.split("train").list == "ImageSets/SegmentationContext/train.txt"
    assert pc.split("val").ann == "SegmentationClassContext"
    cs = layout("coco-stuff10k")
    assert cs.root == "coco_stuff10k" and cs.seg_suffix == "_labelTrainIds.png" and cs.num_classes == 171
    assert cs.split("val").img == "images/test2014"
    assert len(OFFICIAL_URLS["pascal-context"]) == 2


def test_synthetic_dispatch_passes_root_seed_and_force(run_cli, tmp_path, monkeypatch):
    calls = []

    def fake(data_root, seed=0, overwrite=False, **kw):
        calls.append((data_root, seed, overwrite))
        return {"dataset": "synthetic", "root": str(data_root / "synthetic"), "train": 4, "val": 2}

    monkeypatch.setattr(synthetic_module, "make_synthetic", fake)
    r = run_cli(["prepare", "synthetic", "--data-root", str(tmp_path), "--seed", "3", "--force", "--json"])
    assert r.code == 0, r.err
    assert r.json()["train"] == 4
    assert calls == [(tmp_path, 3, True)]
    r = run_cli(["prepare", "synthetic", "--data-root", str(tmp_path)])
    assert r.code == 0 and "synthetic" in r.out


@pytest.mark.parametrize(
    "args, msg",
    [
        (["prepare", "imagenet", "--src", "x"], "unknown dataset 'imagenet'"),
        (["prepare", "ade20k", "--force"], "--force only replaces the generated synthetic set"),
        (["prepare", "ade20k", "--verify", "--src", "x.zip"], "--verify checks an existing dataset"),
        (["prepare", "ade20k", "--src", "a.zip", "--download"], "either --src"),
        # --url alone downloads from there (nothing listens on port 9: the offline answer)
        (["prepare", "ade20k", "--url", "http://127.0.0.1:9/x.zip"], "download of http://127.0.0.1:9/x.zip failed"),
        (["prepare", "ade20k", "--sha256", "12ab"], "is not a SHA-256 digest"),
        (["prepare", "synthetic", "--src", "a.zip"], "takes no --src"),
        (["prepare", "coco-stuff10k", "--no-download"],
         "cocostuff-10k-v1.1.zip from http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(run_cli, tmp_path, args, msg):
    r = run_cli(args + ["--data-root", str(tmp_path / "d")])
    assert r.code == 2
    assert msg in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_verify_missing_dataset_is_exit_2(run_cli, tmp_path):
    r = run_cli(["prepare", "pascal-context", "--verify", "--data-root", str(tmp_path)])
    assert r.code == 2 and "does not exist" in r.err


def test_help_lists_the_options(run_cli):
    r = run_cli(["prepare", "--help"])
    assert r.code == 0
    for opt in ("--src", "--data-root", "--download", "--sha256", "--verify", "--workers", "--json"):
        assert opt in r.out
