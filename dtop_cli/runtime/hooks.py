"""mmengine hooks and wrappers that dtop's configs name (registered on import).

A config written by ``dtop config`` imports this module (``custom_imports``), so mmseg's own
tools find the same pieces a ``dtop train`` run uses.

Checkpoints are written through `AtomicCheckpointHook`: mmengine's stock hook writes the
checkpoint and the ``last_checkpoint`` pointer in place, so a run killed at the wrong moment
leaves a truncated file that a later ``--resume`` trips over. Ours writes each file under a
temporary name and renames it into place, and records what an exact resume needs (the
random-number states of every process, the training sampler's seed).

`DToPTrainLoop` is mmengine's iteration loop made to survive a cluster: it stops cleanly on
SIGTERM/SIGINT (a complete checkpoint, then :class:`~dtop_cli.errors.RunStopped`), stops at
the first non-finite loss before anything is saved, and resumes at the next iteration with
the sampler and random-number generators where the stopped run left them.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mmengine.dataset import InfiniteSampler
from mmengine.dist import all_gather_object, get_rank, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import HOOKS, LOOPS, MODEL_WRAPPERS
from mmengine.runner import IterBasedTrainLoop

from ..errors import RunStopped
from ..fsutil import atomic_write
from .checkpoints import (
    LAST_CHECKPOINT,
    TRAIN_STATE,
    human_bytes,
    latest_checkpoint,
    preserved_rng,
    restore_rng_state,
    rng_state,
    state_bytes,
)
from .stopping import StopSignals, agree, nonfinite_terms, signal_name


def _is_local(path: str) -> bool:
    return "://" not in str(path)


@HOOKS.register_module(force=True)
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook, but no checkpoint or pointer file is ever half-written.

    Each checkpoint is saved under a hidden temporary name and renamed into place, then
    ``last_checkpoint`` is replaced the same way, and only then the oldest checkpoint beyond
    ``max_keep_ckpts`` is removed: a run killed at any instant leaves a pointer to a complete
    checkpoint. (The stock hook deletes the old checkpoint first and writes both files in
    place.) Remote ``out_dir``s fall back to the stock behaviour.

    Each checkpoint also carries ``TRAIN_STATE``: the random-number states of every process
    and the training sampler's seed, which :class:`DToPTrainLoop` puts back on resume. A
    write that fails (disk full, permissions) leaves the previous checkpoint and the pointer
    as they were and stops the run with a message that says how much room a checkpoint needs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_state: Optional[dict] = None
        #: TRAIN_STATE of the checkpoint the runner loaded (resume or load_from), if any
        self.loaded_state: Optional[dict] = None

    def save_now(self, runner: Any, step: int) -> str:
        """Save the checkpoint of ``step`` completed iterations now (every process calls
        this; the main process writes) and return its path."""
        name = self.filename_tmpl.format(step)
        final = os.path.join(self.out_dir, name)
        if self.last_ckpt != final:  # not just saved by the regular interval
            self._save_checkpoint_with_step(runner, step, dict(epoch=runner.epoch, iter=step))
        return final

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        if self._pending_state is not None:
            checkpoint[TRAIN_STATE] = self._pending_state

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        state = checkpoint.get(TRAIN_STATE)
        self.loaded_state = state if isinstance(state, dict) else None

    def _train_state(self, runner: Any) -> dict:
        """What an exact resume needs, gathered from every process (a collective call)."""
        sampler = getattr(runner.train_dataloader, "sampler", None)
        return {
            "rng": all_gather_object(rng_state()),  # one entry per rank
            "sampler": {"seed": getattr(sampler, "seed", None),
                        "batch_size": getattr(runner.train_dataloader, "batch_size", None),
                        "world_size": get_world_size()},
        }

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict) -> None:
        self._pending_state = self._train_state(runner)
        try:
            self._save_atomically(runner, step, meta)
        finally:
            self._pending_state = None

    def _save_atomically(self, runner: Any, step: int, meta: dict) -> None:
        if not _is_local(self.out_dir):
            return super()._save_checkpoint_with_step(runner, step, meta)
        run_info = runner.cfg.get("dtop") if runner.cfg is not None else None
        if run_info is not None:  # what the weights are: `dtop eval` reads the threshold back
            meta = dict(meta, dtop=dict(run_info))
        name = self.filename_tmpl.format(step)
        final = os.path.join(self.out_dir, name)
        part = f".{name}.part"
        self.last_ckpt = final
        runner.message_hub.update_info("last_ckpt", final)

        stale: Optional[int] = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))

        tmp = os.path.join(self.out_dir, part)
        previous = latest_checkpoint(runner.work_dir) if is_main_process() else None
        try:
            # runner.save_checkpoint writes on the main process only (master_only).
            runner.save_checkpoint(self.out_dir, part, self.file_client_args,
                                   save_optimizer=self.save_optimizer,
                                   save_param_scheduler=self.save_param_scheduler, meta=meta,
                                   by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
            if not is_main_process():
                return
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            atomic_write(Path(runner.work_dir) / LAST_CHECKPOINT, final.encode())
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise RunStopped(self._write_failure(runner, final, previous, e)) from e
        except BaseException:
            if is_main_process():
                Path(tmp).unlink(missing_ok=True)
            raise
        if stale is not None and stale != step:
            old = os.path.join(self.out_dir, self.filename_tmpl.format(stale))
            if os.path.isfile(old):
                os.remove(old)

    def _write_failure(self, runner: Any, final: str, previous: Optional[Path], e: OSError) -> str:
        """One line: what failed, how much room a checkpoint needs, what is still good."""
        if previous is not None and previous.is_file():
            needed = previous.stat().st_size
        else:  # no checkpoint yet: the tensors it would hold
            optim = runner.optim_wrapper.state_dict() if self.save_optimizer else {}
            needed = state_bytes(runner.model.state_dict()) + state_bytes(optim)
        try:
            free = f", {human_bytes(shutil.disk_usage(self.out_dir).free)} free"
        except OSError:
            free = ""
        kept = (f"{previous} and {LAST_CHECKPOINT} are unchanged: make room and continue with --resume"
                if previous is not None else "no earlier checkpoint exists")
        return (f"cannot write checkpoint {final}: {e.strerror or e} (a checkpoint needs about "
                f"{human_bytes(needed)}{free}); {kept}")


@dataclass
class StopReason:
    """Why a :class:`DToPTrainLoop` ended before its last iteration."""

    kind: str  # "signal" or "nonfinite"
    iteration: int  # 1-based: the iteration that was stopped after (signal) or that failed (nonfinite)
    signum: int = 0
    terms: dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None  # signal: the checkpoint saved; nonfinite: the last good one


@LOOPS.register_module(force=True)
class DToPTrainLoop(IterBasedTrainLoop):
    """mmengine's IterBasedTrainLoop, made to survive what clusters do to long runs.

    * **stop signals**: SIGTERM/SIGINT end the run after the current iteration with a
      complete checkpoint; every process stops after the same iteration (the flag is
      all-reduced each iteration). :attr:`stop` says what happened.
    * **non-finite loss**: the first NaN/Inf loss stops the run before that step's hooks run,
      so nothing computed from it is logged or saved; the last good checkpoint stays newest.
    * **exact resume**: a resumed run moves the InfiniteSampler to where the stopped run was
      (no batches are loaded just to be skipped) and restores every process's random-number
      state, so it continues as if never stopped. Validation runs with the generators
      preserved, so when it ran makes no difference to training.
    """

    def __init__(self, runner: Any, dataloader: Any, max_iters: int, val_begin: int = 1,
                 val_interval: int = 1000, dynamic_intervals: Optional[Sequence] = None) -> None:
        super().__init__(runner, dataloader, max_iters, val_begin=val_begin, val_interval=val_interval,
                         dynamic_intervals=dynamic_intervals)
        self.stop: Optional[StopReason] = None
        self._signals = StopSignals()
        self._signalled = 0

    def _checkpoint_hook(self) -> Optional[AtomicCheckpointHook]:
        return next((h for h in self.runner.hooks if isinstance(h, AtomicCheckpointHook)), None)

    def _continue_data(self) -> None:
        """Resumed at iteration ``self._iter``: data order and random state as they were."""
        hook = self._checkpoint_hook()
        state = (hook.loaded_state if hook is not None else None) or {}
        sampler = getattr(self.dataloader, "sampler", None)
        if isinstance(sampler, InfiniteSampler):
            seed = (state.get("sampler") or {}).get("seed")
            if seed is not None:
                sampler.seed = int(seed)
            # the stream every rank reads its share of (mmengine 0.10's InfiniteSampler): after
            # `iter` iterations each of `world_size` ranks has taken `batch_size` indices
            start = self._iter * int(self.dataloader.batch_size) * sampler.world_size
            sampler.indices = itertools.islice(sampler._infinite_indices(), start + sampler.rank, None,
                                               sampler.world_size)
            self.dataloader_iterator = type(self.dataloader_iterator)(self.dataloader)
        else:  # another sampler: mmengine's way, load and drop the batches already trained on
            for _ in range(self._iter):
                next(self.dataloader_iterator)
        states = state.get("rng")
        if isinstance(states, list) and states:
            restore_rng_state(states[get_rank() % len(states)])

    def run(self) -> Any:
        runner = self.runner
        runner.call_hook("before_train")
        runner.call_hook("before_train_epoch")
        if self._iter > 0:
            self._continue_data()
        with StopSignals(runner.logger.info) as self._signals:
            while self._iter < self._max_iters and not self.stop_training:
                runner.model.train()
                data_batch = next(self.dataloader_iterator)
                self.run_iter(data_batch)
                if self.stop is not None:
                    break
                if self._signalled:
                    hook = self._checkpoint_hook()
                    path = hook.save_now(runner, self._iter) if hook is not None else None
                    self.stop = StopReason("signal", self._iter, signum=self._signalled, checkpoint=path)
                    runner.logger.info(f"stopped by {signal_name(self._signalled)} after iteration "
                                          f"{self._iter}: checkpoint {path}")
                    break
                self._decide_current_val_interval()
                if (runner.val_loop is not None and self._iter >= self.val_begin
                        and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                    with preserved_rng():
                        runner.val_loop.run()
        runner.call_hook("after_train_epoch")
        runner.call_hook("after_train")
        return runner.model

    def run_iter(self, data_batch: Sequence[dict]) -> None:
        runner = self.runner
        runner.call_hook("before_train_iter", batch_idx=self._iter, data_batch=data_batch)
        outputs = runner.model.train_step(data_batch, optim_wrapper=runner.optim_wrapper)
        bad = nonfinite_terms(outputs)
        nonfinite, signalled = agree(bool(bad), self._signals.received or 0)
        if nonfinite:
            last = latest_checkpoint(runner.work_dir)
            self.stop = StopReason("nonfinite", self._iter + 1, terms=bad,
                                   checkpoint=None if last is None else str(last))
            where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another process"
            runner.logger.info(f"non-finite loss at iteration {self._iter + 1}: {where}")
            return
        runner.call_hook("after_train_iter", batch_idx=self._iter, data_batch=data_batch, outputs=outputs)
        self._iter += 1
        self._signalled = signalled


@MODEL_WRAPPERS.register_module(force=True)
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for CPU processes (gloo): no device ids, unused weights allowed.

    ``find_unused_parameters`` is on because a DToP model may hold weights a phase does not
    train (e.g. the class token kept for checkpoint compatibility).
    """

    def __init__(self, module: Any, device_ids: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("find_unused_parameters", True)
        kwargs.setdefault("broadcast_buffers", False)
        super().__init__(module=module, device_ids=None, **kwargs)
