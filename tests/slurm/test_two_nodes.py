"""Two SLURM nodes (`slurm/local-cluster.sh start --nodes 2`): the rendezvous really crosses machines.

Each node of the local two-node cluster is a slurmd in its own network and UTS namespace with its own
address on a private bridge, so a job's tasks on adm-node1 and adm-node2 reach each other only through
the bridge addresses, as on two real machines: a master address of `localhost` cannot work there.

The `slurm` tests skip, saying so, on a one-node cluster. test_start_and_stop_leave_nothing_behind
starts and stops a two-node cluster itself; it runs only when no cluster is up (it would otherwise
take down the one the other tests use), so .ci/run runs it before it starts the cluster for the rest.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm import jobs

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
STATE = Path(os.environ.get("ADM_SLURM_STATE", "/var/lib/adm-local-slurm"))

CHECK_LINE = re.compile(r"rank (\d+)/(\d+) local (\d+) on (\S+) \((\S+), (\w+)\), master (\S+):(\d+): "
                        r"all_reduce (\S+) \(expected (\S+)\)")


@pytest.mark.slurm
def test_check_all_reduces_across_two_nodes(cluster, two_nodes, tmp_path, hostnames):
    """`python -m slurm.check --nodes 2 --tasks-per-node 2`: 4 ranks on 2 hosts, master = the first node."""
    out = subprocess.run([sys.executable, "-m", "slurm.check", "--cluster", cluster, "--nodes", "2",
                          "--tasks-per-node", "2", "--log-dir", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    lines = [CHECK_LINE.search(line) for line in out.stdout.splitlines()]
    tasks = sorted((int(m[1]), int(m[2]), int(m[3]), m[4], m[6], m[7], float(m[9]), float(m[10]))
                   for m in lines if m)
    assert len(tasks) == 4, out.stdout
    allocated = hostnames(jobs.show_job(job_id)["NodeList"])
    assert len(allocated) == 2 and set(allocated) <= set(two_nodes)
    first = allocated[0]
    for rank, world, local, host, backend, master, total, expected in tasks:
        assert world == 4 and backend == "gloo" and total == expected == 10, out.stdout
        # SLURM's block distribution: ranks 0, 1 on the first node, 2, 3 on the second; local rank = rank on the node.
        assert host == allocated[rank // 2] and local == rank % 2, out.stdout
        # The rendezvous is the first node of SLURM_JOB_NODELIST, by name, never the loopback.
        assert master == first and master != "localhost" and not master.startswith("127."), out.stdout
    assert len({t[3] for t in tasks}) == 2
    assert "OK: 4 tasks on 2 node(s) agree" in out.stdout
    assert jobs.show_job(job_id)["JobState"] == "COMPLETED"


@pytest.mark.slurm
def test_training_on_two_nodes_matches_the_one_node_run(cluster, two_nodes, shards, tmp_path, adm, train_args,
                                                         hostnames, uninterrupted_run, same_weights):
    """`adm submit train --nodes 2 --tasks-per-node 1`: DDP across the nodes ends with bit-identical weights
    (and EMA) to the same 2-process run on one node."""
    out = adm("submit", "train", "--run-dir", str(tmp_path / "run"), "--data", str(shards), *train_args,
              "--cluster", cluster, "--nodes", "2", "--tasks-per-node", "1", "--log-dir", str(tmp_path / "logs"),
              "--wait", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    details = jobs.show_job(job_id)
    assert details["JobState"] == "COMPLETED" and details["NumNodes"] == "2" and details["NumTasks"] == "2"
    first, second = hostnames(details["NodeList"])
    rank0 = (tmp_path / "logs" / f"{job_id}_0_log.out").read_text()
    rank1 = (tmp_path / "logs" / f"{job_id}_1_log.out").read_text()
    assert f"rendezvous at {first}:" in rank0 and "world size 2" in rank0, rank0[-3000:]
    assert f"rank 0/2 on {first}:" in rank0 and f"rank 1/2 on {second}:" in rank1, rank1[-3000:]
    same_weights(uninterrupted_run["run_dir"], tmp_path / "run")


# One task per node sets up torch.distributed through runtime.distributed (MASTER_ADDR from SLURM's node
# list unless the environment already has one) with a 3 s timeout, and all-reduces its rank.
RENDEZVOUS = """
import os, socket, time
import torch
import torch.distributed as dist
from runtime import distributed

