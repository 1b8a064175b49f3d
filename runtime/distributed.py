"""Process-group set-up shared by every distributed stage (train, sample, evaluate).

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), under SLURM's srun (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, master = first host of SLURM_JOB_NODELIST) and as a single plain
process (world size 1, no process group needed).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "node[01-04],other" -> "node01" without scontrol.
        first = nodelist.split(",")[0]
        if "[" in first:
            prefix, rest = first.split("[", 1)
            first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return first


def env_from_slurm() -> None:
    """Fill torchrun-style variables from SLURM's when running one task per GPU under srun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 and "SLURM_STEP_ID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "localhost")))
    # A port derived from the job id: every task computes the same one without talking.
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))


def setup(backend: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise torch.distributed when launched with several processes; return rank information.

    The backend defaults to NCCL on CUDA machines and gloo otherwise. Safe to call twice.
    """
    env_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    """Destroy the process group if one was created (at once: use `finish()` at a job's normal end)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(timeout_s: float = 300.0) -> None:
    """End a job's process group in step on every rank (a collective; the normal end of a job).

    A rank that tears its group down while a peer is still inside the last collective closes the
    connections under the peer's feet, and gloo can then abort the peer (SIGABRT) after all the
    job's work is done. So: a barrier (every collective complete), then a handshake through the
    group's store (every rank is past the barrier), then the other ranks destroy their groups, and
    rank 0, which hosts the store under srun, destroys its own last, once they said they are done
    (or after `timeout_s`). Call it only where every rank arrives (not on an error path: there,
    `cleanup()`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        dist.destroy_process_group()
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    # The same number on every rank: how many times each has finished a group on this store.
    key = f"adm/finish/{store.add(f'adm/finish/rank{rank}', 1)}"
    dist.barrier()
    try:
        store.add(f"{key}/past-barrier", 1)
        _wait_count(store, f"{key}/past-barrier", world, timeout_s)
        if rank != 0:
            dist.destroy_process_group()
            store.add(f"{key}/closed", 1)
            return
        _wait_count(store, f"{key}/closed", world - 1, timeout_s)
    except Exception as err:  # the work is done: a slow or lost peer must not fail the job now
        print(f"[distributed] rank {rank}: the ranks did not end in step ({err}); closing anyway",
              file=sys.stderr, flush=True)
    cleanup()


def _wait_count(store, key: str, target: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {store.add(key, 0)} of {target} ranks reached {key} within {timeout_s:.0f}s")
        time.sleep(0.01)


def barrier() -> None:
    """A barrier that is a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
