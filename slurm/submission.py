"""Submit an `adm` stage (or any picklable callable) as a SLURM job through submitit.

One task per GPU (`--ntasks-per-node = --gpus-per-node`); every task runs the stage, which sets up
torch.distributed from SLURM's variables. The job script exports MASTER_ADDR (the first node of the
allocation) and a MASTER_PORT that is free on it, so 1..N nodes rendezvous without a fixed port.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import submitit

from runtime.names import check_name, check_text
from slurm import jobs
from slurm.profiles import ClusterProfile, Resources, check_profile
from slurm.stage_job import StageJob

NO_SLURM_HINT = ("Run the stage directly with `adm STAGE ...`, use `adm pipeline CONFIG --local`, "
                 "or start the one-node test cluster with `slurm/local-cluster.sh start`.")


@dataclasses.dataclass(frozen=True)
class SubmittedJob:
    """A job handed to SLURM: its id, its name, and where its logs go."""

    job_id: str
    name: str
    log_dir: Path
    job: Any = None  # the submitit Job, when submitted in this process

    @property
    def log_path(self) -> Path:
        """Rank 0's log (stdout and stderr) of this job."""
        return self.log_dir / f"{self.job_id}_0_log.out"


def rendezvous_setup(python: str = sys.executable) -> list[str]:
    """Shell lines, run once on the first node, that export MASTER_ADDR and a free MASTER_PORT."""
    pick_port = 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
    return [
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'export MASTER_PORT="$({shlex.quote(python)} -c {shlex.quote(pick_port)})"',
        'echo "[adm] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: rendezvous at $MASTER_ADDR:$MASTER_PORT"',
    ]


_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


def check_script_inputs(profile: ClusterProfile, resources: Resources, job_name: str,
                        after: Iterable[str] = (), log_dir: str | os.PathLike | None = None) -> None:
    """Refuse anything that would change the generated sbatch script beyond its value (ValueError).

    submitit quotes values but not newlines: `#SBATCH --job-name='x<newline>rm -rf ~'` runs the second
    line on the compute node. Names must be names, values free of control characters, job ids digits
    (the profile's and the resources' own checks: `check_profile`, `Resources.resolved`).
    """
    check_name(job_name, "job name")
    if log_dir is not None:
        check_text(log_dir, "log folder")
    for job in after:
        if not _JOB_ID.fullmatch(str(job)):
            raise ValueError(f"--after: {str(job)!r} is not a SLURM job id (digits, or ARRAYID_TASK)")
    check_profile(profile)
    resources.resolved()


def executor_parameters(profile: ClusterProfile, resources: Resources, job_name: str,
                        after: Iterable[str] = ()) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one job (resources already resolved, inputs checked)."""
    check_script_inputs(profile, resources, job_name, after)
    res = resources.resolved()
    setup = [f"export {key}={shlex.quote(value)}" for key, value in profile.env.items()]
    setup += list(profile.setup) + rendezvous_setup()
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": res.time_min,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "signal_delay_s": profile.signal_delay_s,
        "stderr_to_stdout": True,
        "setup": setup,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key):
            params[key] = getattr(profile, key)
    extra: dict[str, Any] = {"requeue": True}
    after = [str(a) for a in after]
    if after:
        params["dependency"] = "afterok:" + ":".join(after)
        # A failed dependency cancels the job instead of leaving it pending forever.
        extra["kill-on-invalid-dep"] = "yes"
    if res.mem is not None:
        extra["mem"] = res.mem
    extra.update(profile.sbatch)
    params["additional_parameters"] = extra
    return params


def make_executor(profile: ClusterProfile, resources: Resources, log_dir: str | os.PathLike, job_name: str,
                  after: Iterable[str] = ()) -> submitit.SlurmExecutor:
    """A submitit executor for one job; raises FileNotFoundError when SLURM is not installed here."""
    jobs.require_slurm(NO_SLURM_HINT)
    check_text(log_dir, "log folder")
    executor = submitit.SlurmExecutor(folder=str(log_dir), max_num_timeout=profile.max_requeues)
    executor.update_parameters(**executor_parameters(profile, resources, job_name, after))
    return executor


def sbatch_script(profile: ClusterProfile, resources: Resources, log_dir: str | os.PathLike, job_name: str,
                  after: Iterable[str] = ()) -> str:
    """The sbatch script submitit would submit (for --dry-run); needs no SLURM installation."""
    from submitit.slurm.slurm import _make_sbatch_string

    check_text(log_dir, "log folder")
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(log_dir))])
    return _make_sbatch_string(command=command, folder=str(log_dir),
                               **executor_parameters(profile, resources, job_name, after))


def submit_stage(command: str, argv: list[str], profile: ClusterProfile, resources: Resources,
                 log_dir: str | os.PathLike, job_name: str | None = None,
                 after: Iterable[str] = ()) -> SubmittedJob:
    """Submit `adm COMMAND ARGV...` as one job; `after` lists job ids it waits for (afterok).

    The caller is expected to have validated `argv` (launch.cli.parse_stage_args).
    """
    name = job_name or f"adm-{command}"
    executor = make_executor(profile, resources, log_dir, name, after)
    job = executor.submit(StageJob(command, list(argv), grace_s=profile.grace_s))
    return SubmittedJob(job_id=str(job.job_id), name=name, log_dir=Path(log_dir), job=job)


def submit_function(fn: Callable[..., Any], *args: Any, profile: ClusterProfile, resources: Resources,
                    log_dir: str | os.PathLike, job_name: str) -> SubmittedJob:
    """Submit any picklable callable `fn(*args)` with the same resources and rendezvous as a stage."""
    executor = make_executor(profile, resources, log_dir, job_name)
    job = executor.submit(fn, *args)
    return SubmittedJob(job_id=str(job.job_id), name=job_name, log_dir=Path(log_dir), job=job)


def result_state(log_dir: str | os.PathLike, job_id: str) -> str:
    """COMPLETED/FAILED from submitit's result file of rank 0, or UNKNOWN before it exists."""
    path = Path(log_dir) / f"{job_id}_0_result.pkl"
    if not path.exists():
        return "UNKNOWN"
    try:
        outcome, _ = submitit.core.utils.pickle_load(path)
    except Exception:  # an unreadable result is no evidence of success
        return "FAILED"
    return "COMPLETED" if outcome == "success" else "FAILED"


def task_results(log_dir: str | os.PathLike, job_id: str, num_tasks: int) -> list[Any]:
    """The return value of every task of a finished job, read from submitit's result files.

    Raises RuntimeError with the task's traceback when a task failed, FileNotFoundError when a
    result file is missing (the task was killed before it could write one).
    """
    results = []
    for task in range(num_tasks):
        path = Path(log_dir) / f"{job_id}_{task}_result.pkl"
        if not path.exists():
            raise FileNotFoundError(f"task {task} of job {job_id} left no result ({path}); see its log "
                                    f"{Path(log_dir) / f'{job_id}_{task}_log.out'}")
        outcome, value = submitit.core.utils.pickle_load(path)
        if outcome != "success":
            raise RuntimeError(f"task {task} of job {job_id} failed:\n{value}")
        results.append(value)
    return results


def tail(path: str | os.PathLike, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' when it does not exist yet)."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
