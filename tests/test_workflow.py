"""The users' four lines, run as typed in a fresh directory, each finding what the last one made.

    dtop prepare synthetic
    dtop train --preset tiny-synthetic.yaml
    dtop prune --from CKPT          (the exact command `dtop train` printed)
    dtop eval --flops               (the exact command `dtop prune` printed)

The dataset is the demo's (no archive to fetch); the preset is a copy of tiny-synthetic in
the user's own file, with schedules of a few iterations and its pretrained backbone at a
URL served from 127.0.0.1 (downloaded once into the cache, as the paper presets' are). The
preset file is deleted after training: everything later reads the preset the checkpoint
recorded.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dtop_cli.safeload import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


def dtop(line: str, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run one command line as a user types it (``dtop ...``)."""
    args = shlex.split(line)
    assert args[0] == "dtop"
    return subprocess.run([sys.executable, "-m", "dtop_cli.cli", *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def next_step(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.findall(r"^next: (dtop .*?)$", r.stderr, re.MULTILINE)
    assert found, r.stderr[-2000:]
    return found[-1].split(" (")[0].strip()


def _backbone_bytes(preset: dict) -> bytes:
    """An mmseg-format ViT state dict for the preset's backbone (what a download serves)."""
    from dtop_cli.model.vit import DToPViT

    m = preset["model"]
    vit = DToPViT(img_size=tuple(preset["data"]["crop"]), patch_size=m["patch_size"], embed_dims=m["embed_dims"],
                  num_layers=m["num_layers"], num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"],
                  stage_ends=m["stage_ends"])
    buf = io.BytesIO()
    torch.save({"state_dict": vit.state_dict()}, buf)
    return buf.getvalue()


@pytest.mark.slow
def test_the_four_lines_as_typed(server, tmp_path: Path) -> None:
    home = tmp_path / "project"
    home.mkdir()
    env = dict(os.environ, COLUMNS="200", DTOP_CACHE=str(tmp_path / "cache"))
    spec = yaml.safe_load((REPO / "presets" / "tiny-synthetic.yaml").read_text())
    spec["schedule"].update(base={"iters": 3, "poly_iters": 3}, prune={"iters": 2, "poly_iters": 2},
                            checkpoint_interval=2, val_interval=2)
    spec["data"]["val_images"] = 4
    server.files["tiny_vit.pth"] = _backbone_bytes(spec)
    spec["model"]["pretrained"] = server.url + "tiny_vit.pth"
    (home / "tiny-synthetic.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    # 1. the dataset, and the command that trains on it
    r = dtop("dtop prepare synthetic", home, env)
    assert next_step(r) == "dtop train --preset tiny-synthetic"
    assert (home / "data" / "synthetic").is_dir()

    # 2. base training from the downloaded backbone; the user's preset file, by path
    r = dtop("dtop train --preset tiny-synthetic.yaml", home, env)
    prune_line = next_step(r)
    assert "downloading tiny_vit.pth" in r.stderr
    assert (tmp_path / "cache" / "pretrained" / "tiny_vit.pth").is_file()
    ckpt = Path(shlex.split(prune_line)[-1])
    assert prune_line == f"dtop prune --from {ckpt}" and ckpt.is_file()
    assert ckpt.parent == home / "work_dirs" / "tiny-synthetic" / "base"
    recorded = load_checkpoint(ckpt)["meta"]["dtop"]
    from dtop_cli.presets import load_preset, preset_from_text

    assert preset_from_text(recorded["preset_yaml"], "ckpt").to_dict() == \
        load_preset(str(home / "tiny-synthetic.yaml")).to_dict()

    # evaluated with the file and without it (deleted): the same numbers
    with_file = json.loads(dtop(f"dtop eval --ckpt {ckpt} --preset tiny-synthetic.yaml --json", home, env).stdout)
    (home / "tiny-synthetic.yaml").unlink()
    r = dtop(f"dtop eval --ckpt {ckpt} --json", home, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == with_file

    # 3. prune, exactly as printed: the preset comes from the checkpoint
    r = dtop(prune_line, home, env)
    eval_line = next_step(r)
    assert eval_line == "dtop eval --flops"
    pruned = home / "work_dirs" / "tiny-synthetic" / "prune"
    assert (pruned / "last_checkpoint").is_file()

    # 4. eval, exactly as printed: the newest checkpoint, the prune run's
    r = dtop(eval_line, home, env)
    assert r.returncode == 0, r.stderr[-2000:]
    last = Path((pruned / "last_checkpoint").read_text().strip())
    assert f"evaluating {last}" in r.stderr
    assert "mIoU" in r.stdout and "GFLOPs" in r.stdout


def test_eval_without_any_checkpoint_names_the_command_that_makes_one(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_cli(["eval", "--flops"])
    assert r.code == 2 and r.err.count("\n") == 1
    assert "dtop train --preset" in r.err


def test_public_checkpoint_needs_a_preset_and_a_wrong_preset_is_named(run_cli, tmp_path):
    from dtop_cli.model.build import build_model
    from dtop_cli.presets import load_preset

    model = build_model(load_preset("tiny-synthetic"))
    public = tmp_path / "public.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, public)
    r = run_cli(["eval", "--ckpt", str(public), "--flops"])
    assert r.code == 2 and r.err.count("\n") == 1 and "pass --preset" in r.err

    ours = tmp_path / "ours.pth"
    p = load_preset("tiny-synthetic", ["model.num_layers=8", "model.stage_ends=[1,3,7]"])
    torch.save({"state_dict": build_model(p).state_dict(),
                "meta": {"dtop": {"preset": p.name, "preset_yaml": p.to_yaml(), "threshold": 1.0}}}, ours)
    r = run_cli(["flops", "--ckpt", str(ours), "--preset", "tiny-synthetic"])
    assert r.code == 2 and r.err.count("\n") == 1
    assert "model.num_layers is 8 in the checkpoint, 6 in the preset" in r.err.replace("\n", "")


# ---------------------------------------------------------------- `dtop prepare DATASET`, no flags


def _closed_port_url(name: str) -> str:
    """A URL on 127.0.0.1 where nothing listens: what an offline machine sees."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/{name}"


def test_prepare_ade20k_uses_the_zip_in_the_current_directory(run_cli, tmp_path, monkeypatch):
    from test_prepare_ade import build_ade_zip

    from dtop_cli.data import prepare as P

    monkeypatch.chdir(tmp_path)
    build_ade_zip(tmp_path / "ADEChallengeData2016.zip")
    # the network must not be asked
    monkeypatch.setattr(P.A, "download", lambda *a, **k: pytest.fail("downloaded although the zip was here"))
    r = run_cli(["prepare", "ade20k"])
    assert r.code == 0, r.err
    assert "found on disk" in r.err
    assert (tmp_path / "data" / "ade" / "ADEChallengeData2016" / "images" / "validation").is_dir()
    assert "next: dtop train --preset segvit-large-ade" in r.err
    assert (tmp_path / "ADEChallengeData2016.zip").is_file()  # the user's file is left alone


def test_prepare_ade20k_offline_names_file_url_and_folder(run_cli, tmp_path, monkeypatch):
    from dtop_cli.data import prepare as P

    monkeypatch.chdir(tmp_path)
    url = _closed_port_url("ADEChallengeData2016.zip")
    monkeypatch.setitem(P.OFFICIAL_URLS, "ade20k", (url,))
    r = run_cli(["prepare", "ade20k"])
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert url in r.err and "ADEChallengeData2016.zip" in r.err
    assert "put it in data/downloads/" in r.err
    assert not (tmp_path / "data").exists()  # nothing made, not even an empty downloads folder

    # --no-download never asks the network and says the same
    monkeypatch.setattr(P.A, "download", lambda *a, **k: pytest.fail("--no-download downloaded"))
    r = run_cli(["prepare", "ade20k", "--no-download"])
    assert r.code == 2 and r.err.count("\n") == 1 and url in r.err


def test_prepare_ade20k_downloads_when_nothing_is_on_disk(run_cli, server, tmp_path, monkeypatch):
    from test_prepare_ade import build_ade_zip

    from dtop_cli.data import prepare as P

    monkeypatch.chdir(tmp_path)
    z = tmp_path / "elsewhere.zip"
    build_ade_zip(z)
    server.files["ADEChallengeData2016.zip"] = z.read_bytes()
    z.unlink()
    monkeypatch.setitem(P.OFFICIAL_URLS, "ade20k", (server.url + "ADEChallengeData2016.zip",))
    r = run_cli(["prepare", "ade20k", "--json"])
    assert r.code == 0, r.err
    res = json.loads(r.out)
    import hashlib

    got = tmp_path / "data" / "downloads" / "ADEChallengeData2016.zip"
    assert got.is_file()
    assert res["sources"][0]["sha256"] == hashlib.sha256(got.read_bytes()).hexdigest()
    assert res["splits"]["val"]["pairs"] == 2
    # a second run finds the downloaded file and does not fetch again
    monkeypatch.setattr(P.A, "download", lambda *a, **k: pytest.fail("fetched twice"))
    assert run_cli(["prepare", "ade20k"]).code == 0
