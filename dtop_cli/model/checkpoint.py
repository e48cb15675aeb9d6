"""Strict loading of DToP checkpoints (ours and the public code's share one layout)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError

logger = logging.getLogger(__name__)

_IGNORED = ".loss_decode."  # loss buffers: not part of the model's function


def _ignored(key: str) -> bool:
    return _IGNORED in key


def state_dict_of(ckpt: Any) -> dict:
    """Weights of an mmengine checkpoint (or a bare state dict), DDP prefixes removed."""
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise UserError("checkpoint holds no state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def added_keys(model: nn.Module, state: dict) -> list[str]:
    """Keys of `model` that `state` lacks and that the preset adds to the files it loads
    (``model.aux_heads_added``: Segmenter's auxiliary heads, new in dtop). Only when the
    file has none of them: a file with some of an added head's keys is a damaged file."""
    prefixes = tuple(p + "." for p in getattr(model, "added_keys", ()))
    if not prefixes or any(k.startswith(prefixes) for k in state):
        return []
    return [k for k in model.state_dict() if k.startswith(prefixes) and k not in state and not _ignored(k)]


def check_compatible(model: nn.Module, state: dict, where: str) -> None:
    """Raise one line naming the first mismatched keys/shapes when `state` does not fit.

    Every key of the file must be used; keys of the model the file lacks are an error,
    except the heads the preset adds (:func:`added_keys`)."""
    own = model.state_dict()
    new = set(added_keys(model, state))
    missing = [k for k in own if k not in state and not _ignored(k) and k not in new]
    unexpected = [k for k in state if k not in own and not _ignored(k)]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:3]))
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. " + ", ".join(missing[:3]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. " + ", ".join(unexpected[:3]))
    if problems:
        raise UserError(f"{where}: checkpoint does not fit this preset's architecture ({' | '.join(problems)})")


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a checkpoint strictly into `model` through the safe loader; returns its `meta`."""
    from ..safeload import load_checkpoint

    ckpt = load_checkpoint(path, map_location="cpu")
    state = state_dict_of(ckpt)
    check_compatible(model, state, str(path))
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    new = added_keys(model, state)
    if new:
        heads = sorted({".".join(k.split(".")[:2]) for k in new})
        logger.warning("%s: %d new keys (%s: added by this preset, not in the file; "
                       "train them with `dtop train --init`)", path, len(new), ", ".join(heads))
    model.dtop_new_keys = new
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    return meta if isinstance(meta, dict) else {}
