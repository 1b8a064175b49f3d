"""Process-group set-up shared by every distributed stage (train, sample, evaluate).

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), under SLURM's srun (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, master = first host of SLURM_JOB_NODELIST) and as a single plain
process (world size 1, no process group needed).

Once the group is up every rank learns where the others run (`peers()`: host name and addresses per
rank), so that a failed collective can say which rank and node was lost (`describe_failure()`).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
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


class RendezvousError(RuntimeError):
    """The process group could not be set up: the message names this rank, its host and the master."""


def _init_group(backend: str, rank: int, world_size: int, device: torch.device, timeout_minutes: float) -> None:
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, TimeoutError, OSError) as err:
        master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        hint = ""
        if _is_loopback(os.environ.get("MASTER_ADDR", "")) and int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1:
            hint = (" MASTER_ADDR is this node itself, but the job has several nodes: it must name the first node "
                    "(unset it; the job script sets it)")
        raise RendezvousError(f"rank {rank}/{world_size} on {socket.gethostname()} could not join the process group "
                              f"at {master} within {timeout_minutes:g} min: {_first_line(err)}.{hint}") from err


def setup(backend: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise torch.distributed when launched with several processes; return rank information.

    The backend defaults to NCCL on CUDA machines and gloo otherwise. Safe to call twice. A rank
    that cannot join within `timeout_minutes` raises RendezvousError naming itself and the master.
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
        _init_group(backend or ("nccl" if device.type == "cuda" else "gloo"), rank, world_size, device,
                    timeout_minutes)
        _exchange_peers(rank, world_size, device)
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


# ------------------------------------------------------------------------------------------------
# Who runs where, for error messages

@dataclasses.dataclass(frozen=True)
class Peer:
    """One rank of the process group: its host name and the addresses others may see it under."""

    rank: int
    host: str
    addresses: tuple[str, ...]


_PEER_BYTES = 256
_peers: tuple[Peer, ...] = ()
_own_rank = 0
_IPV4 = re.compile(r"(?<![\d.])((?:\d{1,3}\.){3}\d{1,3})(?![\d.])")


def _is_loopback(address: str) -> bool:
    return address in ("localhost", "::1") or address.startswith("127.")


def _own_addresses() -> list[str]:
    """This host's addresses as its peers would print them: its name's address and the route to the master."""
    found = []
    try:
        found.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            # A UDP connect only picks the route (and so the source address); it sends nothing.
            probe.connect((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
            found.append(probe.getsockname()[0])
    except (OSError, KeyError, ValueError):
        pass
    return [a for a in dict.fromkeys(found) if not _is_loopback(a)]


def _exchange_peers(rank: int, world_size: int, device: torch.device) -> None:
    """all_gather every rank's host name and addresses (fixed-size byte tensors: nothing is unpickled)."""
    global _peers, _own_rank
    text = " ".join([socket.gethostname(), *_own_addresses()]).encode()[:_PEER_BYTES]
    mine = torch.zeros(_PEER_BYTES, dtype=torch.uint8)
    mine[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    parts = [torch.empty_like(mine, device=device) for _ in range(world_size)]
    dist.all_gather(parts, mine.to(device))
    table = []
    for r, part in enumerate(parts):
        words = bytes(part.cpu().tolist()).rstrip(b"\0").decode(errors="replace").split()
        table.append(Peer(r, words[0] if words else "?", tuple(words[1:])))
    _peers, _own_rank = tuple(table), rank


def peers() -> tuple[Peer, ...]:
    """Every rank's host and addresses, gathered when `setup()` made the process group (empty before)."""
    return _peers


def _ranks_by_host(chosen: list[Peer] | tuple[Peer, ...]) -> str:
    """'ranks 0, 1 on adm-node1 (10.0.0.2); rank 2 on adm-node2 (10.0.0.3)' for the given peers."""
    hosts: dict[str, list[Peer]] = {}
    for peer in chosen:
        hosts.setdefault(peer.host, []).append(peer)
    parts = []
    for host, group in hosts.items():
        ranks = ", ".join(str(p.rank) for p in group)
        where = f" ({', '.join(group[0].addresses)})" if group[0].addresses else ""
        parts.append(f"rank{'s' if len(group) > 1 else ''} {ranks} on {host}{where}")
    return "; ".join(parts)


_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")  # gloo's "[.../pair.cc:537] "


def _first_line(err: BaseException) -> str:
    """The first sentence of an error: without gloo's source location and its generic advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = _SOURCE_PREFIX.sub("", lines[0]) if lines else type(err).__name__
    return first.split(". This is typically")[0].rstrip(".")[:400]


def _looks_distributed(err: BaseException, text: str) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return any(key in text for key in ("gloo", "NCCL", "c10d", "ProcessGroup", "Connection reset by peer",
                                       "Connection closed by peer", "Broken pipe"))


def describe_failure(err: BaseException) -> str | None:
    """A sentence naming the rank(s) and node(s) an error of a collective points at, or None.

    For a process that ran in a process group of several ranks, when `err` came from torch.distributed
    (gloo / NCCL / c10d): the peers whose address the error quotes ("lost contact with rank 1 on
    adm-node2 (10.1.2.3)"), or, when it quotes none (a timeout), every rank by node.
    """
    if len(_peers) < 2 or not isinstance(err, (RuntimeError, OSError, TimeoutError)):
        return None  # a user error (ValueError, ...) says what it needs to by itself
    text = f"{type(err).__name__}: {err}"
    if not _looks_distributed(err, text):
        return None
    me = _peers[_own_rank]
    where = f"rank {me.rank}/{len(_peers)} on {me.host}"
    quoted = set(_IPV4.findall(text))
    lost = [p for p in _peers if p.rank != me.rank
            and (quoted & set(p.addresses) or (p.host == me.host and any(map(_is_loopback, quoted))))]
    if lost:
        return f"{where} lost contact with {_ranks_by_host(lost)}: {_first_line(err)}"
    what = "timed out" if "timed out" in text.lower() or "timeout" in text.lower() else "failed"
    return (f"{where}: a collective operation {what} ({_first_line(err)}); a rank stopped answering. "
            f"The job's ranks: {_ranks_by_host(_peers)}")
