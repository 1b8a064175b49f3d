"""Cluster profiles: what a site's SLURM needs to hear (partition, account, GPUs, time...) in one YAML file.

A profile is `slurm/NAME.yaml` shipped with the package, or any YAML file given by path. Every key is
optional; `Resources` holds the per-job amounts that a pipeline stage or a command-line flag may
override. Unknown keys are an error (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from runtime.names import check_text, parse_error_line

PROFILE_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one job asks for. None means "not said here": the next layer down decides."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    # One task per GPU by default; set explicitly for CPU-only jobs (e.g. 2 gloo tasks).
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    # Per node, in sbatch's syntax ("64G", "0" = all of the node's memory).
    mem: str | None = None
    time_min: int | None = None

    def merged(self, override: "Resources") -> "Resources":
        """This layer with every field that `override` sets replaced by its value."""
        changes = {f.name: getattr(override, f.name) for f in dataclasses.fields(override)
                   if getattr(override, f.name) is not None}
        if override.gpus_per_node is not None and override.tasks_per_node is None:
            # A new GPU count brings its own task count (one per GPU), not the lower layer's.
            changes["tasks_per_node"] = None
        return dataclasses.replace(self, **changes)

    def resolved(self) -> "Resources":
        """Fill the remaining gaps with working defaults and check the numbers."""
        nodes = 1 if self.nodes is None else self.nodes
        gpus = 0 if self.gpus_per_node is None else self.gpus_per_node
        tasks = self.tasks_per_node if self.tasks_per_node is not None else max(gpus, 1)
        cpus = 1 if self.cpus_per_task is None else self.cpus_per_task
        time_min = 60 if self.time_min is None else self.time_min
        for name, value, low in (("nodes", nodes, 1), ("gpus_per_node", gpus, 0), ("tasks_per_node", tasks, 1),
                                 ("cpus_per_task", cpus, 1), ("time_min", time_min, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.mem is not None and not _MEM.fullmatch(str(self.mem)):
            raise ValueError(f"mem {str(self.mem)!r} is not an sbatch memory amount such as 64G, 480000M or 0")
        if gpus and tasks != gpus:
            raise ValueError(
                f"tasks_per_node={tasks} but gpus_per_node={gpus}: stages run one task per GPU; "
                f"drop --tasks-per-node or set it to {gpus}")
        return Resources(nodes=nodes, gpus_per_node=gpus, tasks_per_node=tasks, cpus_per_task=cpus,
                         mem=None if self.mem is None else str(self.mem), time_min=time_min)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str) -> "Resources":
        """Build from a mapping (a profile or a pipeline stage); `where` names it in error messages."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown resource key(s) {unknown}; known: {sorted(known)}")
        if data.get("mem") is not None and not _MEM.fullmatch(str(data["mem"])):
            raise ValueError(f"{where}: mem {str(data['mem'])!r} is not an sbatch memory amount such as 64G, "
                             "480000M or 0")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ClusterProfile:
    """Everything about one cluster that does not change from job to job."""

    name: str
    description: str = ""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    resources: Resources = Resources()
    # SLURM sends the preemption signal this long before the time limit: time to checkpoint.
    signal_delay_s: int = 180
    # After the signal, how long a stage may take to save and stop before it is requeued anyway.
    preempt_grace_s: int | None = None
    # How many times a job that reaches its time limit is requeued (preemptions are not counted).
    max_requeues: int = 20
    # Shell lines run at the start of every job (module load, activating an environment...).
    setup: tuple[str, ...] = ()
    # Environment variables exported in every job.
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Further sbatch options, name -> value (true for a bare flag), e.g. {"exclusive": true}.
    sbatch: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    @property
    def grace_s(self) -> int:
        """Seconds between the preemption signal and a forced requeue."""
        if self.preempt_grace_s is not None:
            return self.preempt_grace_s
        return max(5, self.signal_delay_s - 30)


