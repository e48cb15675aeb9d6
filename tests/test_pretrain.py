"""The demo's backbone pretraining: it learns, saves atomically, and loads like a real ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtop_cli.commands.pretrain import pretrain_backbone
from dtop_cli.data.synthetic import make_synthetic
from dtop_cli.errors import UserError
from dtop_cli.model.build import build_model
from dtop_cli.presets import load_preset
from dtop_cli.safeload import load_checkpoint


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrain-data")
    make_synthetic(root, seed=0, n_train=6, n_val=1, size=64)
    return root


def test_pretrain_learns_and_loads_as_backbone(data_root: Path, tmp_path: Path) -> None:
    preset = load_preset("tiny-synthetic")
    out = tmp_path / "pre" / "backbone.pth"
    res = pretrain_backbone(preset, data_root, out, iters=60, lr=2e-3, batch_size=4, seed=0)
    assert res["path"] == str(out) and res["iters"] == 60
    # six small training images: a backbone that learns fits them well beyond chance (1/8)
    assert res["train_pixel_acc"] > 0.4, res
    assert [p.name for p in out.parent.iterdir()] == ["backbone.pth"]  # no temp file left
    saved = load_checkpoint(out)["state_dict"]
    assert "pos_embed" in saved and not any(k.startswith("backbone.") for k in saved)
    model = build_model(preset, pretrained=str(out))
    model.backbone.init_weights()
    for k in ("patch_embed.projection.weight", "layers.5.ffn.layers.1.weight", "pos_embed"):
        assert torch.equal(model.backbone.state_dict()[k], saved[k]), k


def test_pretrain_rejects_no_iterations(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="at least one iteration"):
        pretrain_backbone(load_preset("tiny-synthetic"), data_root, tmp_path / "b.pth", iters=0)
    assert not (tmp_path / "b.pth").exists()
