"""runtime.distributed names the rank and host behind a failed rendezvous or collective.

Real processes with gloo on this machine; the two-node version (a killed node, addresses on a bridge)
is tests/slurm/test_two_node_stages.py::test_a_lost_node_is_named_and_the_requeued_job_resumes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime import distributed
from runtime.distributed import Peer, free_port

REPO = Path(__file__).resolve().parents[2]

# Both ranks join; rank 1 then dies; rank 0's all_reduce fails and prints what describe_failure says.
LOSE_A_RANK = textwrap.dedent("""
    import os, time, torch, torch.distributed as dist
    from runtime import distributed
    info = distributed.setup(timeout_minutes=0.5)
    print("peers", [(p.rank, p.host) for p in distributed.peers()], flush=True)
    if info.rank == 1:
        os._exit(1)
    time.sleep(1)
    try:
        dist.all_reduce(torch.ones(4))
    except Exception as err:
        print("NOTE", distributed.describe_failure(err), flush=True)
""")


def _rank_env(rank: int, port: int, **extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2",
                LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


@pytest.mark.distributed
def test_a_collective_that_loses_a_rank_names_it(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", LOSE_A_RANK], env=_rank_env(r, port), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    out = [p.communicate(timeout=120)[0] for p in procs]
    host = socket.gethostname()
    assert f"peers [(0, '{host}'), (1, '{host}')]" in out[0], out[0]
    note = next(line for line in out[0].splitlines() if line.startswith("NOTE "))
    # The peer's address is the loopback here: the other rank on this very host is the one lost.
    assert note.startswith(f"NOTE rank 0/2 on {host} lost contact with rank 1 on {host}: "), note
    assert "GLHF" not in note and ".cc:" not in note, note


@pytest.mark.distributed
def test_a_rank_that_cannot_reach_the_master_says_who_and_where(tmp_path):
    port = free_port()  # nobody listens: rank 1 waits for rank 0's store, which never comes
    code = "from runtime import distributed; distributed.setup(timeout_minutes=0.05)"
    done = subprocess.run([sys.executable, "-c", code], env=_rank_env(1, port, SLURM_JOB_NUM_NODES="2"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"runtime.distributed.RendezvousError: rank 1/2 on {socket.gethostname()} could not join "
                           f"the process group at 127.0.0.1:{port} within 0.05 min"), last
    assert "MASTER_ADDR is this node itself" in last and "first node" in last, last


@pytest.fixture
def two_hosts(monkeypatch):
    """The peer table a 2 nodes x 2 tasks job gathers (set directly: formatting needs no processes)."""
    table = (Peer(0, "node-a", ("10.0.0.2",)), Peer(1, "node-a", ("10.0.0.2",)),
             Peer(2, "node-b", ("10.0.0.3",)), Peer(3, "node-b", ("10.0.0.3",)))
    monkeypatch.setattr(distributed, "_peers", table)
    monkeypatch.setattr(distributed, "_own_rank", 1)
    return table


def test_describe_failure_names_the_ranks_of_the_quoted_address(two_hosts):
    err = RuntimeError("[/x/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.3]:40312: Connection reset by peer. "
                       "This is typically caused by a remote worker hanging. GLHF!")
    assert distributed.describe_failure(err) == ("rank 1/4 on node-a lost contact with ranks 2, 3 on node-b "
                                                 "(10.0.0.3): Read error [10.0.0.3]:40312: Connection reset by peer")
    timeout = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv")
    assert distributed.describe_failure(timeout) == (
        "rank 1/4 on node-a: a collective operation timed out (Timed out waiting 1800000ms for recv); a rank "
        "stopped answering. The job's ranks: ranks 0, 1 on node-a (10.0.0.2); ranks 2, 3 on node-b (10.0.0.3)")
    # Not from torch.distributed, or a user error: nothing to add.
    assert distributed.describe_failure(RuntimeError("CUDA out of memory")) is None
    assert distributed.describe_failure(ValueError("bad NCCL_SOCKET_IFNAME in the profile")) is None


def test_hsdp_shard_groups_are_listed_with_their_nodes(two_hosts):
    from launch.train.strategies import shard_groups_note

    assert shard_groups_note([[0, 1], [2, 3]]) == ("HSDP: 2 replicas, each sharded over 2 ranks: ranks 0, 1 on "
                                                   "node-a; ranks 2, 3 on node-b")
    crossing = shard_groups_note([[0, 2], [1, 3]])
    assert "ranks 0, 2 on node-a, node-b" in crossing and "Warning: 2 shard group(s) span several nodes" in crossing
