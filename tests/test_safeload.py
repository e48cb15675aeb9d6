"""Checkpoint safety: real mmengine checkpoints load (resume too); anything else is refused unrun."""

from __future__ import annotations

import collections
import os
import pickle
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dtop_cli import safeload as S
from dtop_cli.errors import UnsafeCheckpointError, UserError

# --------------------------------------------------------------------------- a real mmengine run


def _toy_runner(work_dir: Path, max_iters: int, **kw):
    """A tiny mmengine Runner on CPU (a linear model, 8 random samples) that saves checkpoints."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch.utils.data import Dataset

    class Toy(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, inputs, labels=None, mode="tensor"):
            out = self.lin(inputs)
            if mode == "loss":
                return {"loss": ((out - labels) ** 2).mean()}
            return out

    class Random(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            return {"inputs": torch.randn(4, generator=g), "labels": torch.randn(2, generator=g)}

    return Runner(
        model=Toy(),
        work_dir=str(work_dir),
        experiment_name=f"safeload-{uuid.uuid4().hex[:8]}",
        train_dataloader={"dataset": Random(), "sampler": {"type": "DefaultSampler", "shuffle": True},
                              "batch_size": 2, "collate_fn": {"type": "default_collate"}, "num_workers": 0},
        train_cfg={"by_epoch": False, "max_iters": max_iters},
        optim_wrapper={"optimizer": {"type": "AdamW", "lr": 1e-3}},
        param_scheduler=[{"type": "LinearLR", "start_factor": 0.1, "by_epoch": False, "begin": 0, "end": 2}],
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 1, "by_epoch": False},
                           "logger": {"type": "LoggerHook", "interval": 1}},
        randomness={"seed": 0},
        **kw,
    )


@pytest.fixture(scope="module")
def mmengine_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("runner")
    runner = _toy_runner(work, max_iters=2)
    runner.train()
    path = work / "iter_2.pth"
    assert path.is_file()
    return path


def _pickle_globals_of(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    return set(S._pickle_globals(data))


def test_runner_checkpoint_has_history_buffers_and_loads(mmengine_ckpt: Path):
    from mmengine.logging import HistoryBuffer

    # it really is the kind of checkpoint torch refuses by default
    assert "mmengine.logging.history_buffer.HistoryBuffer" in _pickle_globals_of(mmengine_ckpt)
    ckpt = S.load_checkpoint(mmengine_ckpt)
    assert set(ckpt) >= {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    assert ckpt["meta"]["iter"] == 2
    assert set(ckpt["state_dict"]) == {"lin.weight", "lin.bias"}
    assert ckpt["state_dict"]["lin.weight"].shape == (2, 4)
    scalars = ckpt["message_hub"]["log_scalars"]
    loss = scalars["train/loss"]
    assert isinstance(loss, HistoryBuffer)
    logs, counts = loss.data
    assert isinstance(logs, np.ndarray) and logs.shape == (2,) and np.isfinite(logs).all()
    assert counts.dtype == np.int64
    assert loss.current() == logs[-1]
    # the statistics table HistoryBuffer restores still holds the plain functions
    assert HistoryBuffer._statistics_methods["mean"] is HistoryBuffer.mean


def test_allow_list_covers_exactly_what_is_needed(mmengine_ckpt: Path):
    assert S.unsafe_globals(mmengine_ckpt) == []
    ours = {name for _, name in S.allowed_globals()}
    used = _pickle_globals_of(mmengine_ckpt)
    # every non-torch global the checkpoint names is one of ours
    assert {g for g in used if not g.startswith(("torch.", "collections.", "_codecs."))} <= ours
    # the real builtin getattr is never allowed, only the HistoryBuffer-restricted stand-in
    objs = {name: obj for obj, name in S.allowed_globals()}
    assert objs["builtins.getattr"] is not getattr
    assert all(obj is not getattr and obj is not eval and obj is not os.system for obj in objs.values())


def test_install_safe_globals_makes_mmengine_resume_work(tmp_path: Path, mmengine_ckpt: Path):
    S.install_safe_globals()
    S.install_safe_globals()  # idempotent
    names = [g[1] for g in torch.serialization.get_safe_globals() if isinstance(g, tuple)]
    assert names.count("mmengine.logging.history_buffer.HistoryBuffer") == 1
    # torch.load with torch's default weights_only=True, as mmengine's CheckpointLoader calls it
    ckpt = torch.load(mmengine_ckpt, map_location="cpu")
    assert ckpt["meta"]["iter"] == 2
    runner = _toy_runner(tmp_path / "resumed", max_iters=3, load_from=str(mmengine_ckpt), resume=True)
    runner.train()
    assert runner.iter == 3
    logs, _ = runner.message_hub.get_scalar("train/loss").data
    assert len(logs) == 3  # two resumed entries plus the new iteration


def test_plain_state_dict_and_numpy_values_load(tmp_path: Path):
    from mmengine.logging import HistoryBuffer

    hb = HistoryBuffer()
    for v in (0.5, 0.25, 0.125):
        hb.update(v)
    obj = {
        "state_dict": collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3)),
        "message_hub": {
            "log_scalars": collections.OrderedDict({"val/mIoU": hb}),
            "runtime_info": collections.OrderedDict(eta=np.float64(1.5), best=np.float32(0.25),
                                                    step=np.int64(7), flags=np.array([True, False])),
        },
    }
    path = tmp_path / "np.pth"
    torch.save(obj, path)
    got = S.load_checkpoint(path)
    assert torch.equal(got["state_dict"]["w"], obj["state_dict"]["w"])
    info = got["message_hub"]["runtime_info"]
    assert info["eta"] == 1.5 and info["best"].dtype == np.float32 and info["step"] == 7
    assert info["flags"].tolist() == [True, False]
    assert got["message_hub"]["log_scalars"]["val/mIoU"].mean() == pytest.approx(0.875 / 3)
    sd_path = tmp_path / "sd.pth"
    torch.save(nn.Linear(3, 1).state_dict(), sd_path)
    assert set(S.load_checkpoint(sd_path)) == {"weight", "bias"}


def test_numpy1_checkpoint_names_resolve(tmp_path: Path):
    """A checkpoint written under numpy 1 names numpy.core.multiarray; it must load here too."""
    path = tmp_path / "np1.pth"
    torch.save({"x": np.arange(3, dtype=np.float64), "s": np.float64(2.0)}, path,
               _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    got = S.load_checkpoint(path)
    assert got["x"].tolist() == [0.0, 1.0, 2.0] and got["s"] == 2.0


# --------------------------------------------------------------------------- refused checkpoints


class _RunsCommand:
    """Unpickling this would run a shell command."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _GetattrEscape:
    """Unpickling this would call the real getattr on a class: the start of a sandbox escape."""

    def __reduce__(self):
        return (getattr, (collections.OrderedDict, "fromkeys"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_a_command_is_refused_and_nothing_runs(tmp_path: Path, zip_format: bool):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": _RunsCommand(f"touch {marker}")}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError) as ei:
        S.load_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg and "system" in msg and "\n" not in msg
    assert isinstance(ei.value, UserError) and ei.value.exit_code == 2
    assert not marker.exists()


def test_torch_enforces_the_list_even_without_the_prescan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"x": _RunsCommand(f"touch {marker}")}, path)
    monkeypatch.setattr(S, "unsafe_globals", lambda p: [])
    with pytest.raises(UnsafeCheckpointError, match="system"):
        S.load_checkpoint(path)
    assert not marker.exists()


