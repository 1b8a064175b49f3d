"""Ask SLURM about jobs: state, details, waiting, cancelling.

Works without an accounting database: the controller's own view (`squeue --states=all`,
`scontrol show job`) lasts `MinJobAge` seconds after a job ends (a day on the local cluster, five minutes
by default elsewhere, which is plenty for a poller); `sacct` is tried only when the controller has
forgotten a job.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from typing import Callable, Iterable

PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                  "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
RUNNING_STATES = {"RUNNING", "COMPLETING"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED", "REVOKED"}
DONE = "COMPLETED"


def require_slurm(hint: str) -> None:
    """Raise FileNotFoundError unless sbatch, squeue and scontrol are on PATH; `hint` says what to do instead."""
    missing = [tool for tool in ("sbatch", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found on PATH: this machine is not a SLURM login node. "
                                f"{hint}")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _base_state(raw: str) -> str:
    # "CANCELLED by 0" -> "CANCELLED"; "COMPLETED+" -> "COMPLETED".
    return raw.split()[0].rstrip("+") if raw.strip() else "UNKNOWN"


def show_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut...); empty once forgotten."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    fields: dict[str, str] = {}
    for token in out.stdout.split("\n")[0].split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def _sacct_state(job_id: str) -> str:
    if shutil.which("sacct") is None:
        return "UNKNOWN"
    out = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)])
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return _base_state(lines[-1]) if out.returncode == 0 and lines else "UNKNOWN"


def states(job_ids: Iterable[str]) -> dict[str, str]:
    """Current state of each job (COMPLETED, RUNNING, PENDING, FAILED, ... or UNKNOWN)."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return {}
    result: dict[str, str] = {}
    out = _run(["squeue", "-h", "--states=all", "-j", ",".join(ids), "-o", "%i %T"])
    if out.returncode == 0:
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                result[parts[0]] = _base_state(parts[1])
    for job_id in ids:
        # squeue refuses the whole list when one id is forgotten: ask one by one.
        if job_id not in result:
            fields = show_job(job_id)
            result[job_id] = _base_state(fields["JobState"]) if "JobState" in fields else _sacct_state(job_id)
    return result


def is_finished(state: str) -> bool:
    """True for a state no job leaves by itself (completed or failed in some way)."""
    return state == DONE or state in FAILED_STATES


def wait(job_ids: Iterable[str], poll_s: float = 5.0, timeout_s: float | None = None,
         on_change: Callable[[str, str], None] | None = None,
         fallback: Callable[[str], str] | None = None,
         stop_on_failure: bool = False) -> dict[str, str]:
    """Poll until every job is finished; return the final states.

    `on_change(job_id, state)` is called at every change. `fallback(job_id)` names the state of a job
    SLURM no longer knows (UNKNOWN), e.g. from the job's own result file. With `stop_on_failure` it
    returns as soon as one job failed. TimeoutError after `timeout_s`.
    """
    ids = [str(j) for j in job_ids]
    seen: dict[str, str] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    unknown_since: dict[str, float] = {}
    previous: dict[str, str] = {}
    while True:
        current = states(ids)
        for job_id, state in current.items():
            if state == "UNKNOWN" and fallback is not None:
                state = fallback(job_id)
                current[job_id] = state
            if state == "UNKNOWN":
                # Forgotten by the controller and no other evidence for a while: call it failed.
                first = unknown_since.setdefault(job_id, time.monotonic())
                if time.monotonic() - first > max(60.0, 6 * poll_s):
                    current[job_id] = state = "FAILED"
            if seen.get(job_id) != state:
                seen[job_id] = state
                if on_change is not None:
                    on_change(job_id, state)
        # A failure state counts once it is seen twice in a row: a job being preempted or requeued
        # can pass through one on its way back to PENDING.
        confirmed = {j: s for j, s in current.items() if s == DONE or (s in FAILED_STATES and previous.get(j) == s)}
        previous = current
        if len(confirmed) == len(ids):
            return current
        if stop_on_failure and any(s in FAILED_STATES for s in confirmed.values()):
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"jobs {', '.join(ids)} not finished after {timeout_s:.0f}s: {current}")
        time.sleep(poll_s)


def cancel(job_ids: Iterable[str]) -> None:
    """scancel the given jobs (finished ones are ignored by SLURM)."""
    ids = [str(j) for j in job_ids]
    if ids:
        _run(["scancel", *ids])
