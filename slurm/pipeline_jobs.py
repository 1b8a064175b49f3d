"""Submit a pipeline (launch.pipeline) as SLURM jobs chained with afterok dependencies, and follow it.

Every stage becomes one job (a swept stage one job per value); a job waits for the jobs of the stages
it is after, and is cancelled by SLURM if one of them fails (kill-on-invalid-dep). While following,
the first failed stage stops the pipeline: its unfinished jobs are cancelled, OUT/pipeline.json gets
every stage's final state, and the error names the stage, its log and every stage that will not run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from launch.pipeline import Pipeline, StageFailed, write_record
from slurm import jobs, submission
from slurm.profiles import ClusterProfile, Resources


def check_resources(pipeline: Pipeline) -> None:
    """Refuse unknown or invalid `resources` keys of the file and of every stage (ValueError naming them)."""
    Resources.from_dict(pipeline.resources, f"{pipeline.source}: resources")
    for stage in pipeline.stages:
        Resources.from_dict(stage.resources, f"{pipeline.source}: stage '{stage.id}': resources")


def stage_resources(pipeline: Pipeline, profile: ClusterProfile, stage_id: str) -> Resources:
    """Profile < pipeline file's `resources` < the stage's own `resources`."""
    stage = pipeline.stage(stage_id)
    layer = Resources.from_dict(pipeline.resources, "resources")
    own = Resources.from_dict(stage.resources, f"stage '{stage_id}' resources")
    resources = profile.resources.merged(layer).merged(own)
    resources.resolved()
    return resources


def log_dir(pipeline: Pipeline, stage_id: str) -> Path:
    """The submitit folder of a stage's job (scripts, pickles, one log per task)."""
    return pipeline.out / "logs" / "slurm" / stage_id


def submit_pipeline(pipeline: Pipeline, profile: ClusterProfile,
                    echo: Callable[[str], None] = print) -> dict[str, submission.SubmittedJob]:
    """Submit every stage in graph order; returns stage id -> submitted job. Writes OUT/pipeline.json."""
    jobs.require_slurm("Run the pipeline on this machine instead with `adm pipeline CONFIG --local`.")
    for stage in pipeline.stages:  # check every stage before submitting any
        submission.check_script_inputs(profile, stage_resources(pipeline, profile, stage.id),
                                       f"{pipeline.name}.{stage.id}", log_dir=log_dir(pipeline, stage.id))
    pipeline.out.mkdir(parents=True, exist_ok=True)
    submitted: dict[str, submission.SubmittedJob] = {}
    record: dict[str, dict] = {}
    try:
        for stage in pipeline.stages:
            after = [submitted[d].job_id for d in stage.after]
            job = submission.submit_stage(stage.command, list(stage.argv), profile,
                                          stage_resources(pipeline, profile, stage.id), log_dir(pipeline, stage.id),
                                          job_name=f"{pipeline.name}.{stage.id}", after=after)
            submitted[stage.id] = job
            record[stage.id] = {"command": stage.command_line, "job_id": job.job_id, "log": str(job.log_path),
                                "after": list(stage.after), "state": "PENDING"}
            wait = f" after {', '.join(stage.after)}" if stage.after else ""
            echo(f"[pipeline] {stage.id}: job {job.job_id}{wait}")
    except BaseException:
        # Half a pipeline is worse than none: take back what was submitted.
        jobs.cancel(j.job_id for j in submitted.values())
        raise
    write_record(pipeline, "slurm", record)
    return submitted


def _culprit(pipeline: Pipeline, states: dict[str, str]) -> str:
    """The stage that failed first: a failed one whose own dependencies all completed."""
    failed = [s.id for s in pipeline.stages if states[s.id] in jobs.FAILED_STATES]
    for stage_id in failed:
        if all(states[d] == jobs.DONE for d in pipeline.stage(stage_id).after) and states[stage_id] != "CANCELLED":
            return stage_id
    for stage_id in failed:
        if all(states[d] == jobs.DONE for d in pipeline.stage(stage_id).after):
            return stage_id
    return failed[0]


def follow(pipeline: Pipeline, submitted: dict[str, submission.SubmittedJob], poll_s: float = 5.0,
           echo: Callable[[str], None] = print, settle_s: float = 120.0) -> dict[str, str]:
    """Wait for every job; print state changes; raise StageFailed at the first failure.

    On a failure the pipeline's unfinished jobs are cancelled, and every job is then followed (up to
    `settle_s`) to its final state, so that OUT/pipeline.json ends with every stage's final state and
    the error names every stage that will not run: those cancelled here and those SLURM cancelled
    because a job they depend on failed. Returns stage id -> final state.
    """
    by_job = {job.job_id: stage_id for stage_id, job in submitted.items()}
    record = {stage_id: {"command": pipeline.stage(stage_id).command_line, "job_id": job.job_id,
                         "log": str(job.log_path), "after": list(pipeline.stage(stage_id).after), "state": "PENDING"}
              for stage_id, job in submitted.items()}

    def changed(job_id: str, state: str) -> None:
        stage_id = by_job[job_id]
        if record[stage_id]["state"] == state:
            return
        record[stage_id]["state"] = state
        write_record(pipeline, "slurm", record)
        echo(f"[pipeline] {stage_id} (job {job_id}): {state}")

    def fallback(job_id: str) -> str:
        return submission.result_state(submitted[by_job[job_id]].log_dir, job_id)

    final = jobs.wait(list(by_job), poll_s=poll_s, on_change=changed, fallback=fallback, stop_on_failure=True)
    states = {by_job[job_id]: state for job_id, state in final.items()}
    if not any(s in jobs.FAILED_STATES for s in states.values()):
        return states
    culprit = _culprit(pipeline, states)
    jobs.cancel(submitted[s].job_id for s, state in states.items() if not jobs.is_finished(state))
    states = _settle(by_job, poll_s, settle_s, changed, fallback, states)
    for stage_id, state in states.items():
        record[stage_id]["state"] = state
    write_record(pipeline, "slurm", record)
    log = submitted[culprit].log_path
    detail = f"job {submitted[culprit].job_id} {states[culprit]}"
    not_run = [s.id for s in pipeline.stages if s.id != culprit and states[s.id] != jobs.DONE]
    if not_run:
        detail += f"; will not run: {', '.join(not_run)}"
    raise StageFailed(culprit, log, detail, submission.tail(log))


def _settle(by_job: dict[str, str], poll_s: float, settle_s: float, changed, fallback,
            states: dict[str, str]) -> dict[str, str]:
    """Follow the jobs until every one has its final state (or `settle_s` passed); stage id -> state."""
    try:
        final = jobs.wait(list(by_job), poll_s=min(poll_s, 2.0), timeout_s=settle_s, on_change=changed,
                          fallback=fallback)
    except TimeoutError:
        final = jobs.states(list(by_job))  # some job is slow to end: record what SLURM says now
    settled = dict(states)
    settled.update({by_job[job_id]: state for job_id, state in final.items()})
    return settled
