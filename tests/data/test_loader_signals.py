"""A scheduler's SIGTERM to the whole process group must reach the trainer, not kill its loader workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from data.loader import ShardLoader
    got = []
    signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    loader = ShardLoader(sys.argv[1], image_size=16, batch_size=4, num_workers=2, seed=0)
    it = iter(loader)
    next(it)
    print("ready", flush=True)
    sys.stdin.readline()             # the test signals the process group, then writes a line
    next(it); next(it)               # workers still alive: the stream goes on
    print("after-signal", len(got), flush=True)
    """
)


def test_sigterm_to_process_group_leaves_workers_running(mini_shards, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(mini_shards)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=os.getcwd(),
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGTERM)  # what torchrun / SLURM do on preemption
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    assert "after-signal 1" in out
