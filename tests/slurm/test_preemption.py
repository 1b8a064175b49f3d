"""runtime.preemption's signal handling, with real signals sent to a real child process.

The requeue itself needs SLURM (test_slurm_jobs.py); here the requeue callback writes a file, so what
is checked is when it runs: at once for a stage that never polls, after the stage saved and stopped
for one that polls, never after SIGTERM.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from runtime import preemption

    out = Path(sys.argv[1])
    poll = sys.argv[2] == "poll"
    ignore = sys.argv[2] == "ignore"  # polls, but never stops
    grace = float(sys.argv[3])
    cooperative = len(sys.argv) > 4 and sys.argv[4] == "cooperative"

    def requeue():
        with open(out / "requeued", "a") as f:
            f.write("after-save" if (out / "saved").exists() else "before-save")
        sys.exit(-1)  # what submitit's handler does on rank 0

    guard = preemption.Guard(requeue, grace_s=grace, cooperative=cooperative).install()
    try:
        step = 0
        (out / "ready").write_text("1")
        if cooperative:
            time.sleep(1.5)  # start-up: imports, building the model... no polling yet
        while step < 400:
            if ignore:
                preemption.requested()
            if poll and preemption.requested():
                (out / "saved").write_text(str(step))
                raise preemption.Preempted(f"saved step {step}")
            time.sleep(0.05)
            step += 1
        (out / "finished").write_text(str(step))
    except preemption.Preempted:
        guard.finish_preempted()
    finally:
        guard.uninstall()
""")


def _start(tmp_path, mode: str, grace: float = 30.0, cooperative: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), mode, str(grace),
                             "cooperative" if cooperative else "plain"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])
def test_polling_stage_saves_then_requeues(tmp_path, sig):
    proc = _start(tmp_path, "poll")
    proc.send_signal(sig)
    output = proc.communicate(timeout=30)[0]
    assert (tmp_path / "saved").exists(), output
    assert (tmp_path / "requeued").read_text() == "after-save"  # exactly once
    assert not (tmp_path / "finished").exists()
    assert "checkpoint and requeue" in output


def test_stage_that_never_polls_is_requeued_at_once(tmp_path):
    proc = _start(tmp_path, "nopoll")
    sent = time.monotonic()
    proc.send_signal(signal.SIGUSR2)
    proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert (tmp_path / "requeued").read_text() == "before-save"
    assert not (tmp_path / "saved").exists() and not (tmp_path / "finished").exists()


def test_signal_during_start_up_of_a_polling_stage_waits_for_its_checkpoint(tmp_path):
    """A stage known to poll is not requeued with nothing done when the signal beats its first poll."""
    proc = _start(tmp_path, "poll", cooperative=True)
    proc.send_signal(signal.SIGUSR2)  # while it is still "starting up"
    output = proc.communicate(timeout=30)[0]
    assert (tmp_path / "requeued").read_text() == "after-save", output
    assert "arrived during start-up" in output and "requeueing at once" not in output


def test_polling_stage_that_overruns_its_grace_is_requeued_anyway(tmp_path):
    proc = _start(tmp_path, "ignore", grace=1.0)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert not (tmp_path / "requeued").exists()  # still within its grace period
    deadline = time.monotonic() + 10
    while not (tmp_path / "requeued").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()  # SLURM's requeue would end it
    output = proc.communicate()[0]
    assert "did not checkpoint and stop within 1s" in output and "resumes from its latest one" in output


def test_sigterm_stops_without_requeue(tmp_path):
    for mode in ("poll", "nopoll"):
        folder = tmp_path / mode
        folder.mkdir()
        proc = _start(folder, mode)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 143
        assert not (folder / "requeued").exists() and not (folder / "finished").exists()
        assert (folder / "saved").exists() == (mode == "poll")


def test_outside_a_job_nothing_is_requested():
    from runtime import preemption

    assert preemption.requested() is False and preemption.requested_everywhere() is False


TRAINER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from launch.train.checkpointing import latest_checkpoint
    from slurm.stage_job import StageJob

    run_dir, data, events = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def requeue():  # what submitit would do: here, note the checkpoint the rerun would resume from
        latest = latest_checkpoint(run_dir)
        events.write_text(latest.name if latest else "no checkpoint")

    StageJob("train", ["--run-dir", str(run_dir), "--data", data, "--set", "total_steps=100000", "save_every=100000",
                       "log_every=1", "num_workers=2", "model.dropout=0.1", "progress=false"],
             grace_s=float(sys.argv[4])).run_guarded(requeue)
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGUSR2", "SIGUSR1"])
def test_training_signalled_during_start_up_checkpoints_progress_before_requeueing(tmp_path, shards, sig):
    """A signal comes while `adm train` is still starting (a short --time): the job must not be
    requeued with nothing done. After the time-limit warning (SIGUSR2) it checkpoints after its first
    step, trains on while the grace period allows, checkpoints again and then requeues, well before
    the Guard would force it; after SIGUSR1 (preemption: now) it requeues after its first checkpoint."""
    run_dir, events, grace = tmp_path / "run", tmp_path / "requeued-at", 25.0
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(run_dir), str(shards), str(events), str(grace)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stdout:  # the stage parsed its options and starts: the Guard is in place
        lines.append(line)
        if line.startswith("[adm] rank 0/1"):
            break
    assert not (run_dir / "log.txt").exists()  # still before the first step
    proc.send_signal(getattr(signal, sig))
    sent = time.monotonic()
    output = "".join(lines) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 143, output[-3000:]
    assert time.monotonic() - sent < grace, output[-3000:]  # it stopped by itself, before the forced requeue
    assert "arrived during start-up" in output and "requeueing at once" not in output
    assert "did not checkpoint and stop" not in output
    requeued_at = events.read_text()
    assert requeued_at.startswith("step_"), output[-3000:]  # a checkpoint with progress existed
    stopped = int(requeued_at[len("step_"):])
    log = (run_dir / "log.txt").read_text()
    assert f"stopping at step {stopped} after a stop signal ({sig})" in log
    first = re.search(rf"requeue signal \({sig}\) at step (\d+): checkpoint written; training on", log)
    if sig == "SIGUSR2":
        assert first and 1 <= int(first.group(1)) < stopped, log[-3000:]  # progress saved early, then more
    else:
        assert first is None and stopped == 1, log[-3000:]  # the first check, after the first step


FINISHED = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from slurm.stage_job import GuardedJob

    out = Path(sys.argv[1])

    class Quick(GuardedJob):
        def work(self):
            return 0

    def requeue():
        (out / "requeued").write_text("x")
        sys.exit(-1)

    Quick(grace_s=5).run_guarded(requeue)
    os.kill(os.getpid(), signal.SIGUSR2)  # the time limit's signal, just as the finished job exits
    time.sleep(0.5)
    print("exited normally", flush=True)
""")


def test_a_signal_after_the_work_completed_neither_requeues_nor_kills(tmp_path):
    done = subprocess.run([sys.executable, "-c", FINISHED, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "exited normally" in done.stdout, (done.returncode, done.stderr[-2000:])
    assert not (tmp_path / "requeued").exists()
