"""mmengine hooks and wrappers that dtop's configs name (registered on import).

A config written by ``dtop config`` imports this module (``custom_imports``), so mmseg's own
tools find the same pieces a ``dtop train`` run uses.

Checkpoints are written through `AtomicCheckpointHook`: mmengine's stock hook writes the
checkpoint and the ``last_checkpoint`` pointer in place, so a run killed at the wrong moment
leaves a truncated file that a later ``--resume`` trips over. Ours writes each file under a
temporary name and renames it into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import HOOKS, MODEL_WRAPPERS

from ..fsutil import atomic_write
from .checkpoints import LAST_CHECKPOINT


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
    """

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict) -> None:
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
        except BaseException:
            if is_main_process():
                Path(tmp).unlink(missing_ok=True)
            raise
        atomic_write(Path(runner.work_dir) / LAST_CHECKPOINT, final.encode())
        if stale is not None and stale != step:
            old = os.path.join(self.out_dir, self.filename_tmpl.format(stale))
            if os.path.isfile(old):
                os.remove(old)


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
