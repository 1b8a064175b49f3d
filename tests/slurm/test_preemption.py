"""runtime.preemption's signal handling, with real signals sent to a real child process.

The requeue itself needs SLURM (test_slurm_jobs.py); here the requeue callback writes a file, so what
is checked is when it runs: at once for a stage that never polls, after the stage saved and stopped
for one that polls, never after SIGTERM.
"""
from __future__ import annotations

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

    def requeue():
        with open(out / "requeued", "a") as f:
            f.write("x")
        sys.exit(-1)  # what submitit's handler does on rank 0

    guard = preemption.Guard(requeue, grace_s=grace).install()
    try:
        step = 0
        (out / "ready").write_text("1")
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


def _start(tmp_path, mode: str, grace: float = 30.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), mode, str(grace)],
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
    assert (tmp_path / "requeued").read_text() == "x"  # exactly once
    assert not (tmp_path / "finished").exists()
    assert "checkpoint and requeue" in output


def test_stage_that_never_polls_is_requeued_at_once(tmp_path):
    proc = _start(tmp_path, "nopoll")
    sent = time.monotonic()
    proc.send_signal(signal.SIGUSR2)
    proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert (tmp_path / "requeued").read_text() == "x"
    assert not (tmp_path / "saved").exists() and not (tmp_path / "finished").exists()


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
    proc.communicate()


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
