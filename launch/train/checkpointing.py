"""Training checkpoints: atomic step folders, keep-last-K, resume from the latest complete one,
and `load_model_from_run` for the sampler.

    RUN/checkpoints/step_000012000/
        meta.json        written last: step, world size, strategy, EMA names, the resolved config
        trainer.pt       rank 0: step, images seen, loss scaler, timestep sampler, resolved config
        rank_00000.pt    per rank: RNG states (python, numpy, torch, cuda, the trainer's generator)
                         and the data loader's position
        state/           torch.distributed.checkpoint: model, optimizer, EMA (sharded runs write
                         shards; any world size reads them back)
        deepspeed/       strategy=deepspeed only: DeepSpeed's own checkpoint (model, ZeRO partitions)

Every rank writes into `.tmp-step_...`; after a barrier rank 0 writes meta.json and renames the
folder, so a folder named `step_*` is complete by construction and a crash (kill -9, node loss)
leaves at most a `.tmp-*` folder that the next run deletes.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.files import atomic_torch_save, atomic_write_json, fsync_dir
from runtime.distributed import barrier
from runtime.safe_load import RefusedFile, dcp_load, forced_weights_only, load_torch_file

FORMAT = "adm-train-checkpoint/1"
PREFIX = "step_"


def checkpoint_at(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """The complete checkpoint folder of `step` (default: the latest); FileNotFoundError naming what exists."""
    run_dir = Path(run_dir)
    if step is None:
        folder = latest_checkpoint(run_dir)
        if folder is None:
            raise FileNotFoundError(f"run {run_dir} has no complete checkpoint yet under {run_dir / 'checkpoints'}")
        return folder
    folder = step_dir(run_dir, step)
    if not (folder / "meta.json").is_file():
        steps = [s for s, _ in list_checkpoints(run_dir)]
        raise FileNotFoundError(f"run {run_dir} has no checkpoint at step {step}; it has {steps}")
    return folder


def step_dir(run_dir: Path, step: int) -> Path:
    """RUN/checkpoints/step_XXXXXXXXX."""
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:09d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    out = []
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name.startswith(PREFIX) and (child / "meta.json").is_file():
                try:
                    out.append((int(child.name[len(PREFIX):]), child))
                except ValueError:
                    continue
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_meta(folder: Path) -> dict:
    """meta.json of a checkpoint folder (ValueError naming it when it is not a JSON mapping)."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): a damaged checkpoint") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a checkpoint's meta.json (holds {type(meta).__name__})")
    return meta


# ----------------------------------------------------------------------------------------------
# RNG state (every rank's), as tensors and plain numbers so weights_only loading accepts it

def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU, CUDA, and `generator`'s."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore `rng_state()`'s values."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------
# Saving and resuming

class CheckpointManager:
    """Writes and finds the checkpoints of one run (every rank constructs one)."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int, keep_last: int):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    def clean_partial(self) -> None:
        """Delete `.tmp-*` folders left by a run that died while saving (rank 0; call before training)."""
        if self.rank == 0 and self.folder.is_dir():
            for child in self.folder.iterdir():
                if child.name.startswith(".tmp-"):
                    shutil.rmtree(child, ignore_errors=True)
        barrier()

    def save(self, step: int, strategy, ema, trainer_state: dict, rank_state: dict, meta: dict) -> Path:
        """Write checkpoint `step` (a collective: every rank calls it with its own `rank_state`)."""
        final = step_dir(self.run_dir, step)
        if final.is_dir():  # e.g. a preemption right after resuming from this very step
            return final
        tmp = self.folder / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        strategy.save(tmp, ema)
        atomic_torch_save(tmp / f"rank_{self.rank:05d}.pt", rank_state)
        if self.rank == 0:
            atomic_torch_save(tmp / "trainer.pt", trainer_state)
        barrier()
        if self.rank == 0:
            atomic_write_json(tmp / "meta.json", {"format": FORMAT, "step": step, "world_size": self.world_size, **meta})
            os.replace(tmp, final)
            fsync_dir(self.folder)  # the rename itself must survive a crash
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        found = list_checkpoints(self.run_dir)
        for _, folder in found[: max(0, len(found) - self.keep_last)]:
            # Rename first so a crash mid-delete never leaves a partial `step_*` that looks complete.
            doomed = folder.with_name(f".tmp-deleting-{folder.name}")
            os.replace(folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def load(self, folder: Path, strategy, ema) -> tuple[dict, dict | None, dict]:
        """Restore model/optimizer/EMA into `strategy`/`ema`; return (trainer state, this rank's state, meta).

        This rank's state is None when the checkpoint was written at another world size (its RNG
        and data positions cannot be mapped onto a different set of ranks).
        """
        meta = read_meta(folder)
        if meta.get("format") != FORMAT or not isinstance(meta.get("world_size"), int):
            raise ValueError(f"{folder} is not a training checkpoint of this code (format {meta.get('format')!r})")
        strategy.load(folder, ema, meta)
        trainer_state = load_torch_file(folder / "trainer.pt", "training checkpoint")
        rank_state = None
        if meta["world_size"] == self.world_size:
            rank_state = load_torch_file(folder / f"rank_{self.rank:05d}.pt", "training checkpoint")
        return trainer_state, rank_state, meta


# ----------------------------------------------------------------------------------------------
# Reading weights back without a process group (sampling, export)

def read_run_config(run_dir: Path) -> dict:
    """RUN/config.json (the resolved training config and preset)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no config.json); "
                                "pass the --run-dir of `adm train` / `adm train-classifier`")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("preset"), dict):
        raise ValueError(f"{path} is not a training run's config (no 'preset' mapping)")
    return config


