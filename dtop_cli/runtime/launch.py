"""Several training processes on one or more machines, through torch's own launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

#: Set by :func:`launch` for its workers: where rank 0 reports a run that stopped on purpose.
STATUS_FILE_ENV = "DTOP_STATUS_FILE"


def torchrun_command(child_args: list[str], *, gpus: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: Optional[str] = None, master_port: Optional[int] = None) -> list[str]:
    """The command that starts ``gpus`` processes per node running ``dtop <child_args>`` through
    torch's own launcher (torch.distributed.run, i.e. torchrun)."""
    if gpus < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UserError(f"bad process layout: --gpus {gpus} --nnodes {nnodes} --node-rank {node_rank}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}"]
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    if master_port:
        cmd.append(f"--master_port={master_port}")
    elif nnodes == 1:
        cmd.append(f"--master_port={_free_port()}")
    return cmd + ["-m", "dtop_cli.cli", *child_args, "--launcher", "pytorch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(child_args: list[str], status_file: Optional[Path] = None, **layout: Any) -> int:
    """Run the distributed job in the foreground; returns its exit code (0 = every rank done).

    SIGTERM sent to this process (a scheduler stopping the job) goes on to torchrun, which
    passes it to every worker: they stop together after a checkpoint. (Ctrl-C reaches them
    from the terminal directly.) ``status_file``: where rank 0 reports a run that stopped on
    purpose (:data:`STATUS_FILE_ENV`)."""
    cmd = torchrun_command(child_args, **layout)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, layout.get("gpus", 1)))))
    if status_file is not None:
        env[STATUS_FILE_ENV] = str(status_file)
    proc = subprocess.Popen(cmd, env=env)
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(s)),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda s, f: None)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def init_distributed(launcher: str, device: Optional[str]) -> Optional[str]:
    """Join the process group a launcher started (``--launcher pytorch``: torchrun's
    environment; ``slurm``: srun's) and return the device this process uses: its own GPU
    (``cuda:LOCAL_RANK``) when CUDA is there, else the CPU with the gloo backend. Without a
    launcher nothing happens and ``device`` comes back unchanged."""
    if launcher == "none":
        return device
    if launcher not in ("pytorch", "slurm"):
        raise UserError(f"--launcher must be none, pytorch or slurm (got {launcher})")
    import torch
    import torch.distributed as dist

    if launcher == "slurm":  # srun sets the SLURM_* variables; torch wants its own names
        os.environ.setdefault("RANK", os.environ.get("SLURM_PROCID", "0"))
        os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=False).stdout.split()
            os.environ["MASTER_ADDR"] = first[0] if first else nodes
    cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def is_rank0() -> bool:
    """Whether this process reports results (rank 0 of a torchrun job, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0
