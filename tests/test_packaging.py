"""The wheel is a complete dtop: presets inside, found without the source checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_presets_and_lists_them(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(dist)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = dist.glob("dtop-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    shipped = sorted(p.name for p in (REPO / "presets").glob("*.yaml"))
    assert shipped and all(f"dtop_cli/preset_files/{n}" in names for n in shipped)

    # A scratch environment with the wheel installed and the OpenMMLab stack visible, but not
    # the source checkout: a plain path entry to this environment's site-packages (whose .pth
    # files, the editable install among them, are not processed).
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                        str(whl)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(py), "-c", "import dtop_cli, dtop_cli.presets as p; print(dtop_cli.__file__); "
                        "print(p.PRESET_DIR)"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    where, preset_dir = r.stdout.split()
    assert Path(where).is_relative_to(site) and Path(preset_dir) == site / "dtop_cli" / "preset_files"
    r = subprocess.run([str(py), "-m", "dtop_cli.cli", "presets", "--json"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    listed = sorted(x["name"] for x in json.loads(r.stdout)["presets"])
    assert listed == sorted(Path(n).stem for n in shipped)
