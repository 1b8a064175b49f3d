"""The pipeline's stage graph (from a YAML file or a dict) and its local runner; slurm/pipeline_jobs.py
submits the same graph to SLURM, and `adm demo` is a pipeline definition run by `run_local`.

A pipeline file names `adm` stages, their options and what each waits for:

    name: imagenet64
    out: runs/imagenet64                 # {out} in any argument; relative to where you run adm
    vars: {imagenet: /data/ILSVRC2012_img_train.tar}   # more {placeholders}; --var KEY=VALUE overrides
    resources: {time_min: 1440}          # defaults for every SLURM job (over the cluster profile)
    stages:
      prepare:   {command: prepare-imagenet, args: "{imagenet} {out}/shards"}
      train:     {after: [prepare], args: [--run-dir, "{out}/diffusion", --data, "{out}/shards"],
                  resources: {nodes: 4, gpus_per_node: 8}}
      sample:    {after: [train], sweep: {scale: [1.0, 4.0]}, args: "... --classifier-scale {scale} --out {out}/samples/s{scale}"}

`command` defaults to the stage's name; `args` is a list or one string (split like a shell); `after`
lists stage names; `sweep` expands a stage into one job per combination of values (a stage after a
swept one waits only for the matching expansions when it sweeps the same key, else for all of them);
`local_tasks` runs a stage with that many processes under torchrun in --local mode.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from runtime.files import atomic_write_json
from runtime.names import check_inside, check_name, check_text, parse_error_line

_STAGE_KEYS = {"command", "args", "after", "sweep", "resources", "local_tasks"}
_TOP_KEYS = {"name", "out", "cluster", "vars", "resources", "stages"}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One job of the pipeline (a swept stage gives one Stage per combination)."""

    id: str                      # "train", "sample.scale-4.0"
    name: str                    # the key in the file: "sample"
    command: str                 # the adm command: "sample"
    argv: tuple[str, ...]
    after: tuple[str, ...]       # ids of the stages it waits for
    resources: dict[str, Any]    # SLURM resources of this stage (over the file's and the profile's)
    sweep: tuple[tuple[str, str], ...] = ()
    local_tasks: int = 1

    @property
    def command_line(self) -> str:
        """`adm COMMAND ARGS...` as a shell would show it."""
        return shlex.join(["adm", self.command, *self.argv])


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A validated stage graph, in an order where every stage comes after what it waits for."""

    name: str
    out: Path
    cluster: str | None
    resources: dict[str, Any]
    stages: tuple[Stage, ...]
    source: Path

    def stage(self, stage_id: str) -> Stage:
        """The stage with this id."""
        return next(s for s in self.stages if s.id == stage_id)

    def log_path(self, stage_id: str) -> Path:
        """Where --local writes a stage's output (always inside OUT/logs)."""
        return check_inside(self.out / "logs" / f"{check_name(stage_id, 'stage')}.log", self.out / "logs", "stage log")


class StageFailed(Exception):
    """A stage ended without success; the pipeline stopped there."""

    def __init__(self, stage_id: str, log: Path, detail: str, tail: str = "") -> None:
        self.stage_id, self.log, self.detail, self.tail = stage_id, log, detail, tail
        super().__init__(f"stage '{stage_id}' failed ({detail}); the pipeline stopped. Its log: {log}")


def _substitute(text: str, values: dict[str, str], where: str) -> str:
    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise ValueError(f"{where}: unknown placeholder {{{key}}}; known: {', '.join(sorted(values))} "
                             f"(add it under 'vars:' or pass --var {key}=VALUE)")
        return values[key]

    # {{ and }} stand for literal braces.
    parts = text.split("{{")
    return "{".join(_PLACEHOLDER.sub(replace, part).replace("}}", "}") for part in parts)


def _as_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ValueError(f"{where} must be a list or a string, got {type(value).__name__}")


def _sweep_values(raw: Any, where: str) -> list[dict[str, str]]:
    if raw is None:
        return [{}]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}.sweep must map a name to a list of values, e.g. {{scale: [1.0, 4.0]}}")
    keys = [check_name(k, f"{where}.sweep key") for k in raw]
    lists = []
    for key, given in zip(keys, raw.values()):
        values = given if isinstance(given, (list, tuple)) else [given]
        if not values:
            raise ValueError(f"{where}.sweep.{key} is empty")
        lists.append([str(v) for v in values])
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def _stage_id(name: str, sweep: dict[str, str]) -> str:
    if not sweep:
        return name
    return name + "." + ".".join(f"{k}-{re.sub(r'[^A-Za-z0-9_.-]', '_', v)}" for k, v in sweep.items())


def _order(names: list[str], after: dict[str, list[str]], source: Path) -> list[str]:
    order, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"{source}: stages wait for each other in a cycle: {' -> '.join(path + [name])}")
        state[name] = "visiting"
        for dep in after[name]:
            visit(dep, path + [name])
        state[name] = "done"
        order.append(name)

    for name in names:
        visit(name, [])
    return order


