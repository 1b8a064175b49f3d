"""Names and values that reach generated sbatch scripts or paths: an injected newline never gets there.

Every vector (pipeline name, stage name, sweep key, resources.mem, a profile's partition / sbatch
values / env keys, `adm submit --job-name / --mem / --after / --log-dir`) is tried through the real
command line with --dry-run (which prints the script submitit would submit): each is refused with
one line and exit 2, and no printed script holds the injected command. No cluster is needed.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from slurm.profiles import load_profile
from slurm.submission import executor_parameters, sbatch_script
from slurm.profiles import Resources

INJECTED = "touch /tmp/adm-injected-marker"


def _refused(out, command: str, what: str) -> None:
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"adm {command}: error: "), out.stderr
    assert what in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert INJECTED not in out.stdout  # no script was printed with it


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_clean_dry_run_prints_the_script(tmp_path, adm):
    out = adm("submit", "report", "m", "--out", "r", "--cluster", "local", "--job-name", "adm-report.v1_2",
              "--mem", "4G", "--after", "12_3", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --job-name=adm-report.v1_2" in out.stdout and "#SBATCH --mem=4G" in out.stdout


@pytest.mark.parametrize("flag, value, what", [
    ("--job-name", f"x\n{INJECTED}", "job name"),
    ("--job-name", "../x", "job name"),
    ("--mem", f"4G\n{INJECTED}", "mem"),
    ("--after", f"12\n{INJECTED}", "--after"),
    ("--log-dir", f"logs\n{INJECTED}", "log folder"),
])
def test_submit_flags_are_checked(tmp_path, adm, flag, value, what):
    out = adm("submit", "report", "m", "--out", "r", "--cluster", "local", flag, value, "--dry-run", cwd=tmp_path)
    _refused(out, "submit", what)


@pytest.mark.parametrize("profile, what", [
    (f'partition: "debug\\n{INJECTED}"\n', "partition"),
    (f'sbatch:\n  comment: "ok\\n{INJECTED}"\n', "sbatch comment"),
    (f'sbatch:\n  "x\\n{INJECTED}": true\n', "sbatch option"),
    (f'env:\n  "A=1\\n{INJECTED}\\nB": "1"\n', "env key"),
    (f'env:\n  A: "1\\n{INJECTED}"\n', "env A"),
    ('env: [1, 2]\n', "'env' must be a mapping"),
])
def test_profile_values_are_checked(tmp_path, adm, profile, what):
    path = _write(tmp_path / "site.yaml", profile)
    out = adm("submit", "report", "m", "--out", "r", "--cluster", str(path), "--dry-run", cwd=tmp_path)
    _refused(out, "submit", what)


@pytest.mark.parametrize("pipeline, what", [
    (f'name: "p\\n{INJECTED}"\nstages:\n  report: {{args: "m --out r"}}\n', "pipeline name"),
    ('stages:\n  "../../escaped": {command: report, args: "m --out r"}\n', "stage name"),
    (f'stages:\n  report: {{args: "m --out r", resources: {{mem: "4G\\n{INJECTED}"}}}}\n', "mem"),
    ('stages:\n  report: {args: "m --out {k}", sweep: {"../k": [1]}}\n', "sweep key"),
    (f'out: "o\\n{INJECTED}"\nstages:\n  report: {{args: "m --out r"}}\n', "out"),
])
def test_pipeline_names_and_values_are_checked(tmp_path, adm, pipeline, what):
    path = _write(tmp_path / "p.yaml", pipeline)
    for mode in (["--local"], ["--cluster", "local"]):
        out = adm("pipeline", str(path), *mode, "--dry-run", cwd=tmp_path)
        _refused(out, "pipeline", what)


def test_a_stage_log_never_leaves_out(tmp_path, adm):
    """`--local` really runs: a stage named to escape OUT is refused before anything is written."""
    path = _write(tmp_path / "p.yaml", 'out: out\nstages:\n'
                                       '  "../../../escaped": {command: report, args: "m --out r"}\n')
    out = adm("pipeline", str(path), "--local", cwd=tmp_path)
    _refused(out, "pipeline", "stage name")
    assert not (tmp_path.parent / "escaped.log").exists() and not (tmp_path / "out").exists()


def test_the_library_entry_points_check_too(tmp_path):
    """Programs calling slurm.submission directly (the pipeline does) get the same refusals."""
    profile = load_profile("local")
    with pytest.raises(ValueError, match="job name"):
        executor_parameters(profile, Resources(), f"job\n{INJECTED}")
    with pytest.raises(ValueError, match="mem"):
        executor_parameters(profile, Resources(mem=f"1G\n{INJECTED}"), "job")
    with pytest.raises(ValueError, match="log folder"):
        sbatch_script(profile, Resources(), tmp_path / f"l\n{INJECTED}", "job")
    script = sbatch_script(profile, Resources(mem="2G"), tmp_path / "logs", "job", after=["7"])
    assert "#SBATCH --mem=2G" in script and "#SBATCH --dependency=afterok:7" in script
