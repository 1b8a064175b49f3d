"""Fixtures for the SLURM tests: the local cluster (slurm/local-cluster.sh) must be up for `slurm` tests.

They skip only when SLURM is not installed here or the cluster is not running; CI installs and
starts it (.ci/run), so there they always run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cluster_problem() -> str | None:
    """Why the local cluster cannot be used, or None when it is up."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (sinfo/sbatch not on PATH): run slurm/local-cluster.sh install && start"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = {s.strip("*~#") for s in out.stdout.split()}
    if out.returncode != 0 or not states & {"idle", "mixed", "allocated", "completing"}:
        return f"the local SLURM cluster is not up ({(out.stderr or out.stdout).strip()[:200]}): slurm/local-cluster.sh start"
    return None


@pytest.fixture(scope="session")
def cluster() -> str:
    """The name of the profile of the running local cluster ('local'); skips when it is down."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    return "local"


@pytest.fixture(scope="session")
def adm():
    """`adm(*args, cwd=..., env=...)`: the adm command line in a fresh process (as a user runs it)."""
    return run_adm


def run_adm(*args: str, cwd: Path | str = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `adm` command line in a fresh process (as a user would) and capture its output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
