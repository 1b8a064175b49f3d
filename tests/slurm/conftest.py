"""Fixtures for the SLURM tests: the local cluster (slurm/local-cluster.sh) must be up for `slurm` tests.

They skip only when SLURM is not installed here or the cluster is not running; CI installs and
starts it (.ci/run), so there they always run. They run on a cluster of one node (`start`) or more
(`start --nodes 2`, what CI starts): no test assumes that a node is called `hostname`; the tests that
need two nodes (test_two_nodes.py) skip on one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UP_STATES = {"idle", "mixed", "allocated", "completing"}

# Jobs must run this checkout's code: sbatch and srun hand the submitting environment on to every task
# (also inside the nodes of a multi-node local cluster), so put this repository first on PYTHONPATH, ahead
# of any installed or editable copy the job's python would otherwise import.
if str(REPO) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def cluster_problem() -> str | None:
    """Why the local cluster cannot be used, or None when it is up."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (sinfo/sbatch not on PATH): run slurm/local-cluster.sh install && start"
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not os.path.exists(conf):
        # Without a configuration file SLURM's commands look the controller up in DNS: do not ask.
        return f"the local SLURM cluster is not up (no {conf}): slurm/local-cluster.sh start"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = {s.strip("*~#") for s in out.stdout.split()}
    if out.returncode != 0 or not states & UP_STATES:
        return f"the local SLURM cluster is not up ({(out.stderr or out.stdout).strip()[:200]}): slurm/local-cluster.sh start"
    return None


@pytest.fixture(scope="session")
def cluster() -> str:
    """The name of the profile of the running local cluster ('local'); skips when it is down."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    return "local"


def up_nodes() -> list[str]:
    """Names of the cluster's nodes that can take jobs (sinfo), in SLURM's order."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    nodes = []
    for line in out.stdout.splitlines():
        name, _, state = line.partition(" ")
        if state.strip().strip("*~#") in UP_STATES and name not in nodes:
            nodes.append(name)
    return nodes


@pytest.fixture(scope="session")
def cluster_nodes(cluster) -> list[str]:
    """The up nodes of the local cluster: [`hostname`] for `start`, [adm-node1, adm-node2] for `start --nodes 2`."""
    return up_nodes()


@pytest.fixture(scope="session")
def two_nodes(cluster_nodes) -> list[str]:
    """The nodes of a cluster of two or more (`start --nodes 2`); skips on one node."""
    if len(cluster_nodes) < 2:
        pytest.skip(f"needs a cluster of 2 nodes, the one up has {len(cluster_nodes)} ({', '.join(cluster_nodes)}): "
                    "slurm/local-cluster.sh start --nodes 2")
    return cluster_nodes


def node_hostnames(nodelist: str) -> list[str]:
    """SLURM's node list ('adm-node[1-2]') as host names, in the order SLURM gives ranks to them."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture(scope="session")
def hostnames():
    """`hostnames(nodelist)`: SLURM's node list as host names, in rank order."""
    return node_hostnames


@pytest.fixture(scope="session")
def adm():
    """`adm(*args, cwd=..., env=...)`: the adm command line in a fresh process (as a user runs it)."""
    return run_adm


def run_adm(*args: str, cwd: Path | str = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `adm` command line in a fresh process (as a user would) and capture its output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# A tiny 2-process training run: the reference that requeued runs must reproduce exactly.
TRAIN_ARGS = ("--preset", "tiny-unet", "--set", "total_steps=8", "save_every=2", "log_every=1", "batch_size=4",
              "num_workers=0", "keep_last=10")


@pytest.fixture(scope="session")
def train_args() -> tuple[str, ...]:
    """Options of the tiny training run (8 steps, a checkpoint every 2) used by the requeue tests."""
    return TRAIN_ARGS


def miniature_shards(root: Path, samples_per_shard: int) -> Path:
    """Real shards of a miniature ImageNet (MNIST digits, 4 classes of 8 images, labels 0..3) under root."""
    from data.miniature import make_miniature_imagenet
    from data.prepare import prepare_imagenet

    src = make_miniature_imagenet(root / "src", 4, 8, bad_files=False)
    prepare_imagenet(src, root / "shards", samples_per_shard=samples_per_shard, allow_custom_classes=True)
    return root / "shards"


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory):
    """`make_shards(name, samples_per_shard)`: miniature_shards in a new temporary folder."""
    return lambda name, samples_per_shard: miniature_shards(tmp_path_factory.mktemp(name), samples_per_shard)


@pytest.fixture(scope="session")
def shards(make_shards) -> Path:
    """The 32 digits in 4 shards of 8."""
    return make_shards("slurm-data", 8)


@pytest.fixture(scope="session")
def uninterrupted_run(cluster, shards, tmp_path_factory) -> dict:
    """`adm submit train ... --tasks-per-node 2 --wait` on the local cluster: run dir, job id, output."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out = run_adm("submit", "train", "--run-dir", str(root / "run"), "--data", str(shards), *TRAIN_ARGS,
                  "--cluster", cluster, "--tasks-per-node", "2", "--log-dir", str(root / "logs"), "--wait", cwd=root)
    return {"run_dir": root / "run", "log_dir": root / "logs", "result": out}


def final_weights(run_dir: Path, step: int = 8) -> dict:
    """Model and EMA weights of a run's checkpoint at `step`, read in this process."""
    import torch

    from diffusion_core.presets import Preset
    from launch.train.checkpointing import checkpoint_weights, read_run_config, step_dir

    preset = Preset.from_dict(read_run_config(run_dir)["preset"])
    with torch.device("meta"):
        module = preset.build()
    folder = step_dir(run_dir, step)
    return {"model": checkpoint_weights(folder, module, use_ema=False)[0],
            "ema": checkpoint_weights(folder, module, use_ema=True)[0]}


@pytest.fixture(scope="session")
def same_weights():
    """`same_weights(run_a, run_b)` asserts both runs ended with bit-identical model and EMA weights."""
    import torch

    def check(run_a: Path, run_b: Path) -> None:
        wa, wb = final_weights(run_a), final_weights(run_b)
        for kind in ("model", "ema"):
            assert wa[kind].keys() == wb[kind].keys()
            for name in wa[kind]:
                assert torch.equal(wa[kind][name], wb[kind][name]), f"{kind} weight {name} differs"
    return check
