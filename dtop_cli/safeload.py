"""Loading checkpoints without letting them run code.

A PyTorch checkpoint is a pickle, and a pickle can call any importable function while it
loads. ``torch.load(weights_only=True)`` (the default since torch 2.6) only lets a pickle
build tensors and plain containers, which breaks mmengine checkpoints: their
``message_hub`` holds ``HistoryBuffer`` objects full of numpy arrays. Turning
``weights_only`` off would fix that and let a downloaded checkpoint run a shell command.

Instead we allow-list exactly what an mmengine checkpoint's pickle references (read off the
GLOBAL opcodes of checkpoints saved by a real mmengine ``Runner``):

* ``mmengine.logging.history_buffer.HistoryBuffer`` (the logged scalars);
* ``HistoryBuffer.min/max/current/mean``, which protocol-2 pickles reach through
  ``builtins.getattr(HistoryBuffer, name)``: we map that name to a getattr that only
  answers those four attributes of that one class, never the real builtin;
* numpy's array and scalar reconstructors, ``numpy.ndarray``, ``numpy.dtype`` and the
  concrete numeric dtype classes (numpy >= 1.25 pickles a dtype as an instance of e.g.
  ``Float64DType``), under both numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``) names.

Everything else torch already allows (tensors, storages, OrderedDict, ...). A checkpoint that
names any other global is refused with :class:`UnsafeCheckpointError` before a single opcode
runs: we scan the pickle's globals first and torch's restricted unpickler enforces the same
list while loading.

``load_checkpoint`` is the only way dtop code loads a checkpoint; ``install_safe_globals`` lets
mmengine's own ``runner.resume()`` / ``load_from`` (which call ``torch.load`` with torch's
default ``weights_only=True``) read the same checkpoints.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UnsafeCheckpointError, UserError

# Statistic methods HistoryBuffer registers by default; a protocol-2 pickle refers to them as
# getattr(HistoryBuffer, name) because their qualified names contain a dot.
_HISTORY_BUFFER_METHODS = frozenset({"min", "max", "current", "mean"})

# Numeric dtypes an mmengine message hub / HistoryBuffer can hold (python floats and ints
# become float64/int64; metrics and AMP values may be float32/float16; masks bool/uint8).
_NUMPY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "float16", "float32", "float64")

_installed = False


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stands in for ``builtins.getattr`` inside checkpoints: HistoryBuffer's statistics only."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    owner = getattr(obj, "__qualname__", type(obj).__qualname__)
    owner_mod = getattr(obj, "__module__", type(obj).__module__)
    raise pickle.UnpicklingError(
        f"Unsupported global: GLOBAL builtins.getattr({owner_mod}.{owner},{str(name)!r}) "
        "(only HistoryBuffer statistics are allowed)"
    )


def allowed_globals() -> list[tuple[Callable[..., Any], str]]:
    """The allow-list as ``(object, "module.qualname")`` pairs, the form torch accepts.

    Names are given explicitly so that a checkpoint written with numpy 1 (``numpy.core``) and
    one written with numpy 2 (``numpy._core``) both resolve to the objects of the numpy here.
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]

    pairs: list[tuple[Callable[..., Any], str]] = [
        (HistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
        (_history_buffer_getattr, "builtins.getattr"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        pairs.append((multiarray._reconstruct, f"{mod}._reconstruct"))
        pairs.append((multiarray.scalar, f"{mod}.scalar"))
    for name in _NUMPY_DTYPES:
        cls = type(np.dtype(name))
        if cls is not np.dtype:  # numpy >= 1.25: one class per dtype, e.g. numpy.dtypes.Float64DType
            pairs.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return pairs


def install_safe_globals() -> None:
    """Register the allow-list with torch (idempotent).

    Called before building an mmengine Runner so that ``runner.resume()`` and ``load_from``,
    which call ``torch.load`` with torch's default ``weights_only=True``, accept mmengine
    checkpoints and still refuse anything else.
    """
    global _installed
    if _installed:
        return
    import torch.serialization

    torch.serialization.add_safe_globals(allowed_globals())
    _installed = True


def _allowed_names() -> set[str]:
    from torch import _weights_only_unpickler as wou

    names = set(wou._get_allowed_globals())
    names.update(name for _, name in allowed_globals())
    return names


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every GLOBAL/INST opcode in a pickle, read without executing it.

    Module names go through the same Python-2 renames (``__builtin__`` -> ``builtins``) as
    torch's unpickler applies. STACK_GLOBAL (protocol 4+) is reported as such: torch's
    restricted unpickler does not accept it either.
    """
    try:  # the renames torch's own restricted unpickler applies
        from torch._utils import IMPORT_MAPPING, NAME_MAPPING
    except ImportError:  # pragma: no cover - older torch: the standard library's table
        from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    found: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                found.append(f"{module}.{name}")
            elif op.name == "STACK_GLOBAL":
                found.append("<STACK_GLOBAL>")
    except Exception:  # noqa: BLE001, S110 - malformed pickles are reported by torch.load below
        pass
    return found


def unsafe_globals(path: str | Path) -> list[str]:
    """Globals a zip-format checkpoint references that are not on the allow-list (in order).

    Returns [] for the legacy (non-zip) format, which torch's restricted unpickler checks
    while loading instead.
    """
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            data = b"".join(z.read(n) for n in pkls)
    except (zipfile.BadZipFile, OSError, KeyError):
        return []
    allowed = _allowed_names()
    bad: list[str] = []
    for g in _pickle_globals(data):
        if g not in allowed and g not in bad:
            bad.append(g)
    return bad


_UNSAFE_PATTERNS = (
    re.compile(r"Unsupported global: GLOBAL (\S+)"),
    re.compile(r"GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"Trying to call reduce for unrecognized function (.+?)(?: which belongs|$)", re.MULTILINE),
    re.compile(r"Can only (?:build|create new object for)[^\n]*?(?:got|but got) (.+?)$", re.MULTILINE),
    re.compile(r"Unsupported operand (\S+)"),
)


def _offending(message: str) -> str | None:
    for pat in _UNSAFE_PATTERNS:
        m = pat.search(message)
        if m:
            return m.group(1).strip().rstrip(".")
    return None


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint (mmengine's or a plain state dict) without running code from it.

    mmap: map the tensors from the file instead of reading them (zip-format files), for
    callers that only look at the metadata of a checkpoint that may be gigabytes large.

    Raises :class:`UserError` if the file is missing or is not a PyTorch checkpoint, and
    :class:`UnsafeCheckpointError` (also exit code 2) naming the file and the first global
    outside the allow-list if its pickle would construct or call anything else.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise UserError(f"checkpoint is not a file: {p}")

    bad = unsafe_globals(p)
    if bad:
        raise UnsafeCheckpointError(
            f"{p}: refusing to load checkpoint: its pickle references {bad[0]}, which is not an "
            "allowed type (tensors, numpy arrays, mmengine HistoryBuffer)"
        )

    import torch

    install_safe_globals()
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True,
                         mmap=mmap and zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        msg = str(e)
        what = _offending(msg)
        if what is not None:
            raise UnsafeCheckpointError(
                f"{p}: refusing to load checkpoint: its pickle references {what}, which is not an "
                "allowed type (tensors, numpy arrays, mmengine HistoryBuffer)"
            ) from None
        raise UserError(f"{p}: not a readable PyTorch checkpoint ({_first_line(msg)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, AttributeError,
            ImportError, IndexError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(str(e))})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{p}: not a checkpoint (expected a dict, found {type(obj).__name__})")
    return obj


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:200]
    return "empty error"