def load_pipeline(path: str | os.PathLike, out: str | None = None, variables: dict[str, str] | None = None,
                  validate: bool = True) -> Pipeline:
    """Read a pipeline file, expand sweeps and placeholders, and check every stage's options.

    `out` and `variables` override the file's `out` and `vars`. With `validate`, each stage's
    arguments are parsed by the stage's own parser, so mistakes surface before anything runs.
    Raises FileNotFoundError / ValueError naming the file, the stage and the fix.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"pipeline file {path} does not exist (see slurm/pipeline.example.yaml)")
    try:
        data = yaml.safe_load(source.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML: {parse_error_line(err)}") from None
    return build_pipeline(data, source, out=out, variables=variables, validate=validate)


def build_pipeline(data: Any, source: str | os.PathLike, out: str | None = None,
                   variables: dict[str, str] | None = None, validate: bool = True) -> Pipeline:
    """A Pipeline from the mapping a pipeline file holds (`source` names it in errors and records).

    Same keys and checks as `load_pipeline`; programs that define pipelines (`adm demo`) use this.
    """
    source = Path(source)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) or not data["stages"]:
        raise ValueError(f"{source} must be a mapping with a non-empty 'stages:' mapping (see slurm/pipeline.example.yaml)")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")

    name = check_name(data.get("name") or source.stem, f"{source}: pipeline name")
    if not isinstance(data.get("vars") or {}, dict):
        raise ValueError(f"{source}: 'vars' must be a mapping of names to values")
    values = {str(k): str(v) for k, v in (data.get("vars") or {}).items()}
    values.update(variables or {})
    out_text = _substitute(str(out or data.get("out") or f"runs/{name}"), values, f"{source}: out")
    out_dir = Path(check_text(out_text, f"{source}: out")).absolute()
    values.update({"out": str(out_dir), "name": name, "config_dir": str(source.resolve().parent)})

    from launch.cli import COMMANDS

    raw_stages: dict[str, dict] = {}
    for stage_name, spec in data["stages"].items():
        where = f"{source}: stage '{stage_name}'"
        check_name(stage_name, f"{source}: stage name")
        if not isinstance(spec or {}, dict):
            raise ValueError(f"{where} must be a mapping (command, args, after, ...)")
        spec = dict(spec or {})
        bad = sorted(set(spec) - _STAGE_KEYS)
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; known: {sorted(_STAGE_KEYS)}")
        command = str(spec.get("command") or stage_name)
        if command not in COMMANDS:
            raise ValueError(f"{where}: unknown command {command!r}; set 'command:' to one of {', '.join(COMMANDS)}")
        after = spec.get("after") or []
        after = [after] if isinstance(after, str) else [str(a) for a in after]
        for dep in after:
            if dep not in data["stages"]:
                raise ValueError(f"{where}: waits for unknown stage {dep!r}; stages: {', '.join(data['stages'])}")
        local_tasks = spec.get("local_tasks", 1)
        if not isinstance(local_tasks, int) or local_tasks < 1:
            raise ValueError(f"{where}: local_tasks must be a positive integer, got {local_tasks!r}")
        raw_stages[str(stage_name)] = dict(spec, command=command, after=after, local_tasks=local_tasks, where=where)

    expansions: dict[str, list[Stage]] = {}
    for stage_name in _order(list(raw_stages), {n: s["after"] for n, s in raw_stages.items()}, source):
        spec = raw_stages[stage_name]
        where = spec["where"]
        resources = spec.get("resources") or {}
        if not isinstance(resources, dict):
            raise ValueError(f"{where}: resources must be a mapping, got {type(resources).__name__}")
        resources = dict(resources)
        made = []
        for sweep in _sweep_values(spec.get("sweep"), where):
            argv = [_substitute(a, {**values, **sweep}, where) for a in _as_list(spec.get("args"), f"{where}: args")]
            deps = []
            for dep in spec["after"]:
                for candidate in expansions[dep]:
                    shared = dict(candidate.sweep).keys() & sweep.keys()
                    if all(dict(candidate.sweep)[k] == sweep[k] for k in shared):
                        deps.append(candidate.id)
            made.append(Stage(id=_stage_id(stage_name, sweep), name=stage_name, command=spec["command"],
                              argv=tuple(argv), after=tuple(deps), resources=resources,
                              sweep=tuple(sweep.items()), local_tasks=spec["local_tasks"]))
        expansions[stage_name] = made
    stages = tuple(s for group in expansions.values() for s in group)
    pipeline = Pipeline(name=name, out=out_dir, cluster=data.get("cluster"), resources=dict(data.get("resources") or {}),
                        stages=stages, source=source)
    if validate:
        validate_stages(pipeline)
    return pipeline


def validate_stages(pipeline: Pipeline) -> None:
    """Parse every stage's arguments with its command's parser; ValueError names the stage."""
    from launch.cli import parse_stage_args

    for stage in pipeline.stages:
        try:
            parse_stage_args(stage.command, list(stage.argv))
        except ValueError as err:
            raise ValueError(f"{pipeline.source}: stage '{stage.id}': {err}") from None


def describe(pipeline: Pipeline) -> str:
    """The plan, one stage per line with what it waits for (for --dry-run and logs)."""
    lines = [f"pipeline '{pipeline.name}' from {pipeline.source}, output in {pipeline.out}:"]
    for stage in pipeline.stages:
        wait = f"  (after {', '.join(stage.after)})" if stage.after else ""
        lines.append(f"  {stage.id}: {stage.command_line}{wait}")
    return "\n".join(lines)


def write_record(pipeline: Pipeline, mode: str, stages: dict[str, dict]) -> Path:
    """OUT/pipeline.json: what ran where (job ids, logs, states); rewritten atomically as it changes."""
    path = pipeline.out / "pipeline.json"
    atomic_write_json(path, {"name": pipeline.name, "config": str(pipeline.source.resolve()), "mode": mode,
                             "out": str(pipeline.out), "stages": stages})
    return path


def _local_command(stage: Stage) -> list[str]:
    if stage.local_tasks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stage.local_tasks}",
                "-m", "launch.cli", stage.command, *stage.argv]
    return [sys.executable, "-m", "launch.cli", stage.command, *stage.argv]


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log ('' if it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _previous_record(pipeline: Pipeline) -> dict[str, dict]:
    """Stage records of an earlier local run in the same folder ({} if none or unreadable)."""
    try:
        old = json.loads((pipeline.out / "pipeline.json").read_text())
    except (OSError, ValueError):
        return {}
    stages = old.get("stages") if isinstance(old, dict) and old.get("mode") == "local" else None
    return stages if isinstance(stages, dict) else {}


def run_local(pipeline: Pipeline, echo: Callable[[str], None] = print, env: dict[str, str] | None = None,
              rerun_completed: bool = False) -> dict[str, float]:
    """Run every stage here, one after another in graph order; returns seconds per stage.

    Each stage is a fresh `adm` process (torchrun with `local_tasks` > 1) whose output goes to
    OUT/logs/STAGE.log, with `env` added to this process's environment. A stage that completed in an
    earlier run in the same folder with the same command line is skipped (its seconds are those of
    that run) unless `rerun_completed`; every other stage resumes from what it wrote. Raises
    StageFailed for the first stage that does not exit 0; OUT/pipeline.json then says which stage
    failed and that the stages after it did not run.
    """
    pipeline.out.mkdir(parents=True, exist_ok=True)
    previous = {} if rerun_completed else _previous_record(pipeline)
    record = {s.id: {"command": s.command_line, "log": str(pipeline.log_path(s.id)), "state": "PENDING"}
              for s in pipeline.stages}
    write_record(pipeline, "local", record)
    seconds: dict[str, float] = {}
    for stage in pipeline.stages:
        log = pipeline.log_path(stage.id)
        before = previous.get(stage.id) or {}
        if before.get("state") == "COMPLETED" and before.get("command") == stage.command_line:
            seconds[stage.id] = float(before.get("seconds", 0.0))
            record[stage.id].update(state="COMPLETED", seconds=seconds[stage.id], skipped=True)
            write_record(pipeline, "local", record)
            echo(f"[pipeline] {stage.id}: done before ({seconds[stage.id]:.0f}s), skipped")
            continue
        log.parent.mkdir(parents=True, exist_ok=True)
        echo(f"[pipeline] {stage.id}: {stage.command_line}")
        record[stage.id]["state"] = "RUNNING"
        write_record(pipeline, "local", record)
        start = time.monotonic()
        stage_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log, "w") as handle:
            handle.write(f"$ {stage.command_line}\n")
            handle.flush()
            try:
                code = subprocess.run(_local_command(stage), stdout=handle, stderr=subprocess.STDOUT,
                                      env=stage_env).returncode
            except KeyboardInterrupt:
                code = 130
        seconds[stage.id] = time.monotonic() - start
        record[stage.id]["state"] = "COMPLETED" if code == 0 else "FAILED"
        record[stage.id]["seconds"] = round(seconds[stage.id], 1)
        if code != 0:
            not_run = [s.id for s in pipeline.stages if record[s.id]["state"] == "PENDING"]
            for stage_id in not_run:
                record[stage_id]["state"] = "NOT_RUN"
            write_record(pipeline, "local", record)
            detail = f"exit status {code}" + (f"; not run: {', '.join(not_run)}" if not_run else "")
            raise StageFailed(stage.id, log, detail, tail(log))
        write_record(pipeline, "local", record)
        echo(f"[pipeline] {stage.id}: done in {seconds[stage.id]:.0f}s")
    return seconds
