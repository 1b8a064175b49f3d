"""`adm export RUN`: a run's weights (EMA preferred) as our model file and as an OpenAI-format file.

    RUN/export/model.pt          our format (weights + resolved preset), see launch/model_io.py
    RUN/export/model_openai.pt   a plain state dict under guided-diffusion's key names, which the
                                 original code's strict `model.load_state_dict` accepts
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from runtime.files import atomic_torch_save
from diffusion_core.openai_compat import load_openai_state_dict, to_openai_state_dict
from launch.train.checkpointing import checkpoint_at, checkpoint_weights, read_meta, read_run_preset
from launch.model_io import save_model_file


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, ema_rate: float | None = None,
               step: int | None = None, use_ema: bool = True, safetensors: bool = False) -> dict[str, Path]:
    """Export a run's latest (or `step`'s) weights; returns {"model": path, "openai": path}.

    `ema_rate` picks one of the run's EMAs (default: its first); `use_ema=False` exports the trained
    weights. Works in one process for every strategy (DCP shards and DeepSpeed checkpoints).
    """
    run_dir = Path(run_dir)
    preset = read_run_preset(run_dir)
    folder = checkpoint_at(run_dir, step)
    meta = read_meta(folder)
    with torch.device("meta"):
        module = preset.build()
    weights, what = checkpoint_weights(folder, module, ema_rate, use_ema=use_ema)
    load_openai_state_dict(module, weights)  # strict: every name and shape of the architecture
    out_dir = Path(out_dir) if out_dir else run_dir / "export"
    model_path = out_dir / ("model.safetensors" if safetensors else "model.pt")
    extra = {"step": int(meta["step"]), "weights": what, "run_dir": str(run_dir.resolve()),
             "images_seen": int(meta.get("images_seen", 0))}
    save_model_file(model_path, module.state_dict(), preset, extra=extra)
    openai_path = out_dir / "model_openai.pt"
    atomic_torch_save(openai_path, to_openai_state_dict(module))
    return {"model": model_path, "openai": openai_path, "weights": what, "step": int(meta["step"])}
