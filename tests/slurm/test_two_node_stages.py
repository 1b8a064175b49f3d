"""The stages as a user submits them to two nodes (`slurm/local-cluster.sh start --nodes 2`), against the same
work on one node: sharded training (FSDP2, HSDP, DeepSpeed ZeRO-2), a preempted training job, a node that
dies mid-training, `adm sample` and `adm evaluate`.

Every comparison is exact (CPU, float32, gloo): splitting the same ranks over two machines must not change
a bit. The one-node references are run once per module (the DDP one once per session, conftest.py), and
the runs that do not depend on each other are submitted together so that SLURM overlaps them.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm import jobs

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
STATE = Path(os.environ.get("ADM_SLURM_STATE", "/var/lib/adm-local-slurm"))
# Metrics that depend only on the numbers (not on the clock) and must agree exactly.
EXACT_SCALARS = ("train/loss", "train/mse", "train/vb", "train/grad_norm")
# What users run: loader workers (their seeds and positions are restored on resume) and dropout (the
# per-rank torch RNG is restored too). The tiny 8-step run of conftest.py otherwise.
USERS = ("--set", "num_workers=2", "model.dropout=0.1")


def job_id_of(output: str) -> str:
    match = re.search(r"submitted job (\d+)", output)
    assert match, output
    return match.group(1)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard curves in EXACT_SCALARS: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in EXACT_SCALARS}


@pytest.fixture(scope="module")
def small_shards(make_shards) -> Path:
    """conftest.py's 32 digits in 8 shards of 4: enough for 4 ranks x 2 loader workers (a shard per reader)."""
    return make_shards("two-node-data", 4)


@pytest.fixture(scope="module")
def same_run(same_weights):
    """`same_run(a, b)`: identical curves (every logged step) and bit-identical final weights and EMA."""
    def check(run_a: Path, run_b: Path) -> None:
        curves_a, curves_b = scalars(run_a), scalars(run_b)
        assert [s for s, _ in curves_a["train/loss"]] == list(range(1, 9))
        assert curves_a == curves_b
        same_weights(run_a, run_b)
    return check


def submit_train(adm, root: Path, shards: Path, train_args, *extra: str, nodes: int, tasks: int) -> str:
    """`adm submit train` (without --wait) into root/run, logs in root/logs; returns the job id."""
    root.mkdir(parents=True, exist_ok=True)
    out = adm("submit", "train", "--run-dir", str(root / "run"), "--data", str(shards), *train_args, *extra,
              "--cluster", "local", "--nodes", str(nodes), "--tasks-per-node", str(tasks),
              "--log-dir", str(root / "logs"), cwd=root,
              env={"TORCH_EXTENSIONS_DIR": str(root / "torch_extensions")})  # DeepSpeed JIT builds stay apart
    assert out.returncode == 0, out.stdout + out.stderr
    return job_id_of(out.stdout)


def rank_log(root: Path, job_id: str, rank: int) -> str:
    return (root / "logs" / f"{job_id}_{rank}_log.out").read_text(errors="replace")


def wait_all(submitted: dict[str, tuple[Path, str]], timeout_s: float = 900) -> None:
    """Wait for every job; fail with the log of the first that did not complete."""
    final = jobs.wait([job for _, job in submitted.values()], poll_s=1.0, timeout_s=timeout_s)
    for name, (root, job) in submitted.items():
        assert final[job] == jobs.DONE, f"{name}: job {job} ended {final[job]}:\n{rank_log(root, job, 0)[-3000:]}"


# ------------------------------------------------------------------------------------ sharded training
# strategy -> (its options, tasks per node on two nodes; 0: only the one-node run). The one-node reference has
# as many processes in all. HSDP shards inside a node and replicates across nodes, so it needs two tasks per
# node; its reference (the same 2 x 2 mesh on one machine) runs under torchrun, as the local cluster's nodes
# offer 2 CPUs, not 4. DDP on one node is the reference of the preempted and the failed-node runs.
STRATEGIES = {
    "fsdp": (("--strategy", "fsdp"), 1),
    "hsdp": (("--strategy", "fsdp", "--set", "fsdp_shard_size=2"), 2),
    "zero2": (("--strategy", "deepspeed", "--set", "zero_stage=2"), 1),
    "ddp": (("--strategy", "ddp"), 0),
}


