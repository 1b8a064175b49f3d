"""A scheduler's SIGTERM to the whole process group must reach the trainer, not kill its loader workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

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


WORKERS = textwrap.dedent(
    """
    import sys
    from data.loader import ShardLoader
    from data.shards import resolve_shards
    # Shards that take a minute to arrive: the workers sit in a read, where nothing checks on the trainer.
    urls = [f"pipe:sleep 120; cat {u}" for u in resolve_shards(sys.argv[1]).urls]
    loader = ShardLoader(urls, image_size=16, batch_size=4, num_workers=2, seed=0)
    print("ready", flush=True)
    next(iter(loader))
    """
)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["process-group", "trainer-only"])
def test_workers_die_with_their_trainer(mini_shards, how):
    """kill -9 of the trainer's process group (the workers are in groups of their own), or of the
    trainer alone, while its loader workers wait for data: they must not live on."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", WORKERS, str(mini_shards)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=os.getcwd())
    workers, readers = [], []
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:] if proc.poll() else ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both workers started and opened a shard (a pipe child each)
            workers = _children(proc.pid)
            readers = [c for w in workers for c in _children(w)]
            if len(workers) >= 2 and len(readers) >= 2:
                break
            time.sleep(0.05)
        assert len(workers) >= 2 and len(readers) >= 2, (workers, readers)
        assert all(os.getpgid(w) != proc.pid for w in workers)
        if how == "process-group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), f"loader workers {workers} outlived their trainer"
    finally:
        for pid in [proc.pid, *workers, *readers, *[g for r in readers for g in _children(r)]]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
