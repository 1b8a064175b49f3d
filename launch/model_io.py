"""Our model file (weights + the resolved preset in one file) and `load_model` for every kind of source.

A model file is either `.pt` (torch.save of {"format", "config", "state_dict", "extra"}, read back with
weights_only=True) or `.safetensors` (the config and extra as JSON in the metadata). Because the
config travels with the weights, loading never guesses flags: a file refuses to load against a
different expected config and lists the fields that differ.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from runtime.files import atomic_torch_save, atomic_write_bytes
from runtime.safe_load import load_torch_file
from diffusion_core import presets
from diffusion_core.openai_compat import load_openai_state_dict, preset_for_openai_file
from diffusion_core.presets import OPENAI_URL, Preset

FORMAT = "adm-guided/1"
CHECKPOINT_DIR_ENV = "ADM_CHECKPOINT_DIR"
_SUFFIXES = (".pt", ".safetensors")
# Fields that may differ between a file and the expected config: the respacing is a sampling choice.
_IGNORED_FIELDS = {"diffusion.timestep_respacing"}


def _as_preset_dict(preset: Preset | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(preset, Preset):
        return preset.to_dict()
    if isinstance(preset, Mapping):
        try:
            return Preset.from_dict(dict(preset)).to_dict()  # canonical form: lists, all fields
        except (KeyError, TypeError):
            return json.loads(json.dumps(dict(preset)))
    raise ValueError(f"expected a Preset or a preset dict, got {type(preset).__name__}")


def _suffix(path: Path) -> str:
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"model file {path} must end in .pt or .safetensors")
    return path.suffix


def save_model_file(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    preset_dict: Preset | Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights and their resolved preset (`Preset` or `Preset.to_dict()`) to `path`, atomically.

    `extra` (JSON-like: numbers, strings, lists, dicts) is stored alongside, e.g. the training step.
    Returns the path written.
    """
    path = Path(path)
    suffix = _suffix(path)
    config = _as_preset_dict(preset_dict)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    extra = dict(extra or {})
    if suffix == ".pt":
        atomic_torch_save(path, {"format": FORMAT, "config": config, "state_dict": tensors, "extra": extra})
    else:
        from safetensors.torch import save

        # safetensors sorts tensors by name; keep the state-dict order (OpenAI's files have it) in the metadata.
        metadata = {"format": FORMAT, "config": json.dumps(config), "extra": json.dumps(extra),
                    "order": json.dumps(list(tensors))}
        # safetensors refuses tensors sharing memory; our modules have none, but clone defensively.
        atomic_write_bytes(path, save({k: v.clone() for k, v in tensors.items()}, metadata=metadata))
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    if _suffix(path) == ".pt":
        obj = load_torch_file(path, "model file")
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not an {FORMAT} model file (a released OpenAI file? load it as 'openai:{path}')"
            )
        if not isinstance(obj.get("state_dict"), dict) or not isinstance(obj.get("config"), dict):
            raise ValueError(f"{path} is a damaged {FORMAT} model file (no state_dict or config)")
        return dict(obj["state_dict"]), obj["config"], dict(obj.get("extra") or {})
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an {FORMAT} model file (its metadata has no format {FORMAT!r})")
        tensors = load_file(str(path))
    except (OSError, ValueError):
        raise
    except Exception as err:  # safetensors' own error type for a malformed file
        raise ValueError(f"{path} is not a readable .safetensors file: {err}") from None
    order = [k for k in json.loads(metadata.get("order") or "[]") if k in tensors]
    state_dict = {k: tensors[k] for k in order + sorted(set(tensors) - set(order))}
    return state_dict, json.loads(metadata["config"]), json.loads(metadata.get("extra") or "{}")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(found: Mapping[str, Any], expected: Preset | Mapping[str, Any]) -> list[str]:
    """Fields of the model and diffusion configs that differ, as "field: file X, expected Y" lines."""
    exp = _as_preset_dict(expected)
    a = _flatten({k: found.get(k) for k in ("model", "diffusion")})
    b = _flatten({k: exp.get(k) for k in ("model", "diffusion")})
    return [
        f"{k}: file {a.get(k, '<absent>')!r}, expected {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if k not in _IGNORED_FIELDS and a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def load_model_file(
    path: str | os.PathLike, expected: Preset | Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a model file -> (state_dict, preset_dict, extra), with weights_only loading.

    With `expected` (a Preset or preset dict), a file whose model or diffusion config differs raises
    ValueError listing every differing field (the timestep respacing may differ).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    state_dict, config, extra = _read(path)
    if expected is not None:
        diffs = config_differences(config, expected)
        if diffs:
            raise ValueError(
                f"{path} holds a different model than expected ({len(diffs)} field(s) differ): " + "; ".join(diffs)
            )
    return state_dict, config, extra


def resolve_openai_file(name: str) -> Path:
    """Find a released file: the path as given, then $ADM_CHECKPOINT_DIR, then the torch hub cache.

    Never downloads; a missing file raises FileNotFoundError with the download command.
    """
    path = Path(name).expanduser()
    candidates = [path]
    if os.environ.get(CHECKPOINT_DIR_ENV):
        candidates.append(Path(os.environ[CHECKPOINT_DIR_ENV]) / path.name)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / path.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    target = os.environ.get(CHECKPOINT_DIR_ENV) or str(Path(torch.hub.get_dir()) / "checkpoints")
    raise FileNotFoundError(
        f"released checkpoint {path.name} not found (looked in: {', '.join(str(c) for c in candidates)}). "
        f"Download it with: mkdir -p {target} && wget -P {target} {OPENAI_URL}{path.name}"
    )


def _materialise(preset: Preset, state_dict: Mapping[str, torch.Tensor], device: str | torch.device) -> nn.Module:
    # Build without initialising (meta), then adopt the loaded tensors: fast even at 500M parameters.
    with torch.device("meta"):
        module = preset.build()
    load_openai_state_dict(module, state_dict)  # strict: lists missing/unexpected/mis-shaped keys
    return module.to(device).eval()


def _preset_of(preset: str | Preset | None) -> Preset | None:
    if preset is None or isinstance(preset, Preset):
        return preset
    return presets.get(preset)


def load_model(
    spec: str | os.PathLike, preset: str | Preset | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Preset]:
    """Load a network for sampling/evaluation -> (module in eval mode on `device`, its Preset).

    `spec` is one of:
      - a model file of ours (.pt / .safetensors); `preset`, if given, is the expected configuration
        and a differing file is refused with the differing fields listed;
      - "openai:FILE", a released guided-diffusion file; `preset` names its configuration, otherwise
        it is inferred from the file name (e.g. 256x256_classifier.pt -> adm256-classifier);
      - a training run directory (its EMA weights; see launch.train.checkpointing.load_model_from_run).
    """
    spec = str(spec)
    if spec.startswith("openai:"):
        path = resolve_openai_file(spec[len("openai:"):])
        chosen = _preset_of(preset) or presets.get(preset_for_openai_file(path.name))
        try:
            state_dict = load_torch_file(path, "released checkpoint", mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            state_dict = load_torch_file(path, "released checkpoint")
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} is not a released checkpoint (a state dict); it holds {type(state_dict).__name__}")
        return _materialise(chosen, state_dict, device), chosen
    path = Path(spec)
    if path.is_dir():
        from launch.train.checkpointing import load_model_from_run

        module, run_preset = load_model_from_run(path)
        expected = _preset_of(preset)
        if expected is not None:
            diffs = config_differences(run_preset.to_dict(), expected)
            if diffs:
                raise ValueError(f"run {path} holds a different model than expected: " + "; ".join(diffs))
        return module.to(device).eval(), run_preset
    if not path.exists():
        raise FileNotFoundError(
            f"{spec} is neither a model file, a run directory nor 'openai:FILE' (no such path)"
        )
    expected = _preset_of(preset)
    state_dict, config, _ = load_model_file(path, expected=expected)
    file_preset = Preset.from_dict(config)
    return _materialise(file_preset, state_dict, device), file_preset
