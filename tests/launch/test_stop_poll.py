"""When the ranks of a training run agree on a stop signal (launch/train/stop_poll.py), with 2 real gloo
processes and real signals sent to one rank only: not at every step, promptly, and at the same step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.distributed import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
RANK = textwrap.dedent("""
    import json, os, signal, sys, time
    from runtime import distributed, preemption
    from launch.train.stop_poll import StopPoll

    interval_s, step_s, signal_at, sig = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    info = distributed.setup()
    watch = preemption.watch()
    poll = StopPoll(10, info.device, interval_s=interval_s)
    checks, step, stopped = [], 0, None
    while step < 200:
        time.sleep(step_s)
        step += 1
        if info.rank == 1 and step == signal_at:
            os.kill(os.getpid(), getattr(signal, sig))  # one rank only, as a node-local signal
        if poll.due(step, boundary=step % 50 == 0):
            checks.append(step)
            reason = poll.agree(step)
            if reason:
                stopped = [step, reason]
                break
    print(json.dumps({"rank": info.rank, "checks": checks, "stopped": stopped}), flush=True)
    distributed.finish()
""")


def _two_ranks(*args: str) -> list[dict]:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_fast_steps_agree_every_ten_steps_and_stop_together():
    r0, r1 = _two_ranks("10", "0", "25", "SIGUSR1")
    # After the first two checks (the second measures the step time): every 10 steps, no other host sync.
    assert r0["checks"] == r1["checks"] == [1, 2, 12, 22, 32]
    assert r0["stopped"] == r1["stopped"] == [32, "requeue"]  # the signal reached rank 1 only


def test_slow_steps_are_checked_more_often():
    # 50 ms steps and checks at most 0.2 s apart: at most 4 steps between checks.
    r0, r1 = _two_ranks("0.2", "0.05", "9", "SIGTERM")
    assert r0 == {**r1, "rank": 0}
    gaps = [b - a for a, b in zip(r0["checks"], r0["checks"][1:])]
    assert gaps and max(gaps) <= 4, r0["checks"]
    step, reason = r0["stopped"]
    assert reason == "stop" and 9 <= step <= 13