_MEM = re.compile(r"[0-9]+[KMGTkmgt]?")
_SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_profile(profile: ClusterProfile) -> None:
    """Refuse profile values that would change a job script beyond their value (ValueError naming them).

    Partition, account, qos, constraint, env values and sbatch values: no control characters; env keys
    shell variable names; sbatch keys option names. `setup` lines are shell code by design: a profile
    runs in every job it submits, so take profiles only from people you trust (docs/security.md).
    """
    where = f"cluster profile {profile.source or profile.name}"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key) is not None:
            check_text(getattr(profile, key), f"{where}: {key}")
    for key, value in profile.env.items():
        if not _ENV_KEY.fullmatch(str(key)):
            raise ValueError(f"{where}: env key {str(key)!r} is not a shell variable name")
        check_text(value, f"{where}: env {key}")
    for key, value in profile.sbatch.items():
        if not _SBATCH_KEY.fullmatch(str(key)):
            raise ValueError(f"{where}: sbatch option {str(key)!r} is not an option name")
        check_text(value, f"{where}: sbatch {key}")


_PROFILE_KEYS = {"description", "partition", "account", "qos", "constraint", "signal_delay_s", "preempt_grace_s",
                 "max_requeues", "setup", "env", "sbatch"}


def available_profiles() -> list[str]:
    """Names of the profiles shipped in slurm/ (usable as `--cluster NAME`)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if not p.stem.startswith("pipeline"))


def _resolve_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not candidate.is_file():
            raise FileNotFoundError(f"cluster profile file {name_or_path!r} does not exist; "
                                    f"give an existing YAML file or one of: {', '.join(available_profiles())}")
        return candidate
    shipped = PROFILE_DIR / f"{name_or_path}.yaml"
    if name_or_path in available_profiles():
        return shipped
    raise ValueError(f"unknown cluster profile {name_or_path!r}; available: {', '.join(available_profiles())} "
                     f"(or the path of your own YAML file, see docs/slurm.md)")


def load_profile(name_or_path: str) -> ClusterProfile:
    """Load a cluster profile by name (a file shipped in slurm/) or by path.

    Raises ValueError for an unknown name (listing the known ones) or a malformed file.
    """
    if not name_or_path:
        raise ValueError(f"no cluster profile given; pass --cluster with one of: {', '.join(available_profiles())}")
    path = _resolve_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"cluster profile {path} is not valid YAML: {parse_error_line(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"cluster profile {path} must be a mapping of keys to values")
    resource_keys = {f.name for f in dataclasses.fields(Resources)}
    unknown = sorted(set(data) - _PROFILE_KEYS - resource_keys)
    if unknown:
        raise ValueError(f"cluster profile {path}: unknown key(s) {unknown}; "
                         f"known: {sorted(_PROFILE_KEYS | resource_keys)}")
    resources = Resources.from_dict({k: data[k] for k in resource_keys if k in data}, str(path))
    setup = data.get("setup") or []
    if isinstance(setup, str):
        setup = [setup]
    if not all(isinstance(line, str) for line in setup):
        raise ValueError(f"cluster profile {path}: 'setup' must be a list of shell lines")
    for key in ("env", "sbatch"):
        if not isinstance(data.get(key) or {}, dict):
            raise ValueError(f"cluster profile {path}: '{key}' must be a mapping of names to values")
    env = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
    sbatch = dict(data.get("sbatch") or {})
    for key, value in (("signal_delay_s", data.get("signal_delay_s")), ("max_requeues", data.get("max_requeues")),
                       ("preempt_grace_s", data.get("preempt_grace_s"))):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"cluster profile {path}: {key} must be a non-negative integer, got {value!r}")
    profile = ClusterProfile(
        name=path.stem, description=str(data.get("description", "")), partition=data.get("partition"),
        account=data.get("account"), qos=data.get("qos"), constraint=data.get("constraint"),
        resources=resources, signal_delay_s=data.get("signal_delay_s", 180),
        preempt_grace_s=data.get("preempt_grace_s"), max_requeues=data.get("max_requeues", 20),
        setup=tuple(setup), env=env, sbatch=sbatch, source=str(path))
    check_profile(profile)
    return profile