start = time.monotonic()
info = distributed.setup(timeout_minutes=0.05)
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value)
print(f"rank {info.rank}/{info.world_size} on {socket.gethostname()} master {os.environ['MASTER_ADDR']}: "
      f"sum {value.item():g} after {time.monotonic() - start:.1f}s", flush=True)
distributed.cleanup()
"""


def srun_rendezvous(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "rendezvous.py"
    script.write_text(RENDEZVOUS)
    full_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    full_env.update(env, OMP_NUM_THREADS="1")
    started = time.monotonic()
    out = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--time=2", "--kill-on-bad-exit=1",
                          "--job-name=adm-rdzv-test", sys.executable, str(script)],
                         cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - started


@pytest.mark.slurm
def test_rendezvous_crosses_the_nodes_and_fails_fast_with_a_localhost_master(cluster, two_nodes, tmp_path):
    ok, _ = srun_rendezvous(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = sorted(line for line in ok.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, ok.stdout + ok.stderr
    hosts = [re.search(r" on (\S+) ", line).group(1) for line in lines]
    masters = {re.search(r" master (\S+):", line).group(1) for line in lines}
    assert len(set(hosts)) == 2 and masters == {hosts[0]}, lines
    assert all("sum 3" in line for line in lines), lines

    # The same tasks told to meet at localhost: rank 1's localhost is its own node, where nobody listens.
    bad, seconds = srun_rendezvous(tmp_path, MASTER_ADDR="localhost")
    text = bad.stdout + bad.stderr
    assert bad.returncode != 0, text
    assert "sum 3" not in text
    assert "localhost" in text and ("timed out" in text or "refused" in text.lower()), text[-3000:]
    assert seconds < 60, f"took {seconds:.0f}s to fail"


# ------------------------------------------------------------------------------------- start and stop
SLURM_DAEMONS = ("slurmctld", "slurmd", "slurmstepd", "munged")
WATCHED = ("/etc", "/run", "/var/lib", "/var/log", "/var/spool")


def daemons() -> set[tuple[int, str]]:
    """Live (not zombie) SLURM and munge processes."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
        if name in SLURM_DAEMONS and state != "Z":
            found.add((int(pid), name))
    return found


def machine_state() -> dict[str, set]:
    """What start/stop may touch: namespaces, links, mounts, daemons, files under WATCHED and the state folder."""
    files = set()
    for top in WATCHED:
        for root, dirs, names in os.walk(top):
            files.update(os.path.join(root, n) for n in dirs + names)
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    with open("/etc/hosts") as f:
        hosts = set(f.read().splitlines())
    return {"files": files, "mounts": mounts, "daemons": {name for _, name in daemons()}, "hosts": hosts,
            "links": {line.split(": ")[1].split("@")[0] for line in links.splitlines()},
            "netns": set(netns.split()), "routes": set(subprocess.run(["ip", "route"], capture_output=True,
                                                                      text=True).stdout.splitlines())}


def lifecycle_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (it starts and stops slurm/local-cluster.sh)"
    for tool in ("ip", "nsenter", "unshare", "slurmctld", "slurmd", "munged", "srun"):
        if shutil.which(tool) is None:
            return f"{tool} not found: needs iproute2, util-linux, slurm-wlm and munge (slurm/local-cluster.sh install)"
    running = sorted(name for _, name in daemons() if name != "munged")
    if running:
        return (f"a SLURM cluster is up ({', '.join(running)} running): this test starts and stops the local "
                "cluster itself and would take that one down; run it before `slurm/local-cluster.sh start` "
                "(.ci/run does)")
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if conf.exists() and "written by adm-guided slurm/local-cluster.sh" not in conf.read_text():
        return f"{conf} belongs to a real SLURM installation"
    return None


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, **(env or {})))


