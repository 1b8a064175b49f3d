"""Typed training configs: a preset plus a YAML/TOML file plus `--set key=value` overrides.

Resolution order (later wins): dataclass defaults -> the preset's recipe (`Preset.training`:
batch size, lr, weight decay, EMA rate, total steps) -> the config file -> `--set` overrides.
The resolved config (with the resolved `Preset.to_dict()`) is what `RUN/config.json` and every
checkpoint hold, and what a resumed run is compared against.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from runtime.names import check_number, parse_error_line
from launch.choices import PRECISIONS, STRATEGIES

LR_SCHEDULES = ("constant", "linear", "cosine")
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")

# Fields a resumed run may change: they steer bookkeeping, not the optimisation trajectory.
RESUMABLE_FIELDS = frozenset({
    "total_steps", "log_every", "save_every", "keep_last", "sample_every", "sample_steps",
    "sample_count", "num_workers", "compile", "eval_every", "eval_batches", "max_nonfinite_steps",
    "allow_slow_precision", "progress", "strategy", "fsdp_shard_size", "skip_bad_shards", "preempt_check_every",
})


@dataclasses.dataclass
class TrainConfig:
    """Options shared by `adm train` and `adm train-classifier` (see docs/training.md)."""

    # What to train and on what.
    preset: str = "tiny-unet"
    model: dict = dataclasses.field(default_factory=dict)  # preset overrides: {"model_channels": 64, "diffusion.noise_schedule": "cosine"}
    data: str = ""  # folder of WebDataset shards (or a shard pattern)
    init_from: str = ""  # our model file, or "openai:PATH" for a released checkpoint
    random_flip: bool = True  # ADM's random horizontal flips; false for data that is not mirror-symmetric (digits, text)
    # Optimisation. None = the preset's recipe.
    batch_size: int | None = None  # global batch: world_size * grad_accum * per-rank micro batch
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"  # constant | linear (to zero at total_steps) | cosine
    warmup_steps: int = 0
    total_steps: int | None = None
    grad_clip: float = 0.0  # 0 = no clipping (the grad norm is logged either way)
    ema_rates: tuple[float, ...] | None = None  # None = (preset's ema_rate,)
    ema_halflife_kimg: float = 0.0  # > 0 adds an EMA whose half-life is this many thousand images
    # System.
    strategy: str = "ddp"
    fsdp_shard_size: int = 0  # 0 = shard over all ranks; N = shard inside groups of N ranks, replicate across (HSDP)
    zero_stage: int = 2
    deepspeed_config: str = ""  # JSON file deep-merged over the generated DeepSpeed config
    precision: str = "fp32"
    allow_slow_precision: bool = False  # run bf16/fp16 even where the hardware only emulates it
    loss_scale_init: float = 2.0 ** 16
    loss_scale_floor: float = 1.0
    loss_scale_window: int = 1000  # overflow-free steps before the scale doubles
    max_nonfinite_steps: int = 50  # non-finite steps in a row before training stops with an error
    compile: bool = False
    seed: int = 0
    deterministic: bool = False  # deterministic kernels: bitwise-reproducible resume on CPU
    num_workers: int = 2
    skip_bad_shards: bool = False  # skip (and log) unreadable shards instead of stopping with an error
    # Bookkeeping.
    log_every: int = 50
    save_every: int = 5000
    keep_last: int = 3
    progress: bool = True  # tqdm bar when stderr is a terminal
    preempt_check_every: int = 10  # steps between the ranks' agreements on a stop signal (fewer when steps are slow)

    kind: typing.ClassVar[str] = "diffusion"

    def to_dict(self) -> dict:
        """Plain-JSON view (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class DiffusionTrainConfig(TrainConfig):
    """`adm train`: the ADM hybrid loss (mse + vb)."""

    timestep_sampler: str = "uniform"  # uniform | loss-second-moment
    sample_every: int = 0  # steps between EMA sample grids in TensorBoard; 0 = never
    sample_steps: int = 25  # DDIM steps of the grid
    sample_count: int = 16

    kind: typing.ClassVar[str] = "diffusion"


@dataclasses.dataclass
class ClassifierTrainConfig(TrainConfig):
    """`adm train-classifier`: noisy classifier, cross-entropy at uniform t."""

    preset: str = "tiny-classifier"
    lr_schedule: str = "linear"
    ema_rates: tuple[float, ...] | None = ()
    val_data: str = ""  # optional folder of validation shards
    eval_every: int = 0  # steps between validation passes; 0 = only at the end
    eval_batches: int = 0  # 0 = the whole validation set

    kind: typing.ClassVar[str] = "classifier"


def config_class(kind: str) -> type[TrainConfig]:
    """The config dataclass of a job kind ("diffusion" or "classifier")."""
    return {"diffusion": DiffusionTrainConfig, "classifier": ClassifierTrainConfig}[kind]


# ----------------------------------------------------------------------------------------------
# Parsing values by the field's annotation

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Turn a string / YAML value into the annotated type, or raise a ValueError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value) if tp is float else _to_int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return "" if value is None else str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0]
        items = tuple(_coerce(name, v, item) for v in value)
        if args[-1] is not Ellipsis and len(items) != len(args):
            raise ValueError(f"{name} needs {len(args)} values, got {len(items)}: {value!r}")
        return items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping (e.g. --set {name}.model_channels=64), got {value!r}")
        return dict(value)
    raise AssertionError(f"unhandled annotation {tp} of {name}")


