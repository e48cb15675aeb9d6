"""Presets: every shipped file validates; each kind of mistake is one clear line and exit 2."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dtop_cli import presets as P
from dtop_cli.presets import PresetError, load_preset

SHIPPED = ["segmenter-base-ade", "segmenter-large-ade", "segvit-base-ade", "segvit-large-ade",
           "segvit-large-cocostuff", "segvit-large-pc", "setr-naive-large-ade", "tiny-synthetic"]
# mmseg model-zoo models (issue 13): stage ends and reference mIoU from mmseg's configs/metafile
ZOO = {"setr-naive-large-ade": ([9, 14, 19, 23], 48.28), "segmenter-base-ade": ([5, 7, 11], 49.6),
       "segmenter-large-ade": ([7, 15, 23], 52.16)}


@pytest.fixture
def tiny_data() -> dict:
    """The raw mapping of a valid preset, to break one key at a time."""
    return yaml.safe_load((P.PRESET_DIR / "tiny-synthetic.yaml").read_text())


def _write(tmp_path: Path, data: dict, name: str = "user.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def preset_cmd():
    """A throw-away `dtop _preset-probe --preset P [--set k=v]` command.

    Real commands that take --preset land with their issues; this one exercises the same path
    (PresetOpt/SetOpt -> load_preset -> main()'s UserError handling) without depending on them.
    """
    from dtop_cli.cli import PresetOpt, SetOpt, app, emit_json

    def probe(preset: str = PresetOpt, overrides: list[str] | None = SetOpt) -> None:
        p = load_preset(preset, overrides)
        emit_json({"name": p.name, "threshold": p.exit.threshold})

    before = list(app.registered_commands)
    app.command("_preset-probe", hidden=True)(probe)
    yield "_preset-probe"
    app.registered_commands[:] = before


# --------------------------------------------------------------------------- shipped presets


def test_available_lists_the_shipped_presets():
    assert P.available() == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset_loads_and_is_consistent(name: str):
    p = load_preset(name)
    assert p.name == name
    assert p.source.endswith(f"{name}.yaml")
    assert p.num_stages == (4 if name.startswith("setr") else 3)
    assert p.model.stage_ends[-1] == p.model.num_layers - 1
    assert 0 < p.exit.threshold <= 1
    for v in p.data.crop:
        assert v % p.model.patch_size == 0
    if name.startswith("segvit"):
        assert p.paper is not None
        assert p.paper.pruned_gflops < p.paper.base_gflops
        assert p.model.pretrained and p.model.pretrained.startswith("http")
    else:
        assert p.paper is None
    if name in ZOO:
        assert p.model.stage_ends == ZOO[name][0]
        assert p.reference is not None and p.reference.miou == ZOO[name][1]
        assert p.model.with_cls_token
        assert p.model.interpolate_mode == ("bilinear" if name.startswith("setr") else "bicubic")
        assert p.model.final_norm == name.startswith("segmenter")
        assert p.model.aux_heads_added == name.startswith("segmenter")


def test_preset_by_path_loads_a_users_file(tmp_path: Path, tiny_data: dict):
    tiny_data["name"] = "mine"
    path = _write(tmp_path, tiny_data)
    p = load_preset(str(path))
    assert p.name == "mine"
    assert p.source == str(path)


def test_unknown_preset_name_lists_the_available_ones():
    with pytest.raises(PresetError) as ei:
        load_preset("segvit-huge-ade")
    msg = str(ei.value)
    assert "segvit-huge-ade" in msg and "tiny-synthetic" in msg


def test_missing_preset_file():
    with pytest.raises(PresetError, match="not found"):
        load_preset("/nonexistent/dir/p.yaml")


def test_not_yaml(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [1, 2\nexit: {")
    with pytest.raises(PresetError) as ei:
        load_preset(str(path))
    assert str(path) in str(ei.value) and "YAML" in str(ei.value)


def test_top_level_not_a_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(PresetError, match="mapping"):
        load_preset(str(path))


# --------------------------------------------------------------------------- schema errors


def _break_unknown_top(d: dict) -> None:
    d["exits"] = {"threshold": 0.9}


def _break_unknown_nested(d: dict) -> None:
    d["model"]["head"]["num_layer"] = 2


def _break_wrong_type(d: dict) -> None:
    d["model"]["embed_dims"] = "ninety-six"


def _break_wrong_type_bool(d: dict) -> None:
    d["data"]["reduce_zero_label"] = "yes"


def _break_wrong_list_len(d: dict) -> None:
    d["data"]["crop"] = [256]


def _break_missing(d: dict) -> None:
    del d["data"]["crop"]


def _break_missing_section(d: dict) -> None:
    del d["loss"]


def _break_thresh_zero(d: dict) -> None:
    d["exit"]["threshold"] = 0


def _break_thresh_high(d: dict) -> None:
    d["exit"]["threshold"] = 1.5


def _break_stage_ends(d: dict) -> None:
    d["model"]["stage_ends"] = [1, 3, 4]  # num_layers is 6: the last stage must end at layer 5


CASES = [
    (_break_unknown_top, "exits", "unknown key"),
    (_break_unknown_nested, "model.head.num_layer", "unknown key"),
    (_break_wrong_type, "model.embed_dims", "an integer"),
    (_break_wrong_type_bool, "data.reduce_zero_label", "true/false"),
    (_break_wrong_list_len, "data.crop", "length 2"),
    (_break_missing, "data.crop", "missing key"),
    (_break_missing_section, "loss", "missing key"),
    (_break_thresh_zero, "exit.threshold", "(0, 1]"),
    (_break_thresh_high, "exit.threshold", "(0, 1]"),
    (_break_stage_ends, "model.stage_ends", "num_layers-1"),
]
IDS = [c[0].__name__.removeprefix("_break_") for c in CASES]


@pytest.mark.parametrize("breaker,key,expected", CASES, ids=IDS)
def test_schema_error_names_file_key_and_expectation(tmp_path: Path, tiny_data: dict,
                                                     breaker: Callable[[dict], None], key: str, expected: str):
    data = copy.deepcopy(tiny_data)
    breaker(data)
    path = _write(tmp_path, data)
    with pytest.raises(PresetError) as ei:
        load_preset(str(path))
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert f"'{key}'" in msg
    assert expected in msg


@pytest.mark.parametrize("breaker,key,expected", CASES, ids=IDS)
def test_schema_error_via_cli_is_exit_2_and_one_line(tmp_path: Path, tiny_data: dict, run_cli, preset_cmd,
                                                     breaker: Callable[[dict], None], key: str, expected: str):
    data = copy.deepcopy(tiny_data)
    breaker(data)
    path = _write(tmp_path, data)
    r = run_cli([preset_cmd, "--preset", str(path)])
    assert r.code == 2
    assert r.out == ""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1, r.err
    assert str(path) in lines[0] and key in lines[0] and expected in lines[0]
    assert "Traceback" not in r.err


def test_valid_user_file_via_cli(tmp_path: Path, tiny_data: dict, run_cli, preset_cmd):
    path = _write(tmp_path, tiny_data)
    r = run_cli([preset_cmd, "--preset", str(path), "--set", "exit.threshold=0.8"])
    assert r.code == 0, r.err
    assert r.json() == {"name": "tiny-synthetic", "threshold": 0.8}


# --------------------------------------------------------------------------- --set overrides


def test_override_scalar_nested_and_lists():
    p = load_preset("tiny-synthetic", [
        "exit.threshold=0.75",
        "model.head.num_layers=1",
        "data.crop=[128, 128]",
        "data.mean=[0, 0, 0]",
        "schedule.base.iters=10",
        "model.pretrained=null",
        "description=a run with spaces = and equals",
    ])
    assert p.exit.threshold == 0.75
    assert p.model.head.num_layers == 1
    assert p.data.crop == [128, 128]
    assert p.data.mean == [0.0, 0.0, 0.0] and all(isinstance(v, float) for v in p.data.mean)
    assert p.schedule.base.iters == 10
    assert p.model.pretrained is None
    assert p.description == "a run with spaces = and equals"
    # the untouched values are the file's
    base = load_preset("tiny-synthetic")
    assert p.model.embed_dims == base.model.embed_dims
    assert p.schedule.prune == base.schedule.prune


def test_exponent_without_dot_is_a_number():
    """PyYAML reads `5e-5` as a string; for a number field it is the number users meant."""
    p = load_preset("tiny-synthetic", ["optim.lr=5e-5", "data.mean=[1e2, 1E+2, -.5]"])
    assert p.optim.lr == 5e-5 and p.data.mean == [100.0, 100.0, -0.5]
    for bad in ("optim.lr=5e-", "optim.lr=nan", "optim.lr=1e-3x"):
        with pytest.raises(PresetError, match="optim.lr"):
            load_preset("tiny-synthetic", [bad])


def test_override_last_one_wins():
    p = load_preset("tiny-synthetic", ["exit.threshold=0.5", "exit.threshold=0.6"])
    assert p.exit.threshold == 0.6


@pytest.mark.parametrize("override,fragment", [
    ("exit.thresh=0.5", "exit.thresh"),
    ("modle.embed_dims=8", "modle"),
    ("model.head.depth=2", "model.head.depth"),
    ("exit.threshold.value=1", "exit.threshold"),
])
def test_override_unknown_key(override: str, fragment: str):
    with pytest.raises(PresetError) as ei:
        load_preset("tiny-synthetic", [override])
    msg = str(ei.value)
    assert "unknown key" in msg and f"'{fragment}'" in msg and "tiny-synthetic.yaml" in msg


@pytest.mark.parametrize("override,key,expected", [
    ("model.embed_dims=big", "model.embed_dims", "an integer"),
    ("exit.threshold=2", "exit.threshold", "(0, 1]"),
    ("exit.threshold=0", "exit.threshold", "(0, 1]"),
    ("data.crop=256", "data.crop", "a list"),
    ("model.stage_ends=[1, 2, 3]", "model.stage_ends", "num_layers-1"),
])
def test_override_is_validated_like_the_file(override: str, key: str, expected: str):
    with pytest.raises(PresetError) as ei:
        load_preset("tiny-synthetic", [override])
    assert f"'{key}'" in str(ei.value) and expected in str(ei.value)


@pytest.mark.parametrize("bad", ["exit.threshold", "=0.5", "exit..threshold=0.5"])
def test_override_syntax(bad: str):
    with pytest.raises(PresetError, match="dotted.key=value"):
        load_preset("tiny-synthetic", [bad])


def test_override_via_cli(run_cli, preset_cmd):
    r = run_cli([preset_cmd, "--preset", "tiny-synthetic", "--set", "exit.threshold=0.95"])
    assert r.code == 0, r.err
    assert r.json()["threshold"] == 0.95
    r = run_cli([preset_cmd, "--preset", "tiny-synthetic", "--set", "exit.nope=1"])
    assert r.code == 2
    assert "exit.nope" in r.err and "Traceback" not in r.err


def test_replace_returns_a_validated_copy():
    p = load_preset("segvit-base-ade")
    q = P.replace(p, **{"exit.threshold": 1.0, "data.crop": [256, 256]})
    assert q.exit.threshold == 1.0 and q.data.crop == [256, 256]
    assert p.exit.threshold != 1.0  # the original is untouched (frozen)
    assert q.source == p.source
    with pytest.raises(PresetError):
        P.replace(p, **{"exit.threshold": 0.0})