def settle(check, timeout_s: float = 10.0):
    """Poll `check()` until it returns something falsy (exited daemons take a moment to be reaped)."""
    deadline = time.monotonic() + timeout_s
    while (left := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_start_and_stop_leave_nothing_behind(tmp_path):
    """`start --nodes 2` then `stop` leaves no namespace, link, mount, daemon, route or file of its own.

    Also: the range must be free (a route into it is refused before anything is made), and the two nodes
    answer `srun -N2 hostname` with their own names.
    """
    problem = lifecycle_problem()
    if problem:
        pytest.skip(problem)
    # A cluster that died without 'stop' (killed daemons, a machine image saved while one ran) leaves its state
    # and files; 'stop' is how they go, and 'start' must not be held up by that cluster's jobs.
    run_script("stop")
    before = machine_state()
    try:
        # Refused: a route (a local blackhole, it sends nothing) already covers part of the range.
        subprocess.run(["ip", "route", "add", "blackhole", "10.149.99.0/25"], check=True)
        try:
            refused = run_script("start", "--nodes", "2", env={"ADM_SLURM_SUBNET": "10.149.99"})
        finally:
            subprocess.run(["ip", "route", "del", "blackhole", "10.149.99.0/25"], check=True)
        assert refused.returncode != 0 and "already routed" in refused.stderr, refused.stdout + refused.stderr
        assert machine_state() == before, "a refused start changed the machine"

        started = run_script("start", "--nodes", "2")
        assert started.returncode == 0, started.stdout + started.stderr
        up = machine_state()
        assert {"adm-node1", "adm-node2"} <= up["netns"]
        assert {"admslurm0", "admslurm-h1", "admslurm-h2"} <= up["links"]
        assert {"slurmctld", "slurmd"} <= up["daemons"]
        assert up["hosts"] == before["hosts"], "the host's /etc/hosts changed"
        try:
            names = subprocess.run(["srun", "--nodes=2", "--time=1", "hostname"], capture_output=True, text=True,
                                   timeout=60, cwd=tmp_path)
        except subprocess.TimeoutExpired:
            queue = subprocess.run(["squeue", "-o", "%i %T %R %N"], capture_output=True, text=True).stdout
            pytest.fail(f"srun -N2 hostname did not run within 60 s; the queue:\n{queue}")
        assert sorted(names.stdout.split()) == ["adm-node1", "adm-node2"], names.stdout + names.stderr
        status = run_script("status")
        assert status.returncode == 0 and "adm-node1" in status.stdout and "10.149.14.3" in status.stdout

        # A controller that dies holding jobs: 'start' brings up a fresh one whose queue is empty, not one
        # that recovers those jobs and queues every new job behind them.
        held = subprocess.run(["sbatch", "--nodes=2", "--time=5", "--requeue", "--wrap", "sleep 300"],
                              capture_output=True, text=True, cwd=tmp_path, check=True)
        assert "Submitted batch job" in held.stdout, held.stdout + held.stderr
        os.kill(int(Path(STATE / "slurmctld.pid").read_text()), signal.SIGKILL)
        restarted = run_script("start", "--nodes", "2")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
        assert queue.strip() == "", f"the dead controller's jobs came back:\n{queue}"
    finally:
        stopped = run_script("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not settle(lambda: {name for _, name in daemons()} - before["daemons"]), f"daemons left: {daemons()}"
    after = machine_state()
    for key in before:
        assert after[key] == before[key], (f"{key}: left behind {sorted(after[key] - before[key])}, "
                                           f"removed {sorted(before[key] - after[key])}")
