"""The checkpoints of a training run: where the newest is, what it says about itself.

A run's work dir holds ``iter_N.pth`` files and a ``last_checkpoint`` pointer file naming
the newest complete one (mmengine's convention; both are written atomically by
:class:`~dtop_cli.runtime.hooks.AtomicCheckpointHook`). A checkpoint's ``meta['dtop']``
records what the weights are: the preset, the phase and the exit threshold they were
trained with.

Resuming is handled here too: which checkpoint a ``--resume`` continues from when the newest
one cannot be read (:func:`find_resume_checkpoint`), and the random-number state a checkpoint
carries so that a resumed run draws the same augmentations and the same data order as one
that was never stopped (:func:`rng_state`, :func:`restore_rng_state`).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import UserError

LAST_CHECKPOINT = "last_checkpoint"
#: Suffix an unreadable checkpoint is renamed to when a run resumes from an older one: it is
#: kept (never deleted), and the resumed run cannot write over it.
SET_ASIDE_SUFFIX = ".unreadable"
#: Key of a checkpoint's resume state: RNG states and the training sampler's seed/position.
TRAIN_STATE = "dtop_train_state"

PathLike = Union[str, Path]


def iteration_checkpoints(work_dir: PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``iter_N.pth`` in the work dir, newest first."""
    found = []
    for p in Path(work_dir).glob("iter_*.pth"):
        stem = p.stem.removeprefix("iter_")
        if stem.isdigit():
            found.append((int(stem), p))
    return sorted(found, reverse=True)


def latest_checkpoint(work_dir: PathLike) -> Optional[Path]:
    """The checkpoint ``--resume`` continues from: the ``last_checkpoint`` pointer if it names
    an existing file, else the newest ``iter_N.pth`` in the work dir, else None."""
    pointer = Path(work_dir) / LAST_CHECKPOINT
    if pointer.is_file():
        try:
            target = Path(pointer.read_text().strip())
        except OSError:
            target = None
        if target is not None and str(target) and target.is_file():
            return target
    found = iteration_checkpoints(work_dir)
    return found[0][1] if found else None


def _iteration_of(path: Path) -> int:
    stem = path.stem.removeprefix("iter_")
    return int(stem) if path.name.startswith("iter_") and stem.isdigit() else -1


def resume_candidates(work_dir: PathLike) -> list[Path]:
    """Every checkpoint a resume could start from, newest iteration first: the ``iter_N.pth``
    files and whatever ``last_checkpoint`` names (a target outside the ``iter_N`` naming
    comes first: the pointer is only ever moved forward)."""
    found = [p for _, p in iteration_checkpoints(work_dir)]
    pointer = Path(work_dir) / LAST_CHECKPOINT
    if pointer.is_file():
        try:
            target = Path(pointer.read_text().strip())
        except OSError:
            target = None
        if target is not None and str(target) and target.is_file() and target not in found:
            found.append(target)
    return sorted(found, key=_iteration_of, reverse=True)


def resume_problem(path: PathLike) -> Optional[str]:
    """Why a run cannot resume from ``path`` (None: it can). Reads the file memory-mapped."""
    from ..safeload import load_checkpoint

    try:
        ckpt = load_checkpoint(path, mmap=True)
    except UserError as e:
        return str(e).removeprefix(f"{path}: ")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        return "it holds no state_dict"
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("iter"), int):
        return "it records no iteration (not a checkpoint of a training run)"
    return None


@dataclass
class ResumePoint:
    """The checkpoint a resume continues from, and the newer ones it had to pass over."""

    checkpoint: Optional[Path]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)


def find_resume_checkpoint(work_dir: PathLike) -> ResumePoint:
    """The newest checkpoint in ``work_dir`` that a run can resume from.

    A newest checkpoint that cannot be read (a node died while copying it, a disk filled up
    under another tool) is passed over for the one before it, and reported.
    """
    point = ResumePoint(None)
    for path in resume_candidates(work_dir):
        why = resume_problem(path)
        if why is None:
            point.checkpoint = path
            return point
        point.unreadable.append((path, why))
    return point


def set_aside(path: PathLike) -> Path:
    """Rename an unreadable checkpoint to ``NAME.unreadable`` (``.unreadable.2``, ... if
    taken) and return the new path: its bytes stay for inspection, and the resumed run,
    which will save a checkpoint of the same name, cannot overwrite it."""
    path = Path(path)
    target = path.with_name(path.name + SET_ASIDE_SUFFIX)
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}{SET_ASIDE_SUFFIX}.{n}")
        n += 1
    os.rename(path, target)
    return target


# --------------------------------------------------------------------------- what a resume restores


