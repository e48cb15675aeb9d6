"""The CLI contract of this issue: `dtop presets`, `dtop env`, exit codes, README/CI agreement."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from dtop_cli import presets as P
from dtop_cli.errors import UserError

PAPER_KEYS = {"base_miou", "base_gflops", "pruned_miou", "pruned_gflops"}


@pytest.fixture
def temp_command():
    """Register throw-away commands on the app for one test, then remove them."""
    from dtop_cli.cli import app

    before = list(app.registered_commands)

    def add(name: str, fn) -> str:
        app.command(name, hidden=True)(fn)
        return name

    yield add
    app.registered_commands[:] = before


# --------------------------------------------------------------------------- presets


def test_presets_json_shape(run_cli):
    r = run_cli(["presets", "--json"])
    assert r.code == 0, r.err
    obj = r.json()
    items = obj["presets"]
    assert [i["name"] for i in items] == P.available()
    assert len(items) == 8
    for item in items:
        assert {"name", "backbone", "dataset", "crop", "thresh", "paper"} <= set(item)
        p = P.load_preset(item["name"])
        assert item["backbone"] == p.model.backbone
        assert item["dataset"] == p.data.dataset
        assert item["crop"] == list(p.data.crop) and len(item["crop"]) == 2
        assert item["thresh"] == p.exit.threshold
        if p.paper is None:
            assert item["paper"] is None
        else:
            assert set(item["paper"]) == PAPER_KEYS
            assert all(isinstance(v, float) for v in item["paper"].values())
            assert item["paper"]["base_miou"] == p.paper.base_miou
            assert item["paper"]["pruned_gflops"] == p.paper.pruned_gflops


def test_presets_table_lists_every_preset_with_its_numbers(run_cli):
    r = run_cli(["presets"])
    assert r.code == 0, r.err
    for name in P.available():
        assert name in r.out
        p = P.load_preset(name)
        if p.paper is not None:
            assert f"{p.paper.base_gflops:.1f}" in r.out
            assert f"{p.paper.pruned_miou:.1f}" in r.out


def test_unknown_option_is_exit_2(run_cli):
    r = run_cli(["presets", "--bogus"])
    assert r.code == 2
    assert "--bogus" in r.err
    assert r.out == ""


def test_unknown_command_is_exit_2(run_cli):
    r = run_cli(["no-such-command"])
    assert r.code == 2


def test_every_command_has_help(run_cli):
    from dtop_cli.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands if not c.hidden]
    assert {"presets", "env"} <= set(names)
    for name in names:
        r = run_cli([name, "--help"])
        assert r.code == 0, (name, r.err)
        assert "Usage" in r.out


# --------------------------------------------------------------------------- env


def test_env_json_reports_the_stack(run_cli):
    import torch

    r = run_cli(["env", "--json"])
    assert r.code == 0, r.err
    info = r.json()
    assert info["python"] == sys.version.split()[0]
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert isinstance(info["cuda_devices"], list)
    assert len(info["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["mmcv"] == metadata.version("mmcv")
    assert info["mmengine"] == metadata.version("mmengine")
    assert info["mmseg"] == metadata.version("mmsegmentation")
    assert info["numpy"] == metadata.version("numpy")
    assert info["dtop"] == metadata.version("dtop")
    assert info["mmcv_ops"].startswith("compiled")


def test_env_table_prints_versions(run_cli):
    import torch

    r = run_cli(["env"])
    assert r.code == 0, r.err
    for key in ("python", "torch", "mmcv", "mmseg", "mmengine", "cuda_available"):
        assert re.search(rf"\b{key}\b", r.out), key
    assert torch.__version__ in r.out
    assert metadata.version("mmsegmentation") in r.out


# --------------------------------------------------------------------------- exit codes


def test_user_error_is_one_line_and_exit_2(run_cli, temp_command):
    def boom() -> None:
        raise UserError("the file x.yaml says no")

    r = run_cli([temp_command("_boom", boom)])
    assert r.code == 2
    assert [ln for ln in r.err.splitlines() if ln.strip()] == ["error: the file x.yaml says no"]
    assert r.out == ""


def test_unexpected_error_is_exit_1_without_traceback(run_cli, temp_command):
    def crash() -> None:
        raise RuntimeError("disk on fire")

    r = run_cli([temp_command("_crash", crash)])
    assert r.code == 1
    assert "RuntimeError: disk on fire" in r.err and "--debug" in r.err
    assert "Traceback" not in r.err


def test_debug_shows_the_exception(run_cli, temp_command):
    def crash() -> None:
        raise RuntimeError("disk on fire")

    name = temp_command("_crash", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_cli([name, "--debug"])


# --------------------------------------------------------------------------- console script


def _console_script() -> Path:
    """The `dtop` installed beside the interpreter running the tests (the .venv one)."""
    here = Path(sys.executable).parent / "dtop"
    found = here if here.exists() else shutil.which("dtop")
    assert found, "the `dtop` console script is not installed (run scripts/setup.sh)"
    return Path(found)


def test_installed_console_script_runs():
    proc = subprocess.run([str(_console_script()), "presets", "--json"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert [i["name"] for i in obj["presets"]] == P.available()
    bad = subprocess.run([str(_console_script()), "presets", "--nope"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert bad.returncode == 2


# --------------------------------------------------------------------------- README / CI agreement


def _readme(repo_root: Path) -> str:
    return (repo_root / "README.md").read_text()


def _test_command(readme: str) -> str:
    """The README's test command: the one-line code block under the 'Run the tests' line."""
    m = re.search(r"Run the tests[^\n]*\n+```(?:bash|sh)?\n([^\n]+)\n```", readme)
    assert m, "README has no 'Run the tests' code block"
    return m.group(1).strip()


def test_ci_runs_exactly_the_readmes_test_command(repo_root: Path):
    cmd = _test_command(_readme(repo_root))
    ci_lines = [ln.strip() for ln in (repo_root / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in ci_lines if ln and not ln.startswith("#")]
    assert cmd in commands
    assert commands[-1] == cmd  # the test command is the last thing CI does: its exit code is CI's
    assert "set -euo pipefail" in commands


def test_readme_presets_table_matches_the_presets(repo_root: Path):
    """The README repeats the paper's numbers for readers; this keeps them equal to presets/."""
    readme = _readme(repo_root)
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0] in P.available():
            rows[cells[0]] = cells
    assert set(rows) == set(P.available())
    for name, cells in rows.items():
        p = P.load_preset(name)
        text = " ".join(cells)
        assert p.model.backbone in text and p.data.dataset in text
        assert "x".join(map(str, p.data.crop)) in text
        assert f"{p.exit.threshold:g}" in cells
        if p.paper is not None:
            for v in (p.paper.base_miou, p.paper.base_gflops, p.paper.pruned_miou, p.paper.pruned_gflops):
                assert f"{v:.1f}" in cells, (name, v)
