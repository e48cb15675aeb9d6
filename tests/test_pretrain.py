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


# --------------------------------------------------------------------------- the shipped demo backbone


def test_shipped_demo_backbone_is_the_one_the_preset_describes() -> None:
    """presets/weights/tiny-synthetic-vit.pth: made by the script from the preset's own
    settings and today's generator, and it loads into the preset's backbone without gaps."""
    from dtop_cli.data.synthetic import GENERATOR_VERSION
    from dtop_cli.runtime.weights import resolve_pretrained

    preset = load_preset("tiny-synthetic")
    path = resolve_pretrained(preset, None)
    assert path is not None and path.parent.name == "weights" and path.parent.parent.name in ("presets", "preset_files")
    ckpt = load_checkpoint(path)
    info = ckpt["meta"]["dtop"]
    assert info["made_by"] == "scripts/make_demo_weights.py"
    # stale file: the generator or the pretraining settings changed since it was made
    assert info["generator_version"] == GENERATOR_VERSION, "rebuild it: scripts/make_demo_weights.py"
    assert (info["iters"], info["lr"], info["seed"], info["data_seed"]) == (
        preset.pretrain.iters, preset.pretrain.lr, 0, 0), "rebuild it: scripts/make_demo_weights.py"
    assert info["train_images"] == 2000 and info["train_pixel_acc"] > 0.8
    model = build_model(preset, pretrained=str(path))
    model.backbone.init_weights()  # raises on missing keys
    assert torch.equal(model.backbone.state_dict()["layers.5.ffn.layers.1.weight"],
                       ckpt["state_dict"]["layers.5.ffn.layers.1.weight"])


def test_make_demo_weights_script_records_how_it_was_made(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "w" / "vit.pth"
    r = subprocess.run([sys.executable, str(repo / "scripts" / "make_demo_weights.py"), "--out", str(out),
                        "--iters", "2", "--train-images", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = load_checkpoint(out)["meta"]["dtop"]
    assert info["iters"] == 2 and info["train_images"] == 4 and info["made_by"] == "scripts/make_demo_weights.py"
    assert [p.name for p in out.parent.iterdir()] == ["vit.pth"]


def test_preset_weights_path_is_found_beside_the_preset_or_named_when_missing(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from dtop_cli.presets import PRESET_DIR
    from dtop_cli.runtime.weights import resolve_pretrained

    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load((PRESET_DIR / "tiny-synthetic.yaml").read_text())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "w.pth").write_bytes(b"x")
    spec["model"]["pretrained"] = "w.pth"
    (tmp_path / "mine" / "p.yaml").write_text(yaml.safe_dump(spec))
    assert resolve_pretrained(load_preset(str(tmp_path / "mine" / "p.yaml")), None) == tmp_path / "mine" / "w.pth"
    spec["model"]["pretrained"] = "nowhere.pth"
    (tmp_path / "mine" / "p.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="nowhere.pth, which do not exist"):
        resolve_pretrained(load_preset(str(tmp_path / "mine" / "p.yaml")), None)