def test_getattr_is_only_allowed_for_history_buffer_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "getattr.pth"
    torch.save({"x": _GetattrEscape()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"getattr\(collections.OrderedDict,'fromkeys'\)"):
        S.load_checkpoint(path)
    monkeypatch.setattr(S, "unsafe_globals", lambda p: [])  # the stand-in itself refuses too
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        S.load_checkpoint(path)


def test_other_classes_are_refused_by_name(tmp_path: Path):
    path = tmp_path / "path.pth"
    torch.save({"where": Path("/etc/passwd")}, path)
    with pytest.raises(UnsafeCheckpointError, match="pathlib.PosixPath"):
        S.load_checkpoint(path)


def test_refusal_via_cli_is_exit_2(tmp_path: Path, run_cli):
    from dtop_cli.cli import app

    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"x": _RunsCommand(f"touch {marker}")}, path)

    def load(ckpt: str) -> None:
        S.load_checkpoint(ckpt)

    before = list(app.registered_commands)
    app.command("_load", hidden=True)(load)
    try:
        r = run_cli(["_load", str(path)])
    finally:
        app.registered_commands[:] = before
    assert r.code == 2
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "system" in lines[0]
    assert not marker.exists()


# --------------------------------------------------------------------------- not checkpoints


def test_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match="not found") as ei:
        S.load_checkpoint(tmp_path / "nope.pth")
    assert not isinstance(ei.value, UnsafeCheckpointError)


def test_directory(tmp_path: Path):
    with pytest.raises(UserError, match="not a file"):
        S.load_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"PK\x03\x04broken zip"],
                         ids=["empty", "text", "broken-zip"])
def test_corrupt_file(tmp_path: Path, content: bytes):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(UserError) as ei:
        S.load_checkpoint(path)
    assert not isinstance(ei.value, UnsafeCheckpointError)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


def test_zip_that_is_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        S.load_checkpoint(path)


def test_truncated_checkpoint(tmp_path: Path, mmengine_ckpt: Path):
    path = tmp_path / "cut.pth"
    path.write_bytes(mmengine_ckpt.read_bytes()[:2000])
    with pytest.raises(UserError) as ei:
        S.load_checkpoint(path)
    assert not isinstance(ei.value, UnsafeCheckpointError)


def test_not_a_dict(tmp_path: Path):
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="expected a dict"):
        S.load_checkpoint(path)


def test_plain_pickle_file_is_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    # a raw pickle is neither format torch.save writes
    with pytest.raises(UserError):
        S.load_checkpoint(path)
