"""Back-to-back 2-process `adm sample` runs under CPU load: does every one end with exit status 0?

    .venv/bin/python bench/sample_teardown_stress.py                 # 200 runs, 2 CPU burners
    .venv/bin/python bench/sample_teardown_stress.py --runs 20 --load 0

Each run is what a user starts: `torchrun --standalone --nproc-per-node 2 -m launch.cli sample` on
tiny models (a guided DDIM run of 4 samples), into a fresh output folder. While it runs, `--load`
processes spin on the CPUs, so that the two ranks reach the end of the job (the merge on rank 0, the
final broadcast, the process-group teardown) at different times, as they do on a loaded node. A run
counts as good when torchrun exits 0 and the samples file is complete; the output of every other
run is kept under --work/failures/. Prints one line per bad run and the count at the end; exits 1
when any run was bad.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def _model_files(root: Path) -> tuple[str, str]:
    import torch

    from diffusion_core import presets
    from launch.model_io import save_model_file

    paths = []
    for name, seed in (("tiny-unet", 21), ("tiny-classifier", 22)):
        preset = presets.get(name)
        module = preset.build()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # fresh ADM nets output exactly 0; perturb so every layer matters
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        paths.append(str(save_model_file(root / f"{name}.pt", module.state_dict(), preset)))
    return paths[0], paths[1]


def one_run(unet: str, clf: str, out: Path, timeout: float) -> tuple[bool, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "launch.cli", "sample", "--model", unet, "--classifier", clf, "--classifier-scale", "2",
           "--num-samples", "4", "--batch-size", "2", "--steps", "ddim2", "--shard-size", "2",
           "--grid-size", "4", "--no-progress", "--out", str(out)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return False, f"timed out after {timeout}s\n{err.stdout or ''}{err.stderr or ''}"
    complete = (out / "samples_4x16x16x3.npz").is_file() and (out / "options.json").is_file()
    return done.returncode == 0 and complete, f"exit {done.returncode}, complete {complete}\n{done.stdout}{done.stderr}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--load", type=int, default=2, help="CPU-burning processes running meanwhile")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per run")
    parser.add_argument("--work", default=None, help="folder for models and failed runs' output (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="adm-teardown-"))
    work.mkdir(parents=True, exist_ok=True)
    unet, clf = _model_files(work)
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    good, t0 = 0, time.monotonic()
    try:
        for i in range(args.runs):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            ok, text = one_run(unet, clf, out, args.timeout)
            if ok:
                good += 1
            else:
                failures = work / "failures"
                failures.mkdir(exist_ok=True)
                (failures / f"run_{i:04d}.log").write_text(text)
                print(f"run {i}: FAILED ({text.splitlines()[0]}); output in {failures / f'run_{i:04d}.log'}", flush=True)
            if (i + 1) % 10 == 0:
                print(f"{i + 1} runs, {good} good, {time.monotonic() - t0:.0f}s", flush=True)
    finally:
        stop.set()
        for b in burners:
            b.join(timeout=5)
    print(f"teardown stress: {good}/{args.runs} runs ended with exit 0 and a complete file "
          f"(2 ranks, {args.load} CPU burners, {time.monotonic() - t0:.0f}s)")
    return 0 if good == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