def read_run_preset(run_dir: Path):
    """The Preset a run trains (from RUN/config.json); ValueError naming the file when it is damaged."""
    from diffusion_core.presets import Preset

    try:
        return Preset.from_dict(read_run_config(Path(run_dir))["preset"])
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{Path(run_dir) / 'config.json'} does not describe a model "
                         f"({type(err).__name__}: {err})") from None


def _empty_like_module(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=torch.float32) for k, v in module.state_dict().items()}


def _load_dcp(folder: Path, key: str, target: dict) -> dict:
    wrapped = {key: target}
    with warnings.catch_warnings():  # reading in one process is the point here
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp_load(wrapped, folder / "state", no_dist=True)
    return wrapped[key]


def checkpoint_weights(folder: Path, module: torch.nn.Module, ema_rate: float | None = None,
                       use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Full float32 weights from a checkpoint folder, in one process: (state dict, what they are).

    EMA weights (rate `ema_rate`, default: the run's first rate) when the run keeps an EMA and
    `use_ema`; the trained weights otherwise. `module` (meta device is fine) gives names and shapes.
    """
    from launch.train.ema import ema_name

    meta = read_meta(folder)
    names = list(meta.get("ema_names", []))
    template = _empty_like_module(module)
    if use_ema and names:
        name = names[0] if ema_rate is None else ema_name(ema_rate)
        if name not in names:
            raise ValueError(f"{folder} has no EMA at rate {ema_rate}; it keeps {', '.join(names)}")
        params = {k: v for k, v in template.items() if k in dict(module.named_parameters())}
        weights = _load_dcp(folder, "ema", {name: params})[name]
        rest = {k: v for k, v in template.items() if k not in weights}
        if rest:  # buffers are not averaged: take the trained ones
            weights.update(_model_weights(folder, meta, module, rest))
        return weights, f"EMA {name}"
    return _model_weights(folder, meta, module, template), "model (no EMA)"


def _model_weights(folder: Path, meta: dict, module, template: dict) -> dict[str, torch.Tensor]:
    if meta.get("strategy") == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with deepspeed_safe_loading(folder / "deepspeed"):
            full = get_fp32_state_dict_from_zero_checkpoint(str(folder / "deepspeed"), tag="ds")
        missing = sorted(set(template) - set(full))
        if missing:
            raise ValueError(f"{folder / 'deepspeed'} lacks weights of this model: {', '.join(missing[:5])}")
        return {k: full[k].float() for k in template}
    return _load_dcp(folder, "model", template)


# ----------------------------------------------------------------------------------------------
# DeepSpeed's own checkpoint files, weights-only

def deepspeed_safe_globals() -> list:
    """The DeepSpeed records its checkpoints pickle besides tensors and plain data (all inert
    dataclass-like values: loss-scaler settings, the ZeRO stage, fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def deepspeed_safe_loading(folder: Path):
    """Every torch.load DeepSpeed makes in this block is weights-only; a refusal names the file."""
    allowed = deepspeed_safe_globals()
    try:
        with forced_weights_only(allowed):
            yield
    except pickle.UnpicklingError:
        # DeepSpeed's error does not say which file: find it (only on this failure path).
        for path in sorted(Path(folder).rglob("*.pt")):
            load_torch_file(path, "DeepSpeed checkpoint file", allowed)
        raise RefusedFile(f"{folder}: refused to load a DeepSpeed checkpoint file (it asks for objects "
                          "that are not plain data; see docs/security.md)") from None


def load_deepspeed_checkpoint(engine, folder: Path, tag: str) -> None:
    """`engine.load_checkpoint(folder, tag)` with DeepSpeed's files read weights-only."""
    with deepspeed_safe_loading(folder):
        engine.load_checkpoint(str(folder), tag=tag, load_lr_scheduler_states=False)


def load_model_from_run(run_dir: str | os.PathLike, ema_rate: float | None = None, step: int | None = None):
    """The network of a training run with its latest (or `step`'s) weights -> (module, Preset).

    EMA weights are preferred (rate `ema_rate`, default the run's first); a run without EMA (the
    classifier by default) gives its trained weights. Reads sharded checkpoints in one process.
    """
    from diffusion_core.openai_compat import load_openai_state_dict

    run_dir = Path(run_dir)
    preset = read_run_preset(run_dir)
    folder = checkpoint_at(run_dir, step)
    with torch.device("meta"):
        module = preset.build()
    weights, _ = checkpoint_weights(folder, module, ema_rate)
    load_openai_state_dict(module, weights)
    return module.eval(), preset
