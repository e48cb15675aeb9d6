"""Stopping a training run cleanly: stop signals, non-finite losses, agreement between processes.

A cluster stops a job with SIGTERM (slurm: ``--signal=TERM@120`` some time before the end,
or at preemption) and kills it a little later; a user presses Ctrl-C. Either way the run
should finish the step it is in, save a complete checkpoint and exit, so that ``--resume``
loses nothing. :class:`StopSignals` turns the signals into a flag the training loop polls
once per iteration; :func:`agree` makes every process see the same flags, so all of them
stop after the same iteration (one process alone saving, or one rank leaving a collective,
would hang the others).
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Ctrl-C pressed this many times (torchrun forwards each press once more) stops at once.
INTERRUPTS_TO_ABORT = 3


def signal_exit_code(signum: int) -> int:
    """The exit status of a process stopped by ``signum``, as shells report it (SIGTERM: 143,
    SIGINT: 130): scripts and slurm see the run as stopped, not failed."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`received` instead of ending the process.

    Only the main thread can install handlers; elsewhere this does nothing (the process
    keeps its default handling). The previous handlers come back on exit.
    """

    def __init__(self, log: Any = None) -> None:
        self.received: Optional[int] = None
        self._count = 0
        self._log = log
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self._count += 1
        if self.received is None:
            self.received = signum
            if self._log is not None:
                self._log(f"{signal_name(signum)} received: stopping after this iteration with a checkpoint")
        elif signum == signal.SIGINT and self._count >= INTERRUPTS_TO_ABORT:
            raise KeyboardInterrupt


def nonfinite_terms(log_vars: Optional[dict]) -> dict[str, float]:
    """The loss terms of one step that are NaN or infinite, by name (e.g. ``decode.loss_mask``).

    The total (``loss``) is named only when no single term is: it is their sum."""
    bad: dict[str, float] = {}
    for name, value in (log_vars or {}).items():
        try:
            v = float(value.detach().float().mean() if hasattr(value, "detach") else value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(v):
            bad[name] = v
    if len(bad) > 1:
        bad.pop("loss", None)
    return bad


def agree(*flags: int) -> list[int]:
    """The largest value of each flag over all processes (unchanged in a single process).

    One all-reduce of a few integers per call: negligible next to a training step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [int(f) for f in flags]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