def torchrun_train(root: Path, shards: Path, train_args, *extra: str, nproc: int) -> subprocess.Popen:
    """`torchrun --nproc_per_node N -m launch.cli train ...` on this machine: one node, N processes."""
    from runtime.distributed import free_port

    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "launch.cli", "train", "--run-dir", str(root / "run"),
           "--data", str(shards), *train_args, *extra]
    return subprocess.Popen(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def strategy_runs(cluster, two_nodes, small_shards, train_args, adm, tmp_path_factory) -> dict[str, dict]:
    """Each strategy on two nodes and on one, all started at once: {strategy: {"two", "one", "two_job"}}.

    The two kinds of runs use all four CPUs of the two nodes together; SLURM runs them as they fit."""
    base = tmp_path_factory.mktemp("strategies")
    submitted, roots, local = {}, {}, None
    for name, (options, per_node) in STRATEGIES.items():
        extra = (*USERS, *options)
        roots[name] = {"two": base / f"{name}-two", "one": base / f"{name}-one"}
        if per_node:
            job = submit_train(adm, roots[name]["two"], small_shards, train_args, *extra, nodes=2, tasks=per_node)
            submitted[f"{name} on two nodes"] = (roots[name]["two"], job)
            roots[name]["two_job"] = job
        if per_node <= 1:
            submitted[f"{name} on one node"] = (roots[name]["one"], submit_train(
                adm, roots[name]["one"], small_shards, train_args, *extra, nodes=1, tasks=2))
        else:
            local = torchrun_train(roots[name]["one"], small_shards, train_args, *extra, nproc=2 * per_node)
    wait_all(submitted)
    if local is not None:
        output = local.communicate(timeout=600)[0]
        assert local.returncode == 0, output[-3000:]
    return roots


def check_placement(root: Path, job_id: str, per_node: int, hostnames) -> list[str]:
    """Ranks in blocks of `per_node` on the job's two nodes; returns the nodes in rank order."""
    details = jobs.show_job(job_id)
    nodes = hostnames(details["NodeList"])
    assert details["NumNodes"] == "2" and len(nodes) == 2, details
    for rank in range(2 * per_node):
        assert f"[adm] rank {rank}/{2 * per_node} on {nodes[rank // per_node]}:" in rank_log(root, job_id, rank)
    return nodes


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_sharded_training_on_two_nodes_matches_one_node(strategy, strategy_runs, same_run, hostnames):
    """FSDP2 and ZeRO-2 over 2 nodes x 1 task: the curves and final weights of 1 node x 2 tasks, bit for bit."""
    runs = strategy_runs[strategy]
    check_placement(runs["two"], runs["two_job"], 1, hostnames)
    log = (runs["two"] / "run" / "log.txt").read_text()
    kind = "deepspeed" if strategy == "zero2" else "fsdp"
    assert f"strategy {kind}, precision fp32, world size 2" in log, log
    same_run(runs["one"] / "run", runs["two"] / "run")


def test_hsdp_shards_within_each_node_and_replicates_across(strategy_runs, same_run, hostnames):
    """HSDP on 2 nodes x 2 tasks: each shard group is one node's two ranks; equal to 1 node x 4 tasks."""
    runs = strategy_runs["hsdp"]
    first, second = check_placement(runs["two"], runs["two_job"], 2, hostnames)
    log = (runs["two"] / "run" / "log.txt").read_text()
    assert "strategy fsdp, precision fp32, world size 4" in log, log
    assert f"HSDP: 2 replicas, each sharded over 2 ranks: ranks 0, 1 on {first}; ranks 2, 3 on {second}\n" in log, log
    assert "span several nodes" not in log
    one = (runs["one"] / "run" / "log.txt").read_text()
    assert re.search(r"HSDP: 2 replicas, each sharded over 2 ranks: ranks 0, 1 on (\S+); ranks 2, 3 on \1\n", one), one
    same_run(runs["one"] / "run", runs["two"] / "run")


# ------------------------------------------------------------------------------------ preemption
def wait_until(predicate, job_id: str, what: str, timeout_s: float = 180, allow_finished: bool = False):
    """Poll `predicate()` until it is truthy; fail fast if the job ended first (unless `allow_finished`)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if not allow_finished:
            state = jobs.states([job_id])[job_id]
            assert not jobs.is_finished(state), f"job {job_id} ended {state} before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f}s"
        time.sleep(0.2)
    return value


def test_preempted_two_node_training_resumes_on_both_nodes(cluster, two_nodes, small_shards, train_args, adm,
                                                           tmp_path, strategy_runs, same_run, hostnames):
    """`scancel --signal=USR1` (a preempting scheduler's signal) on a 2-node job: both ranks stop at the same
    step after a checkpoint, rank 0 requeues, both nodes resume from it, and the run (loader workers, dropout)
    ends equal to the uninterrupted one on one node: every logged loss and the weights, bit for bit."""
    job = submit_train(adm, tmp_path, small_shards, train_args, *USERS, nodes=2, tasks=1)
    wait_until(lambda: (tmp_path / "run" / "checkpoints" / "step_000000002").is_dir(), job, "checkpoint of step 2")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    final = jobs.wait([job], poll_s=1.0, timeout_s=300)
    first, second = hostnames(jobs.show_job(job)["NodeList"])
    logs = [rank_log(tmp_path, job, rank) for rank in (0, 1)]
    assert final[job] == jobs.DONE, logs[0][-3000:]
    assert int(jobs.show_job(job)["Restarts"]) >= 1
    # The signal reached the task on each node, and the job started again on both.
    for rank, (host, log) in enumerate(zip((first, second), logs)):
        assert f"[preemption] rank {rank}: SIGUSR1: checkpoint and requeue" in log, log[-3000:]
        assert log.count(f"[adm] rank {rank}/2 on {host}:") == 2, log[-3000:]
    train_log = (tmp_path / "run" / "log.txt").read_text()
    stopped_at = int(re.search(r"stopping at step (\d+) after a stop signal \(SIGUSR1\)", train_log).group(1))
    assert 2 <= stopped_at < 8 and f"(step {stopped_at})" in train_log, train_log
    same_run(strategy_runs["ddp"]["one"] / "run", tmp_path / "run")


# ------------------------------------------------------------------------------------ a node fails
def node_problem(node: str) -> str | None:
    if os.geteuid() != 0:
        return "needs root: it kills a node's processes and restarts its slurmd"
    if not Path(f"/run/netns/{node}").exists():
        return f"{node} is not a network namespace of slurm/local-cluster.sh start --nodes 2"
    return None


def kill_node(node: str) -> list[int]:
    """What a power cut does to a node of the local cluster: SIGKILL to everything in its namespace."""
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True,
                                           check=True).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def test_a_lost_node_is_named_and_the_requeued_job_resumes(cluster, two_nodes, small_shards, train_args, adm,
                                                           tmp_path, strategy_runs, same_run, hostnames):
    """The second node of a training job dies (slurmd, its step and the rank on it, killed): rank 0 says at once
    which rank and node it lost; SLURM marks the node DOWN and requeues the job (--requeue); once the node is
    back the job resumes from the last checkpoint on both nodes and ends equal to the uninterrupted run."""
    job = submit_train(adm, tmp_path, small_shards, train_args, *USERS, nodes=2, tasks=1)
    wait_until(lambda: (tmp_path / "run" / "checkpoints" / "step_000000002").is_dir(), job, "checkpoint of step 2")
    first, second = hostnames(jobs.show_job(job)["NodeList"])
    problem = node_problem(second)
    if problem:
        jobs.cancel([job])
        pytest.skip(problem)
    try:
        assert kill_node(second)
        lost = f"[adm] rank 0/2 on {first} lost contact with rank 1 on {second} ("
        wait_until(lambda: lost in rank_log(tmp_path, job, 0), job, "message about the lost node", timeout_s=60)
        log = rank_log(tmp_path, job, 0)
        assert "PeerLost: rank 0/2 on" in log and "SLURM requeues the job once it marks the node DOWN" in log
        # SLURM's side: the node stops answering, is set DOWN (SlurmdTimeout), and the job is requeued.
        wait_until(lambda: int(jobs.show_job(job).get("Restarts", 0)) >= 1, job, "requeue", timeout_s=180,
                   allow_finished=True)
        reasons = subprocess.run(["sinfo", "-h", "-R", "-o", "%n %E"], capture_output=True, text=True).stdout
        assert f"{second} Not responding" in reasons, reasons
        ctld = (STATE / "slurmctld.log").read_text(errors="replace")
        assert f"requeue job JobId={job} due to failure of node {second}" in ctld
    finally:
        # Bring the node back (start is idempotent: it restarts the dead slurmd and resumes the node). With
        # OMP_NUM_THREADS set, as in a job, the configuration must stay the same: no daemon restarts.
        restart = subprocess.run(["bash", str(SCRIPT), "start", "--nodes", "2"], capture_output=True, text=True,
                                 timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert "restarting the daemons" not in restart.stdout, restart.stdout
    final = jobs.wait([job], poll_s=1.0, timeout_s=300)
    assert final[job] == jobs.DONE, rank_log(tmp_path, job, 0)[-3000:]
    resumed = re.findall(r"resumed from \S+ \(step (\d+)\)", (tmp_path / "run" / "log.txt").read_text())
    assert len(resumed) == 1 and int(resumed[0]) >= 2, resumed
    assert rank_log(tmp_path, job, 1).count(f"[adm] rank 1/2 on {second}:") == 2
    same_run(strategy_runs["ddp"]["one"] / "run", tmp_path / "run")


# ------------------------------------------------------------------------------------ sample, evaluate
SAMPLES = 8


def local_adm(*args: str, cwd: Path) -> subprocess.Popen:
    """`adm ARGS` in one process here (started, not waited for)."""
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    output = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, output[-3000:]
    return output


def submit_stage(adm, root: Path, stage: str, *args: str, nodes: int = 2, tasks: int = 1) -> str:
    """`adm submit STAGE ARGS` on 2 nodes x 1 task (no --wait), logs in root/logs; returns the job id."""
    out = adm("submit", stage, *args, "--cluster", "local", "--nodes", str(nodes), "--tasks-per-node", str(tasks),
              "--log-dir", str(root / "logs"), cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    return job_id_of(out.stdout)


@pytest.fixture(scope="module")
def sampled(cluster, two_nodes, shards, uninterrupted_run, adm, tmp_path_factory) -> dict:
    """Guided samples of the tiny model on 2 nodes and in one process, and (made meanwhile, here) a reference
    batch and domain-classifier features of the shards for `adm evaluate`."""
    import torch

    from diffusion_core import presets
    from launch.model_io import save_model_file

    root = tmp_path_factory.mktemp("two-node-sample")
    preset = presets.get("tiny-classifier")
    classifier = preset.build()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a fresh ADM classifier has zero output layers: perturb it so guidance does something
        for p in classifier.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    clf = save_model_file(root / "classifier.pt", classifier.state_dict(), preset)
    args = ["--model", str(uninterrupted_run["run_dir"]), "--classifier", str(clf), "--classifier-scale", "4",
            "--num-samples", str(SAMPLES), "--batch-size", "2", "--steps", "4", "--shard-size", "2", "--seed", "3",
            "--no-progress"]
    job = submit_stage(adm, root, "sample", *args, "--out", str(root / "two"))
    local = [local_adm("sample", *args, "--out", str(root / "one"), cwd=root),
             local_adm("make-reference", str(shards), "--size", "16", "--num-images", "32", "--no-stats",
                       "--out", str(root / "reference.npz"), cwd=root),
             local_adm("evaluate", "--train-classifier", str(shards), "--image-size", "16", "--epochs", "2",
                       "--out", str(root / "features.pt"), cwd=root)]
    for proc in local:
        finish(proc)
    wait_all({"sample on two nodes": (root, job)})
    name = f"samples_{SAMPLES}x16x16x3.npz"
    return {"root": root, "job": job, "two": root / "two" / name, "one": root / "one" / name,
            "reference": root / "reference.npz", "features": root / "features.pt"}


def test_sampling_on_two_nodes_writes_the_one_process_file(sampled, hostnames):
    """`adm submit sample --nodes 2`: the same .npz as `adm sample` in one process, byte for byte."""
    check_placement(sampled["root"], sampled["job"], 1, hostnames)
    assert sampled["two"].read_bytes() == sampled["one"].read_bytes()
    # Only global rank 0 writes the outputs: one set of files, no per-node copies.
    assert sorted(p.name for p in sampled["two"].parent.iterdir()) == sorted(
        p.name for p in sampled["one"].parent.iterdir())


def test_evaluation_on_two_nodes_gives_the_one_process_metrics(sampled, adm, hostnames):
    """`adm submit evaluate --nodes 2` (domain-classifier features): the metrics of 1 node x 2 tasks bit for bit,
    and those of one process up to float64 round-off (FID statistics are float64 sums all-reduced over the
    ranks, so a different number of ranks adds them in another order: evaluation/evaluate.py)."""
    root = sampled["root"]
    args = [str(sampled["reference"]), str(sampled["two"]), "--features", f"classifier:{sampled['features']}",
            "--batch-size", "8"]
    two = submit_stage(adm, root, "evaluate", *args, "--out", str(root / "eval-two"))
    one_node = submit_stage(adm, root, "evaluate", *args, "--out", str(root / "eval-one-node"), nodes=1, tasks=2)
    finish(local_adm("evaluate", *args, "--out", str(root / "eval-one"), cwd=root))
    wait_all({"evaluate on two nodes": (root, two), "evaluate on one node": (root, one_node)})
    check_placement(root, two, 1, hostnames)
    metrics = {name: json.loads((root / f"eval-{name}" / "metrics.json").read_text())
               for name in ("two", "one-node", "one")}
    assert [metrics[n]["settings"]["world_size"] for n in ("two", "one-node", "one")] == [2, 2, 1]
    assert metrics["two"]["metrics"] == metrics["one-node"]["metrics"]
    single = metrics["one"]["metrics"]
    assert single["fid"] is not None and single["precision"] is not None
    for key, value in metrics["two"]["metrics"].items():
        assert value == (single[key] if value is None else pytest.approx(single[key], rel=1e-12, abs=1e-15)), key
    # Only rank 0 prints the metrics.
    log0, log1 = rank_log(root, two, 0), rank_log(root, two, 1)
    assert len(re.findall(r"^FID: ", log0, re.M)) == 1 and "FID: " not in log1, log0