def _to_int(value: Any) -> int:
    if isinstance(value, int):
        return value
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _parse_scalar(text: str) -> Any:
    """A `--set` value: YAML syntax (so lists and booleans work), strings as they are."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# Names users bring from other trainers (guided-diffusion's flags among them).
_ALIASES = {"learning_rate": "lr", "microbatch": "grad_accum", "max_steps": "total_steps", "steps": "total_steps",
            "iterations": "total_steps", "ema_rate": "ema_rates", "use_fp16": "precision", "fp16": "precision",
            "warmup": "warmup_steps", "save_interval": "save_every", "log_interval": "log_every",
            "data_dir": "data", "resume_checkpoint": "init_from", "schedule_sampler": "timestep_sampler"}


def _unknown(cls: type, key: str) -> ValueError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = ([_ALIASES[key]] if key in _ALIASES else []) + difflib.get_close_matches(key, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known keys: {', '.join(names)}."
    return ValueError(f"unknown config key {key!r} for {cls.__name__}.{hint}")


def _apply(values: dict, cls: type, key: str, value: Any) -> None:
    """Set one (possibly dotted `model.x`) key into `values`, a dict of raw field values."""
    types_ = _field_types(cls)
    head, _, rest = key.partition(".")
    if head not in types_:
        raise _unknown(cls, head)
    if rest:
        if head != "model":
            raise ValueError(f"only model.* keys may be dotted (model.model_channels=64), got {key!r}")
        values.setdefault("model", {})
        values["model"] = {**values["model"], rest: value}
        return
    if head == "model" and isinstance(value, dict):
        values["model"] = {**values.get("model", {}), **_flatten(value)}
        return
    values[head] = value


def _flatten(mapping: dict, prefix: str = "") -> dict:
    """{"diffusion": {"noise_schedule": "cosine"}} -> {"diffusion.noise_schedule": "cosine"}."""
    out = {}
    for k, v in mapping.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON file of config keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass an existing .yaml, .toml or .json file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not text ({err})") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {parse_error_line(err)}") from None
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of config keys, not {type(data).__name__}")
    # A saved RUN/config.json holds the resolved preset too; only the training keys are inputs.
    data = data.get("train", data)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: 'train' must hold a mapping of config keys")
    return data


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """`["lr=1e-4", "model.dropout=0.1"]` -> [("lr", ...), ("model.dropout", 0.1)]."""
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out.append((key.strip(), _parse_scalar(value.strip())))
    return out


def build_config(kind: str, file: str | None = None, sets: list[str] | None = None,
                 **explicit: Any) -> TrainConfig:
    """Build the (not yet preset-resolved) config of a job from a file, `--set` items and flags.

    `explicit` holds values given by dedicated command-line flags (None = not given); they are
    applied after the file and before `--set`.
    """
    cls = config_class(kind)
    values: dict[str, Any] = {}
    if file:
        for key, value in read_config_file(file).items():
            if key in ("data", "val_data") and "pipe:" in str(value):
                # A pipe: source runs a shell command; a shared config file must not be able to.
                raise ValueError(f"config file {file}: {key}={value!r} runs a shell command (pipe:); config files "
                                 f"may come from others, so give such a source on the command line (--data)")
            _apply(values, cls, key, value)
    for key, value in explicit.items():
        if value is not None:
            _apply(values, cls, key, value)
    for key, value in parse_set(sets):
        _apply(values, cls, key, value)
    types_ = _field_types(cls)
    kwargs = {k: _coerce(k, v, types_[k]) for k, v in values.items()}
    return cls(**kwargs)


def resolve(config: TrainConfig, require_data: bool = True):
    """Fill recipe defaults from the preset and validate; returns (config, Preset).

    The preset is built with `config.model` overrides applied (a bad override names itself).
    """
    from diffusion_core import presets

    if config.preset not in presets.names():
        close = difflib.get_close_matches(config.preset, presets.names(), n=3)
        raise ValueError(f"unknown preset {config.preset!r}; choose one of {', '.join(presets.names())}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    for key, value in config.model.items():
        try:
            number = float(value) if isinstance(value, (float, str)) else None
        except ValueError:
            number = None
        if number is not None:  # 'nan' arrives as a string from YAML
            check_number(number, f"model.{key}", *((0.0, 1.0) if key.endswith("dropout") else ()))
    try:
        preset = presets.get(config.preset, **config.model)
    except (TypeError, KeyError) as err:
        raise ValueError(f"bad model override in {config.model!r} for preset {config.preset}: {err}") from None
    want = "classifier" if config.kind == "classifier" else ("diffusion", "upsampler")
    if preset.kind not in want:
        job = "adm train-classifier" if preset.kind == "classifier" else "adm train"
        raise ValueError(f"preset {config.preset} is a {preset.kind} model; train it with `{job}`")
    recipe = dict(preset.training or {})
    cfg = dataclasses.replace(config)
    for field, key in (("batch_size", "batch_size"), ("lr", "lr"), ("weight_decay", "weight_decay"),
                       ("total_steps", "total_steps")):
        if getattr(cfg, field) is None:
            setattr(cfg, field, recipe.get(key, {"batch_size": 32, "lr": 1e-4, "weight_decay": 0.0,
                                                 "total_steps": 1000}[key]))
    if cfg.ema_rates is None:
        rate = recipe.get("ema_rate", 0.9999)
        cfg.ema_rates = tuple(rate) if isinstance(rate, (list, tuple)) else (float(rate),)
    cfg.batch_size, cfg.total_steps = int(cfg.batch_size), int(cfg.total_steps)
    cfg.lr, cfg.weight_decay = float(cfg.lr), float(cfg.weight_decay)
    cfg.ema_rates = tuple(float(r) for r in cfg.ema_rates)
    validate(cfg, require_data)
    return cfg, preset


def validate(cfg: TrainConfig, require_data: bool = True) -> None:
    """Raise a ValueError naming the first bad option and how to fix it."""
    def choice(name, options):
        if getattr(cfg, name) not in options:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not one of {', '.join(options)}")

    choice("strategy", STRATEGIES)
    choice("precision", PRECISIONS)
    choice("lr_schedule", LR_SCHEDULES)
    if isinstance(cfg, DiffusionTrainConfig):
        choice("timestep_sampler", TIMESTEP_SAMPLERS)
    for name in ("batch_size", "grad_accum", "total_steps", "log_every", "save_every", "keep_last",
                 "preempt_check_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    for rate in cfg.ema_rates:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"EMA rates must lie in (0, 1), got {rate} in ema_rates={cfg.ema_rates}")
    # Every number finite and in range: NaN passes `x <= 0` checks and poisons training silently.
    check_number(cfg.lr, "lr", 0.0, low_open=True)
    check_number(cfg.weight_decay, "weight_decay", 0.0)
    check_number(cfg.adam_eps, "adam_eps", 0.0, low_open=True)
    for beta in cfg.adam_betas:
        check_number(beta, "adam_betas", 0.0, 1.0)
        if beta == 1.0:
            raise ValueError(f"adam_betas must lie in [0, 1), got {cfg.adam_betas}")
    for name in ("grad_clip", "ema_halflife_kimg", "loss_scale_init", "loss_scale_floor"):
        check_number(getattr(cfg, name), name, 0.0)
    for name in ("warmup_steps", "fsdp_shard_size", "num_workers", "seed", "sample_every", "eval_every", "eval_batches"):
        if getattr(cfg, name, 0) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("loss_scale_window", "sample_steps", "sample_count"):
        if getattr(cfg, name, 1) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 < cfg.loss_scale_floor <= cfg.loss_scale_init:
        raise ValueError(f"need 0 < loss_scale_floor ({cfg.loss_scale_floor}) <= loss_scale_init ({cfg.loss_scale_init})")
    if cfg.max_nonfinite_steps < 1:
        raise ValueError("max_nonfinite_steps must be at least 1")
    if require_data and not cfg.data:
        raise ValueError("no training data: pass --data DIR (a folder of shards from `adm prepare-imagenet`)")
    if cfg.deepspeed_config and cfg.strategy != "deepspeed":
        raise ValueError("deepspeed_config is only used with strategy=deepspeed; drop it or set strategy=deepspeed")


def ema_rates_of(cfg: TrainConfig) -> tuple[float, ...]:
    """All EMA rates of a run: `ema_rates` plus the per-step rate of `ema_halflife_kimg` (EDM)."""
    rates = list(cfg.ema_rates)
    if cfg.ema_halflife_kimg > 0:
        rates.append(0.5 ** (cfg.batch_size / (cfg.ema_halflife_kimg * 1000.0)))
    return tuple(rates)


def resolved_dict(cfg: TrainConfig, preset) -> dict:
    """What RUN/config.json holds: {"kind", "train": {...}, "preset": Preset.to_dict()}."""
    return {"kind": cfg.kind, "train": cfg.to_dict(), "preset": preset.to_dict()}


def diff_configs(saved: dict, current: dict, allowed: frozenset = RESUMABLE_FIELDS) -> list[str]:
    """Human-readable differences between two resolved dicts, ignoring fields a resume may change."""
    out = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}.{key}" if path else key)
            return
        if a != b:
            top = path.split(".")
            if top[0] == "train" and len(top) > 1 and top[1] in allowed:
                return
            out.append(f"{path}: {a!r} (saved) != {b!r} (now)")

    walk(saved, current, "")
    return out