def rng_state() -> dict[str, Any]:
    """The state of every random-number generator a training step draws from: python's
    ``random`` and numpy's (data augmentation in the main process), torch's CPU and CUDA
    generators (initialisation, dropout, drop-path). Saved with each checkpoint, as
    accelerate's ``save_state`` does."""
    import numpy as np
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` recorded (CUDA generators only for the same GPU count)."""
    import numpy as np
    import torch

    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving any random-number generator on: validation draws (torch's
    DataLoader takes a seed from the global generator), and a run that validated at an
    iteration must continue exactly as one resumed from a checkpoint of that iteration."""
    state = rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what a checkpoint of it takes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


# --------------------------------------------------------------------------- what a checkpoint is


def run_info(path: PathLike) -> dict:
    """``meta['dtop']`` of a checkpoint: preset name and YAML, phase, threshold ({} if none).

    Reads the file memory-mapped: only the metadata is touched, however large the weights.
    """
    from ..safeload import load_checkpoint

    meta = load_checkpoint(path, mmap=True).get("meta")
    info = meta.get("dtop") if isinstance(meta, dict) else None
    return dict(info) if isinstance(info, dict) else {}


def checkpoint_meta(path: PathLike) -> dict:
    """The ``meta`` dict of a checkpoint (read through the safe loader), {} if it has none."""
    from ..safeload import load_checkpoint

    meta = load_checkpoint(path, mmap=True).get("meta")
    return meta if isinstance(meta, dict) else {}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def architecture(preset: Any) -> dict[str, Any]:
    """The preset values that decide which weights a checkpoint holds, as dotted keys.

    Where the backbone's starting weights came from (``model.pretrained``) and regularisation
    (``model.drop_path_rate``) do not change the weights' layout.
    """
    d = preset.to_dict()
    flat = _flat(d["model"], "model")
    for k in ("model.pretrained", "model.drop_path_rate"):
        flat.pop(k, None)
    flat["data.num_classes"] = d["data"]["num_classes"]
    return flat


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> Optional[str]:
    """The first dotted key whose value differs between two flat dicts (None: equal)."""
    for k in list(a) + [k for k in b if k not in a]:
        if a.get(k) != b.get(k):
            return k
    return None


def preset_of_checkpoint(path: PathLike, overrides: Optional[list[str]] = None) -> Optional[Any]:
    """The resolved preset a dtop checkpoint recorded (with ``overrides`` applied), or None
    for a checkpoint without one (the public DToP code's, or another tool's)."""
    from ..presets import load_preset, preset_from_text

    info = run_info(path)
    text = info.get("preset_yaml")
    if isinstance(text, str) and text.strip():
        return preset_from_text(text, f"{path} (recorded preset)", overrides)
    name = info.get("preset")
    if isinstance(name, str) and name:  # recorded by an older dtop: the name of a shipped preset
        try:
            return load_preset(name, overrides)
        except UserError:
            return None
    return None


def resolve_preset(preset: Optional[str], overrides: Optional[list[str]], ckpt: Optional[PathLike]) -> Any:
    """The preset a command that takes a checkpoint runs with.

    * no ``--preset``: the one the checkpoint recorded (``--set`` applied to it);
    * ``--preset`` too: that one (its data and schedule values win), after checking that the
      checkpoint's model is the preset's model;
    * a checkpoint that recorded none (the public DToP code's) needs ``--preset``.
    """
    from ..presets import load_preset

    if ckpt is None:
        if preset is None:
            raise UserError("give --preset (or a checkpoint that records one)")
        return load_preset(preset, overrides)
    recorded = preset_of_checkpoint(ckpt, overrides)
    if preset is None:
        if recorded is None:
            raise UserError(f"{ckpt} records no dtop preset (a checkpoint of the public DToP code?): "
                            f"pass --preset NAME")
        return recorded
    chosen = load_preset(preset, overrides)
    if recorded is not None:
        key = first_difference(architecture(recorded), architecture(chosen))
        if key is not None:
            a, b = architecture(recorded).get(key), architecture(chosen).get(key)
            raise UserError(f"{ckpt} holds a different model than preset '{chosen.name}': {key} is {a!r} in the "
                            f"checkpoint, {b!r} in the preset (leave out --preset to use the checkpoint's)")
    return chosen


def newest_checkpoint(root: PathLike = "work_dirs") -> Optional[Path]:
    """The checkpoint ``dtop eval`` takes when given none: under ``root``, the preset whose
    newest complete checkpoint is the most recent, and of its runs the prune run before the
    base run (each run's ``last_checkpoint``, else its newest ``iter_N.pth``)."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs: list[tuple[float, str, str, Path]] = []  # (mtime, preset, phase, checkpoint)
    seen: set[Path] = set()
    for marker in list(root.rglob(LAST_CHECKPOINT)) + list(root.rglob("iter_*.pth")):
        run_dir = marker.parent
        if run_dir in seen:
            continue
        seen.add(run_dir)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            continue
        try:
            info = run_info(ckpt)
        except UserError:  # unreadable: not a candidate
            continue
        preset = str(info.get("preset") or run_dir.parent.name)
        phase = str(info.get("phase") or run_dir.name)
        runs.append((ckpt.stat().st_mtime, preset, phase, ckpt))
    if not runs:
        return None
    newest_preset = max(runs)[1]
    mine = [r for r in runs if r[1] == newest_preset]
    pruned = [r for r in mine if r[2] == "prune"]
    return max(pruned or mine)[3]
