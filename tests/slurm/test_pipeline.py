"""`adm pipeline`: the stage graph, --local, and the whole pipeline on tiny real data through SLURM."""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from launch.pipeline import load_pipeline
from slurm import jobs

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "slurm" / "pipeline.tiny.yaml"
EXAMPLE = REPO / "slurm" / "pipeline.example.yaml"


@pytest.fixture(scope="module")
def mini_src(tmp_path_factory) -> Path:
    """A miniature ImageNet source folder (real MNIST digits, 4 classes of 8 images)."""
    from data.miniature import make_miniature_imagenet

    return make_miniature_imagenet(tmp_path_factory.mktemp("pipeline-src") / "src", 4, 8, bad_files=False)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------- the graph
def test_tiny_and_example_configs_expand_sweeps_with_matching_dependencies(tmp_path):
    tiny = load_pipeline(TINY, out=str(tmp_path / "out"))
    ids = [s.id for s in tiny.stages]
    assert ids.index("prepare") == 0 and ids[-1] == "report"
    assert tiny.stage("train").after == ("prepare",) and tiny.stage("train_classifier").after == ("prepare",)
    assert set(tiny.stage("sample.scale-4.0").after) == {"train", "train_classifier"}
    # A swept stage after a swept stage waits only for the expansion with the same value.
    assert set(tiny.stage("evaluate.scale-4.0").after) == {"sample.scale-4.0", "reference", "features"}
    assert set(tiny.stage("report").after) == {"evaluate.scale-0.0", "evaluate.scale-4.0"}
    assert "--classifier-scale 4.0" in tiny.stage("sample.scale-4.0").command_line
    assert str(tmp_path / "out" / "samples" / "scale-4.0") in tiny.stage("sample.scale-4.0").argv
    for stage in tiny.stages:  # every stage comes after what it waits for
        assert all(ids.index(dep) < ids.index(stage.id) for dep in stage.after)

    example = load_pipeline(EXAMPLE, variables={"imagenet": "/data/train.tar", "imagenet_val": "/data/val"})
    scales = [s.id for s in example.stages if s.name == "sample"]
    assert len(scales) == 5 and all(s.after for s in example.stages if not s.name.startswith("prepare"))
    assert example.stage("report").after == tuple(f"evaluate.scale-{s}" for s in ("0.0", "0.5", "1.0", "2.0", "4.0"))


@pytest.mark.parametrize("text, message", [
    ("stages: {a: {command: prepare-imagenet, args: 'x y', after: [b]}}", "unknown stage 'b'"),
    ("stages: {a: {command: nope}}", "unknown command 'nope'"),
    ("stages: {a: {command: report, args: '--out x y', after: [b]}, b: {command: report, args: '--out x y', after: [a]}}",
     "cycle"),
    ("stages: {a: {command: report, args: '{nothere} --out x'}}", "{nothere}"),
    ("stages: {a: {command: report, args: 'x --out y', colour: red}}", "colour"),
    ("stages: {a: {command: train, args: '--run-dir r --no-such-option'}}", "stage 'a'"),
    ("stages: {a: {command: submit}}", "cannot run as a stage"),
    ("stages: {}", "non-empty 'stages:'"),
])
def test_bad_pipeline_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_pipeline(_write(tmp_path / "p.yaml", text))


def test_unknown_resources_are_refused_before_anything_runs(tmp_path):
    from slurm.pipeline_jobs import check_resources

    for text in ("stages: {a: {command: report, args: 'x --out y', resources: {gpus: 8}}}",
                 "resources: {gpus: 8}\nstages: {a: {command: report, args: 'x --out y'}}"):
        with pytest.raises(ValueError, match="gpus"):
            check_resources(load_pipeline(_write(tmp_path / "p.yaml", text)))


def test_cli_errors_unknown_profile_and_no_sbatch(tmp_path, adm, mini_src):
    unknown = adm("pipeline", str(TINY), "--cluster", "no-such-cluster", "--var", f"src={mini_src}", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "unknown cluster profile 'no-such-cluster'" in unknown.stderr and "local" in unknown.stderr
    # A machine without SLURM: only this venv's python on PATH.
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(shutil.which("true"), bare / "true")
    env = {"PATH": str(bare)}
    no_slurm = adm("pipeline", str(TINY), "--cluster", "local", "--var", f"src={mini_src}", cwd=tmp_path, env=env)
    assert no_slurm.returncode == 2 and "sbatch" in no_slurm.stderr and "--local" in no_slurm.stderr
    submit = adm("submit", "report", "x", "--out", "y", "--cluster", "local", cwd=tmp_path, env=env)
    assert submit.returncode == 2 and "sbatch" in submit.stderr and "--local" in submit.stderr
    # --dry-run needs no SLURM: it prints the plan.
    dry = adm("pipeline", str(TINY), "--cluster", "local", "--var", f"src={mini_src}", "--dry-run", cwd=tmp_path, env=env)
    assert dry.returncode == 0 and "evaluate.scale-4.0" in dry.stdout


# ---------------------------------------------------------------------------------------- --local
SMALL = """
name: small
out: out
vars: {{src: {src}}}
stages:
  prepare:
    command: prepare-imagenet
    args: "{{src}} {{out}}/shards --allow-custom-classes --samples-per-shard 8 --no-progress"
  reference:
    command: make-reference
    after: [prepare]
    args: "{{out}}/shards --size 16 --num-images 16 --no-stats --out {{out}}/reference.npz"
  inspect:
    command: inspect-shards
    after: [prepare]
    args: "{{out}}/shards"
    local_tasks: 2
"""


def test_local_pipeline_runs_in_order_and_a_failure_names_stage_and_log(tmp_path, adm, mini_src):
    config = _write(tmp_path / "small.yaml", SMALL.format(src=mini_src))
    ok = adm("pipeline", str(config), "--local", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    record = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert record["mode"] == "local" and [v["state"] for v in record["stages"].values()] == ["COMPLETED"] * 3
    assert (tmp_path / "out" / "reference.npz").is_file()
    inspect_log = (tmp_path / "out" / "logs" / "inspect.log").read_text()
    assert inspect_log.count("samples per class") == 2  # local_tasks: 2 ran it as two processes

    broken = _write(tmp_path / "broken.yaml", SMALL.format(src=tmp_path / "missing-src"))
    failed = adm("pipeline", str(broken), "--local", "--out", str(tmp_path / "out2"), cwd=tmp_path)
    log = tmp_path / "out2" / "logs" / "prepare.log"
    assert failed.returncode == 1
    assert "stage 'prepare' failed" in failed.stderr and str(log) in failed.stderr
    assert "missing-src" in log.read_text()
    assert not (tmp_path / "out2" / "logs" / "reference.log").exists()  # the pipeline stopped


# ---------------------------------------------------------------------------------------- SLURM
def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.mark.slurm
def test_tiny_pipeline_end_to_end_through_slurm(cluster, tmp_path, adm, mini_src):
    run = adm("pipeline", str(TINY), "--cluster", cluster, "--var", f"src={mini_src}", "--out", str(tmp_path / "out"),
              "--poll", "1", cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    record = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert record["mode"] == "slurm" and len(record["stages"]) == 10
    details = {stage: jobs.show_job(info["job_id"]) for stage, info in record["stages"].items()}
    for stage, fields in details.items():
        assert fields["JobState"] == "COMPLETED", (stage, fields)
    # afterok held: no job started before every job it waits for had ended.
    for stage, info in record["stages"].items():
        for dep in info["after"]:
            assert _time(details[stage]["StartTime"]) >= _time(details[dep]["EndTime"]), (stage, dep)
    out = tmp_path / "out"
    for scale in ("0.0", "4.0"):
        assert (out / "samples" / f"scale-{scale}" / "samples_8x16x16x3.npz").is_file()
        assert "fid" in json.loads((out / "eval" / f"scale-{scale}" / "metrics.json").read_text())["metrics"]
    assert (out / "report" / "report.md").is_file()


@pytest.mark.slurm
def test_failed_stage_stops_the_slurm_pipeline(cluster, tmp_path, adm):
    config = _write(tmp_path / "broken.yaml", SMALL.format(src=tmp_path / "missing-src"))
    run = adm("pipeline", str(config), "--cluster", cluster, "--poll", "1", cwd=tmp_path, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    record = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    prepare_log = record["stages"]["prepare"]["log"]
    assert "stage 'prepare' failed" in run.stderr and prepare_log in run.stderr
    assert "missing-src" in Path(prepare_log).read_text()
    assert jobs.show_job(record["stages"]["prepare"]["job_id"])["JobState"] == "FAILED"
    # pipeline.json ends with every stage's final state, and the error names every stage that will not
    # run, whether this command or SLURM (through the failed dependency) cancelled it.
    assert record["stages"]["prepare"]["state"] == "FAILED"
    assert "will not run: reference, inspect" in run.stderr
    for stage in ("reference", "inspect"):  # never ran
        fields = jobs.show_job(record["stages"][stage]["job_id"])
        assert fields["JobState"] == "CANCELLED", fields
        assert record["stages"][stage]["state"] == "CANCELLED", record
        assert not Path(record["stages"][stage]["log"]).exists()  # no task ever started


@pytest.mark.slurm
def test_failure_records_every_final_state_and_names_every_stage_that_will_not_run(cluster, tmp_path, adm, shards):
    """A stage still running when another fails is cancelled: pipeline.json says CANCELLED, not RUNNING."""
    config = _write(tmp_path / "race.yaml", f"""
name: race
out: out
stages:
  train:
    command: train
    args: "--run-dir {{out}}/run --data {shards} --set total_steps=100000 num_workers=0 progress=false"
  broken:
    command: inspect-shards
    args: "{{out}}/no-such-shards"
  after_broken:
    command: inspect-shards
    after: [broken]
    args: "{shards}"
  after_train:
    command: inspect-shards
    after: [train]
    args: "{shards}"
""")
    run = adm("pipeline", str(config), "--cluster", cluster, "--poll", "1", cwd=tmp_path, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "stage 'broken' failed" in run.stderr
    assert "will not run: train, after_broken, after_train" in run.stderr
    record = json.loads((tmp_path / "out" / "pipeline.json").read_text())["stages"]
    assert {stage: info["state"] for stage, info in record.items()} == {
        "train": "CANCELLED", "broken": "FAILED", "after_broken": "CANCELLED", "after_train": "CANCELLED"}
    for stage, info in record.items():  # the record agrees with SLURM's own
        assert jobs.show_job(info["job_id"])["JobState"] == info["state"], stage
