"""The sampling job: draw (guided) samples into `samples_{N}x{H}x{W}x3.npz` on one process or many.

What makes the output reproducible and restartable:
- Sample index i owns its randomness: a generator seeded from (seed, i) gives its x_T and, in order,
  the noise of every stochastic step; its label is drawn from another stream of (seed, i) (or taken
  from a balanced shuffled list or a file). Nothing depends on which rank computes it.
- The indices are cut into shards of `shard_size`. A shard is computed in batches of exactly
  `batch_size` samples (its last batch is filled up with the following indices, computed and
  dropped), and every network call sees exactly `network_batch` rows (default: the batch size; a
  batch is cut into such chunks, the last one padded with copies of its last row). So every
  network call of index i has the same number of rows whatever the world size, the batch size, the
  shard's position or N. On this CPU conv and linear layers give different last bits for different
  numbers of rows (but not for different companion rows), so this is what makes the output bitwise
  independent of the world size and, for a fixed network batch, of the batch size; see
  docs/sampling.md for exactly what holds.
- Each finished shard is written atomically with a hash of every option that changes the pixels;
  a restarted job keeps the shards whose hash matches and computes the rest.
- Rank 0 streams the shards into the final `.npz` one at a time, then writes `grid.png` and
  `options.json`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data.fileio import atomic_write_json, file_sha256
from launch import distributed
from launch import sample_files as sf

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
SAMPLERS = ("ddpm", "ddim")
# Independent random streams of one (seed, index) pair.
_NOISE_STREAM, _LABEL_STREAM, _UPSAMPLE_NOISE_STREAM, _BALANCED_STREAM = 0, 1, 2, 3
_RUN_FILE = "run.json"  # in OUT/shards: the options hash the shards were made with


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SampleOptions:
    """Every option of a sampling run (the CLI flags of `adm sample`, same names with `_`).

    `model` / `classifier`: our model file, `openai:FILE` (a released checkpoint; `preset` names its
    configuration when the file name does not) or a training run directory.
    `steps`: the timestep respacing ("250", "ddim25", "10,10,10"; "" = all training steps).
    `sampler`: "ddpm" (ancestral) or "ddim"; None picks ddim when steps start with "ddim".
    `classifier_scale`: None = 1.0 with a classifier (guided-diffusion's default), else 0; a number
    or a schedule string ("linear:START:END", see diffusion_core.guidance).
    `cfg_scale`: classifier-free guidance weight w (eps_u + w (eps_c - eps_u)); None = off.
    `labels`: "uniform" (i.i.d. per index, as the original draws them), "balanced" (every class
    equally often, shuffled) or a file (.npy, .npz arr_1/first array, or text, one label a line).
    `num_samples` None: all rows of `upsample_from` (required otherwise).
    `network_batch`: rows per network call (None: `batch_size`). Fix it to get the same bits for
    any `batch_size` (a batch runs as ceil(batch_size / network_batch) calls per step).
    """

    model: str
    out: str
    num_samples: int | None = None
    batch_size: int = 16
    network_batch: int | None = None
    steps: str = "250"
    sampler: str | None = None
    eta: float = 0.0
    preset: str | None = None
    classifier: str | None = None
    classifier_preset: str | None = None
    classifier_scale: float | str | None = None
    cfg_scale: float | str | None = None
    labels: str | None = None
    seed: int = 0
    precision: str = "fp32"
    rounding: str = "truncate"
    clip_denoised: bool = True
    shard_size: int = 512
    upsample_from: str | None = None
    compile: str = "none"
    device: str | None = None
    overwrite: bool = False
    keep_shards: bool = False
    grid_size: int = 64
    progress: bool = True
    allow_slow_precision: bool = False


def _check_options(o: SampleOptions) -> None:
    """Cheap checks of user input, before any model is loaded."""
    if o.num_samples is None and o.upsample_from is None:
        raise ValueError("num_samples is required (e.g. --num-samples 50000)")
    if o.num_samples is not None and int(o.num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {o.num_samples}")
    if int(o.batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {o.batch_size}")
    if o.network_batch is not None and not 1 <= int(o.network_batch) <= int(o.batch_size):
        raise ValueError(f"network_batch must be between 1 and the batch size ({o.batch_size}), got "
                         f"{o.network_batch}: lower --network-batch or raise --batch-size")
    if int(o.shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1, got {o.shard_size}")
    if o.sampler is not None and o.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {o.sampler!r}")
    if o.eta < 0:
        raise ValueError(f"eta must be >= 0, got {o.eta}")
    if o.eta != 0 and _sampler_kind(o) != "ddim":
        raise ValueError(f"eta={o.eta} only applies to DDIM; use --sampler ddim (or steps 'ddimN')")
    if o.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {o.precision!r}")
    if o.rounding not in ("truncate", "round"):
        raise ValueError(f"rounding must be 'truncate' or 'round', got {o.rounding!r}")
    if o.compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {o.compile!r}")
    if o.grid_size < 0:
        raise ValueError(f"grid_size must be >= 0, got {o.grid_size}")
    if o.upsample_from is not None and o.labels is not None:
        raise ValueError("labels come from the base sample file when upsampling; drop --labels")
    if o.upsample_from is not None and not Path(o.upsample_from).is_file():
        raise FileNotFoundError(f"--upsample-from {o.upsample_from}: no such file; give the .npz of the base stage")
    if o.classifier_scale is not None and o.classifier is None and _nonzero_scale(o.classifier_scale):
        raise ValueError(f"classifier_scale={o.classifier_scale} needs a classifier: add --classifier")


def _sampler_kind(o: SampleOptions) -> str:
    if o.sampler is not None:
        return o.sampler
    return "ddim" if str(o.steps).startswith("ddim") else "ddpm"


def _canonical_scale(scale):
    """4, 4.0 and "4" are one scale (so they hash alike); schedule strings stay strings."""
    try:
        return float(scale)
    except (TypeError, ValueError):
        return str(scale).strip()


def _nonzero_scale(scale) -> bool:
    try:
        return float(scale) != 0.0
    except (TypeError, ValueError):
        return True  # a schedule string


# --------------------------------------------------------------------------------------------
# per-index randomness and labels
# --------------------------------------------------------------------------------------------
def sample_seed(seed: int, index: int, stream: int = _NOISE_STREAM) -> int:
    """The 63-bit generator seed of sample `index` in random stream `stream` of run seed `seed`.

    Derived with numpy's SeedSequence (a hash), so neighbouring indices and seeds give unrelated
    streams, and the value depends on nothing but (seed, stream, index).
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=(int(stream), int(index))).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


class Labels:
    """The class label of every sample index (and a hash of the choice, for the options hash).

    `kind` "none" (no class information anywhere: label -1), "uniform", "balanced" or "file".
    Indices past `num_samples` (the fill-up of a last batch) get a valid label too.
    """

    def __init__(self, kind: str, num_samples: int, num_classes: int | None, seed: int,
                 table: np.ndarray | None = None, source: str | None = None):
        self.kind, self.num_samples, self.num_classes, self.seed = kind, num_samples, num_classes, seed
        self.table, self.source = table, source

    @classmethod
    def build(cls, spec: str | None, num_samples: int, num_classes: int | None, seed: int,
              base_labels: np.ndarray | None = None) -> "Labels":
        """Resolve the `labels` option (or the base file's labels when upsampling)."""
        if base_labels is not None:
            table = np.asarray(base_labels[:num_samples], dtype=np.int64)
            if num_classes is None:
                return cls("file", num_samples, None, seed, table, "upsample_from")
            _check_label_range(table, num_classes, "the base sample file's arr_1")
            return cls("file", num_samples, num_classes, seed, table, "upsample_from")
        spec = spec or "uniform"
        if num_classes is None:
            if spec != "uniform":
                raise ValueError(f"labels={spec!r}, but neither the model nor a classifier is class-conditional; "
                                 "drop --labels or add a classifier")
            return cls("none", num_samples, None, seed)
        if spec == "uniform":
            return cls("uniform", num_samples, num_classes, seed)
        if spec == "balanced":
            rng = np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(_BALANCED_STREAM,)))
            table = rng.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
            return cls("balanced", num_samples, num_classes, seed, table)
        table = read_label_file(spec)
        if len(table) < num_samples:
            raise ValueError(f"labels file {spec} holds {len(table)} labels but num_samples is {num_samples}; "
                             "give at least one label per sample")
        table = table[:num_samples]
        _check_label_range(table, num_classes, f"labels file {spec}")
        return cls("file", num_samples, num_classes, seed, table, str(spec))

    def __call__(self, indices: Sequence[int]) -> np.ndarray:
        """Labels (int64) of the given indices."""
        if self.kind == "none":
            return np.full(len(indices), -1, dtype=np.int64)
        if self.kind == "uniform":
            return np.array([np.random.default_rng(np.random.SeedSequence(
                entropy=int(self.seed), spawn_key=(_LABEL_STREAM, int(i)))).integers(self.num_classes)
                for i in indices], dtype=np.int64)
        return self.table[np.asarray(indices, dtype=np.int64) % self.num_samples]

    def identity(self) -> dict:
        """What enters the options hash: the kind and, for a table, a hash of its contents."""
        out = {"kind": self.kind}
        if self.table is not None:
            out["sha256"] = hashlib.sha256(np.ascontiguousarray(self.table, dtype="<i8").tobytes()).hexdigest()
        return out


def read_label_file(path: str | os.PathLike) -> np.ndarray:
    """Read integer labels from .npy, .npz (`arr_1`, else its first array) or text (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found; --labels takes uniform, balanced or a file")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arr = z["arr_1"] if "arr_1" in z.files else z[z.files[0]]
    else:
        try:
            arr = np.loadtxt(path, dtype=np.int64, ndmin=1)
        except ValueError as err:
            raise ValueError(f"labels file {path}: cannot read integers, one per line ({err})") from None
    arr = np.asarray(arr)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"labels file {path}: expected a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
    return arr.astype(np.int64)


def _check_label_range(table: np.ndarray, num_classes: int, what: str) -> None:
    if len(table) and (table.min() < 0 or table.max() >= num_classes):
        bad = table[(table < 0) | (table >= num_classes)]
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}) for this model, found {bad[:5].tolist()}"
                         f"{' ...' if len(bad) > 5 else ''}; fix the labels or use a model with more classes")


class _NoiseStream:
    """The per-sample noise of one batch: x_T, then one draw per stochastic step, in order.

    Rows come from CPU generators (one per index), so the numbers are the same on every device.
    On a GPU the next draw is made on a helper thread while the current step runs, so drawing
    ~B*3*H*W normals per step on the CPU does not stall the accelerator.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device, prefetch: bool):
        from diffusion_core.diffusion import PerSampleNoise

        self._noise = PerSampleNoise(seeds)
        self._like = torch.empty((len(seeds), *shape))
        self._device = device
        self._pool = ThreadPoolExecutor(1) if prefetch else None
        self._next = self._pool.submit(self._draw) if self._pool else None

    def _draw(self) -> torch.Tensor:
        out = self._noise(self._like)
        return out.pin_memory() if self._device.type == "cuda" else out

    def next(self) -> torch.Tensor:
        """The next draw, on the sampling device."""
        if self._pool is None:
            out = self._draw()
        else:
            out = self._next.result()
            self._next = self._pool.submit(self._draw)
        return out.to(self._device, non_blocking=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------
def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's weights (names, dtypes, shapes, bytes): the same for every file format."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _Network(nn.Module):
    """A network under the run's precision, answering in float32 so that the diffusion and guidance
    arithmetic around it stays float32. Drops labels an unconditional model would refuse."""

    def __init__(self, net: nn.Module, precision: str, device: torch.device, takes_labels: bool):
        super().__init__()
        self.net, self.precision, self.device, self.takes_labels = net, precision, device, takes_labels

    def forward(self, x, t, y=None, **kwargs):
        from launch.precision import autocast

        if not self.takes_labels:
            y = None
        with autocast(self.precision, self.device):
            out = self.net(x, t, y=y, **kwargs) if y is not None else self.net(x, t, **kwargs)
        return out.float()


def _load(spec: str, preset: str | None, what: str):
    from launch.model_io import load_model

    if not spec.startswith("openai:") and not Path(spec).exists():
        raise FileNotFoundError(f"{what} {spec!r} not found: give our model file, openai:FILE or a run directory")
    module, resolved = load_model(spec, preset=preset, device="cpu")
    return module, resolved


# --------------------------------------------------------------------------------------------
# the sampler of one batch
# --------------------------------------------------------------------------------------------
class GuidedSampler:
    """Runs the reverse process for a batch, one `step` at a time, with per-sample noise.

    Built from loaded networks; holds the (respaced) diffusion, the guided model function and
    cond_fn. `step` is exactly `diffusion.p_sample` / `ddim_sample` with the guidance applied.
    """

    def __init__(self, model: nn.Module, model_preset, *, steps: str = "250", sampler: str | None = None,
                 eta: float = 0.0, classifier: nn.Module | None = None,
                 classifier_scale: float | str | None = None, cfg_scale: float | str | None = None,
                 precision: str = "fp32", clip_denoised: bool = True, device: torch.device | str = "cpu",
                 network_batch: int | None = None):
        from diffusion_core.guidance import guided_sampling, parse_guidance_scale

        self.device = torch.device(device)
        self.network_batch = None if network_batch is None else int(network_batch)
        self.preset = model_preset
        cfg = model_preset.model
        self.diffusion = dataclasses.replace(model_preset.diffusion, timestep_respacing=str(steps)).build()
        self.kind = sampler or ("ddim" if str(steps).startswith("ddim") else "ddpm")
        self.eta = float(eta)
        self.clip_denoised = clip_denoised
        self.image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.super_resolution = bool(getattr(cfg, "super_resolution", False))
        self.class_cond = cfg.num_classes is not None
        total = model_preset.diffusion.steps
        net = _Network(model, precision, self.device, self.class_cond)
        clf = _Network(classifier, precision, self.device, False) if classifier is not None else None
        null_label = None
        if cfg_scale is not None:
            if not (self.class_cond and getattr(cfg, "null_class", False)):
                raise ValueError("cfg_scale needs a model trained with a null class (classifier-free guidance); "
                                 "this model has none: drop --cfg-scale or use such a model")
            null_label = cfg.num_classes
            cfg_scale = parse_guidance_scale(cfg_scale, total)
        if classifier_scale is None:
            classifier_scale = 1.0 if classifier is not None else 0.0
        classifier_scale = parse_guidance_scale(classifier_scale, total)
        self.model_fn, self.cond_fn = guided_sampling(net, clf, classifier_scale, cfg_scale, null_label)
        self.stochastic = self.kind == "ddpm" or self.eta != 0

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_timesteps

    def model_kwargs(self, labels: torch.Tensor | None, low_res: torch.Tensor | None) -> dict:
        """The keyword arguments every model and cond_fn call receives."""
        kwargs = {}
        if labels is not None and (self.class_cond or self.cond_fn is not None):
            kwargs["y"] = labels
        if self.super_resolution:
            kwargs["low_res"] = low_res
        return kwargs

    def step(self, x: torch.Tensor, i: int, model_kwargs: dict, noise: torch.Tensor | None) -> dict:
        """One reverse step from respaced index i; returns the diffusion core's dict (`sample`, ...).

        With a `network_batch` other than the batch's size the step runs chunk by chunk, each chunk
        padded to exactly `network_batch` rows (copies of its last row, computed and dropped): the
        step of a row is independent of the other rows, and kernels then always see the same shape.
        """
        n, c = x.shape[0], self.network_batch
        if c is None or c == n:
            return self._step(x, i, model_kwargs, noise)
        parts = []
        for start in range(0, n, c):
            stop = min(start + c, n)

            def rows(v):
                return _padded_rows(v, start, stop, c) if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v

            out = self._step(rows(x), i, {k: rows(v) for k, v in model_kwargs.items()}, rows(noise))
            parts.append({k: v[: stop - start] for k, v in out.items() if torch.is_tensor(v) and v.ndim})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _step(self, x: torch.Tensor, i: int, model_kwargs: dict, noise: torch.Tensor | None) -> dict:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        with torch.no_grad():
            if self.kind == "ddim":
                return self.diffusion.ddim_sample(self.model_fn, x, t, self.clip_denoised, self.cond_fn,
                                                  model_kwargs, eta=self.eta, noise=noise)
            if noise is None:
                noise = torch.zeros_like(x)  # t == 0 adds no noise; never fall back to the global RNG
            return self.diffusion.p_sample(self.model_fn, x, t, self.clip_denoised, self.cond_fn,
                                           model_kwargs, noise=noise)

    def sample(self, seeds: Sequence[int], labels: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
               on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Samples in [-1, 1] (float32, NCHW) for one batch; row k uses generator `seeds[k]`.

        Draws x_T first, then the noise of every stochastic step that adds noise (none at the
        last step, none for DDIM with eta = 0): the same order as the core's loops with
        `PerSampleNoise`, so both give the same numbers.
        """
        kwargs = self.model_kwargs(labels, low_res)
        stream = _NoiseStream(seeds, self.image_shape, self.device, prefetch=self.device.type == "cuda")
        try:
            x = stream.next()
            for i in reversed(range(self.num_steps)):
                noise = stream.next() if (self.stochastic and i > 0) else None
                x = self.step(x, i, kwargs, noise)["sample"]
                if on_step is not None:
                    on_step()
        finally:
            stream.close()
        return x


def _padded_rows(v: torch.Tensor, start: int, stop: int, rows: int) -> torch.Tensor:
    """Rows start:stop of `v`, filled up to `rows` rows with copies of the last one."""
    part = v[start:stop]
    if part.shape[0] == rows:
        return part
    return torch.cat([part, part[-1:].expand(rows - part.shape[0], *part.shape[1:])])


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------
def _log(info, *parts) -> None:
    if info.is_main:
        print("adm sample:", *parts, flush=True)


def _broadcast(obj, info):
    """Rank 0's `obj` on every rank."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Job:
    def __init__(self, options: SampleOptions, info: distributed.DistInfo):
        self.o, self.info = options, info
        self.device = torch.device(options.device) if options.device else info.device
        self.out = Path(options.out)
        # The rows of every network call: what decides the last bits of the samples.
        self.network_batch = int(options.network_batch or options.batch_size)

    # ---- set-up: load, check, hash
    def prepare(self) -> None:
        o = self.o
        from launch.precision import check_supported

        check_supported(o.precision, self.device, allow_slow=o.allow_slow_precision)
        model, mp = _load(o.model, o.preset, "model")
        if o.upsample_from is None and getattr(mp.model, "super_resolution", False):
            raise ValueError(f"{o.model} is a super-resolution model: give the base samples with --upsample-from")
        if o.upsample_from is not None and not getattr(mp.model, "super_resolution", False):
            raise ValueError(f"--upsample-from needs a super-resolution model, but {o.model} ({mp.name}) is not one")
        if mp.kind == "classifier":
            raise ValueError(f"--model {o.model} is a classifier; give it as --classifier and a diffusion model as --model")
        self.model_preset = mp
        self.identity = {"model_sha256": weights_sha256(model)}
        clf, cp = None, None
        if o.classifier is not None:
            clf, cp = _load(o.classifier, o.classifier_preset, "classifier")
            if cp.kind != "classifier":
                raise ValueError(f"--classifier {o.classifier} is a {cp.kind} model, not a classifier")
            if cp.model.image_size != mp.model.image_size:
                raise ValueError(f"the classifier takes {cp.model.image_size}px images but the model makes "
                                 f"{mp.model.image_size}px ones; use the classifier trained at the model's size")
            if mp.model.num_classes is not None and cp.model.out_channels != mp.model.num_classes:
                raise ValueError(f"the classifier has {cp.model.out_channels} classes but the model has "
                                 f"{mp.model.num_classes}; they must be trained on the same classes")
            md, cd = mp.diffusion, cp.diffusion
            if (md.noise_schedule, md.steps) != (cd.noise_schedule, cd.steps):
                msg = (f"the classifier was trained on inputs noised with the {cd.noise_schedule} schedule "
                       f"({cd.steps} steps) but the model uses {md.noise_schedule} ({md.steps} steps): its "
                       "gradients are taken at noise levels it was not trained for")
                warnings.warn(msg, stacklevel=3)
                _log(self.info, "warning:", msg)
            self.identity["classifier_sha256"] = weights_sha256(clf)
        self.classifier_preset = cp
        self.num_classes = mp.model.num_classes if mp.model.num_classes is not None else (
            cp.model.out_channels if cp is not None else None)

        base_labels = None
        self.low_res = None
        if o.upsample_from is not None:
            self.low_res = sf.open_npz_array(o.upsample_from, "arr_0")
            if self.low_res.ndim != 4 or self.low_res.shape[-1] != 3 or self.low_res.dtype != np.uint8:
                raise ValueError(f"{o.upsample_from}: arr_0 must be uint8 [N, H, W, 3], got {self.low_res.dtype} "
                                 f"{self.low_res.shape}")
            want = getattr(mp.model, "low_res_size", None)
            if want is not None and self.low_res.shape[1:3] != (want, want):
                raise ValueError(f"{o.upsample_from} holds {self.low_res.shape[1]}x{self.low_res.shape[2]} images "
                                 f"but the upsampler takes {want}x{want}; sample the base stage at {want}px")
            base_n = self.low_res.shape[0]
            o.num_samples = base_n if o.num_samples is None else o.num_samples
            if o.num_samples > base_n:
                raise ValueError(f"num_samples={o.num_samples} but {o.upsample_from} has only {base_n} samples")
            base_labels = sf.open_npz_array(o.upsample_from, "arr_1")
            if mp.model.num_classes is not None and (len(base_labels) and base_labels[:o.num_samples].min() < 0):
                raise ValueError(f"{o.upsample_from} has no class labels (arr_1 is -1) but the upsampler is "
                                 "class-conditional")
            self.identity["upsample_from_sha256"] = file_sha256(o.upsample_from)
        self.labels = Labels.build(o.labels, o.num_samples, mp.model.num_classes if o.upsample_from else self.num_classes,
                                   o.seed, base_labels)

        for net in (model, clf):
            if net is not None:
                net.eval().requires_grad_(False).to(self.device)
        if o.compile != "none":
            mode = None if o.compile == "default" else o.compile
            model = torch.compile(model, mode=mode)
            clf = torch.compile(clf, mode=mode) if clf is not None else None
        self.sampler = GuidedSampler(model, mp, steps=o.steps, sampler=o.sampler, eta=o.eta, classifier=clf,
                                     classifier_scale=o.classifier_scale, cfg_scale=o.cfg_scale,
                                     precision=o.precision, clip_denoised=o.clip_denoised, device=self.device,
                                     network_batch=self.network_batch)
        h = mp.model.image_size
        self.image_shape = (h, h, 3)
        self.num_shards = math.ceil(o.num_samples / o.shard_size)
        self.content = self._content()
        self.hash = hashlib.sha256(json.dumps(self.content, sort_keys=True).encode()).hexdigest()
        self.npz_path = self.out / sf.samples_file_name(o.num_samples, self.image_shape)

    def _content(self) -> dict:
        """Everything that changes the pixels or their order; the options hash is its sha256.

        Not in it: the world size, the shard size and the batch size (they only decide who computes
        what, and when), and the network batch: it changes the last bits of conv/linear results
        (docs/sampling.md), so samples of two network batches agree only to about one uint8 level; a
        restart with another one is reported, not refused (a preempted job may have to continue on
        smaller GPUs).
        """
        o = self.o
        return {
            "format": "adm-sample/1",
            "model_preset": self.model_preset.to_dict(),
            "classifier_preset": None if self.classifier_preset is None else self.classifier_preset.to_dict(),
            **self.identity,
            "steps": str(o.steps), "sampler": self.sampler.kind, "eta": o.eta,
            "classifier_scale": None if o.classifier is None else _canonical_scale(
                1.0 if o.classifier_scale is None else o.classifier_scale),
            "cfg_scale": None if o.cfg_scale is None else _canonical_scale(o.cfg_scale), "labels": self.labels.identity(), "seed": o.seed,
            "num_samples": o.num_samples, "precision": o.precision, "rounding": o.rounding,
            "clip_denoised": o.clip_denoised,
            "upsample": o.upsample_from is not None,
        }

    # ---- the plan: which shards are missing (decided by rank 0)
    def plan(self) -> list[int]:
        info = self.info
        hashes = [self.hash] * info.world_size
        if info.world_size > 1:
            dist.all_gather_object(hashes, self.hash)
        if len(set(hashes)) != 1:
            raise ValueError("the ranks disagree on the options hash (different model files or options on different "
                             "nodes?): every rank must see the same files")
        decision = None
        if info.is_main:
            try:
                decision = {"pending": self._inspect_folder()}
            except (ValueError, FileNotFoundError) as err:
                decision = {"error": str(err)}
        decision = _broadcast(decision, info)
        if "error" in decision:
            raise ValueError(decision["error"])
        return decision["pending"]

    def _inspect_folder(self) -> list[int] | None:
        """Rank 0: refuse a folder made with other options, clean it, list shards still to compute.

        Returns None when the final file of these options is already there.
        """
        o, out = self.o, self.out
        found = None
        for candidate in (out / sf.SHARD_DIR / _RUN_FILE, out / "options.json"):
            if candidate.is_file():
                try:
                    found = json.loads(candidate.read_text()).get("options_hash")
                except (OSError, ValueError):
                    found = "unreadable"
                break
        stray = sf.list_shard_files(out)
        if found is None and stray:
            found = "unknown"
        if found is not None and found != self.hash:
            if not o.overwrite:
                raise ValueError(f"{out} holds samples made with other options (hash {str(found)[:12]}, this run "
                                 f"{self.hash[:12]}); use another --out, or --overwrite to delete them")
            self._clear()
        elif self.npz_path.is_file() and (out / "options.json").is_file():
            return None
        sf.remove_stale_temporaries(out)
        atomic_write_json(out / sf.SHARD_DIR / _RUN_FILE, {"options_hash": self.hash, "content": self.content})
        pending, network_batches = [], set()
        for k in range(self.num_shards):
            start, count = self._shard_range(k)
            path = sf.shard_path(out, k)
            if path.is_file() and sf.shard_is_valid(path, start, count, self.image_shape, self.hash):
                network_batches.add(sf.read_shard_meta(path)["network_batch"])
            else:
                pending.append(k)
        done = self.num_shards - len(pending)
        if done:
            _log(self.info, f"resuming in {out}: {done} of {self.num_shards} shards already done")
            other = sorted(network_batches - {self.network_batch})
            if other:
                _log(self.info, f"note: finished shards were made with network batch {other}, this run uses "
                     f"{self.network_batch}: those parts match a network-batch-{self.network_batch} run only to "
                     f"float rounding (pass --network-batch {other[0]} to continue bitwise; docs/sampling.md)")
        return pending

    def _clear(self) -> None:
        """Delete what an earlier run wrote here (only its own files: OUT may hold other things,
        e.g. the base samples of an upsampling run)."""
        old_file = None
        try:
            old_file = json.loads((self.out / "options.json").read_text()).get("samples_file")
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.out / sf.SHARD_DIR, ignore_errors=True)
        keep = Path(self.o.upsample_from).resolve() if self.o.upsample_from else None
        for p in {self.out / "options.json", self.out / "grid.png", self.npz_path,
                  *([self.out / Path(old_file).name] if old_file else [])}:
            if keep is None or p.resolve() != keep:
                p.unlink(missing_ok=True)

    def _shard_range(self, k: int) -> tuple[int, int]:
        start = k * self.o.shard_size
        return start, min(self.o.shard_size, self.o.num_samples - start)

    # ---- the work
    def _batch(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        o, s = self.o, self.sampler
        stream = _UPSAMPLE_NOISE_STREAM if o.upsample_from else _NOISE_STREAM
        seeds = [sample_seed(o.seed, i, stream) for i in indices]
        labels_np = self.labels(indices)
        labels = torch.from_numpy(labels_np).to(self.device) if self.labels.kind != "none" else None
        low_res = None
        if self.low_res is not None:
            rows = np.asarray(self.low_res[np.asarray(indices) % o.num_samples])
            low_res = torch.from_numpy(rows).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = s.sample(seeds, labels, low_res, on_step=self._tick)
        return sf.to_uint8(x, o.rounding).cpu().numpy(), labels_np

    def _tick(self) -> None:
        if self.bar is not None:
            self.bar.update(self._kept / self.sampler.num_steps)

    def compute(self, shards: list[int]) -> None:
        o = self.o
        mine = shards[self.info.rank::self.info.world_size]
        total = sum(self._shard_range(k)[1] for k in mine)
        self.bar = None
        if self.info.is_main and o.progress and total:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total, unit="sample", desc=f"rank 0 of {self.info.world_size}", dynamic_ncols=True,
                            mininterval=1.0 if tty else 60.0, bar_format=None if tty else
                            "{desc}: {n:.0f}/{total} samples [{elapsed}<{remaining}, {rate_fmt}]")
        try:
            for k in mine:
                start, count = self._shard_range(k)
                images, labels = [], []
                for b0 in range(start, start + count, o.batch_size):
                    # Fill the last batch with the next indices so every call has batch_size samples.
                    keep = min(o.batch_size, start + count - b0)
                    self._kept = keep  # the progress bar counts kept samples only
                    imgs, labs = self._batch(list(range(b0, b0 + o.batch_size)))
                    images.append(imgs[:keep])
                    labels.append(labs[:keep])
                sf.write_shard(sf.shard_path(self.out, k), np.concatenate(images), np.concatenate(labels),
                               start, self.hash, self.network_batch)
        finally:
            if self.bar is not None:
                self.bar.close()

    # ---- the end: merge, grid, options.json (rank 0)
    def finish(self, seconds: float) -> None:
        o, out = self.o, self.out
        files = []
        for k in range(self.num_shards):
            start, count = self._shard_range(k)
            path = sf.shard_path(out, k)
            if not sf.shard_is_valid(path, start, count, self.image_shape, self.hash):
                raise RuntimeError(f"shard {path} is missing or does not match after sampling; rerun to compute it")
            files.append(path)
        sf.merge_shards(files, self.npz_path, o.num_samples, self.image_shape)
        if o.grid_size:
            arr = sf.open_npz_array(self.npz_path, "arr_0")
            sf.write_grid(out / "grid.png", np.asarray(arr[:min(o.grid_size, o.num_samples)]))
        options = dataclasses.asdict(o)
        options.update({
            "options_hash": self.hash, "samples_file": self.npz_path.name, "image_size": self.image_shape[0],
            "num_classes": self.num_classes, "sampler": self.sampler.kind, "num_steps": self.sampler.num_steps,
            "classifier_scale": self.content["classifier_scale"], "labels": o.labels or self.labels.kind,
            "content": self.content, "world_size": self.info.world_size, "device": str(self.device),
            "network_batch": self.network_batch,
            "torch": torch.__version__, "seconds_last_run": round(seconds, 3),
        })
        atomic_write_json(out / "options.json", options)
        if not o.keep_shards:
            shutil.rmtree(out / sf.SHARD_DIR, ignore_errors=True)


def sample(options: SampleOptions) -> Path:
    """Draw the samples `options` describe; return the path of `samples_{N}x{H}x{W}x3.npz`.

    Works as a single process or under torchrun / srun (every rank calls it; each computes its
    share of the missing shards, rank 0 merges). Re-running with the same options resumes from the
    finished shards, or returns at once when the file is complete. Raises ValueError /
    FileNotFoundError for bad options, before any sampling starts.
    """
    options = dataclasses.replace(options)
    _check_options(options)
    created = not (dist.is_available() and dist.is_initialized())
    info = distributed.setup(timeout_minutes=180.0)
    try:
        job = _Job(options, info)
        job.prepare()
        pending = job.plan()
        if pending is None:
            _log(info, f"{job.npz_path} is already complete")
            return job.npz_path
        _log(info, f"{options.num_samples} samples in {job.num_shards} shards of {options.shard_size}; "
                   f"{len(pending)} to compute on {info.world_size} process(es), batch {options.batch_size} "
                   f"(network batch {job.network_batch}), "
                   f"{job.sampler.kind} {job.sampler.num_steps} steps, {options.precision} on {job.device}")
        t0 = time.perf_counter()
        job.compute(pending)
        seconds = time.perf_counter() - t0
        distributed.barrier()
        status = None
        if info.is_main:
            try:
                job.finish(seconds)
                status = "ok"
            except Exception as err:  # the other ranks must not wait forever for the merge
                status = f"merge failed: {err}"
                _broadcast(status, info)
                raise
        status = _broadcast(status, info)
        if status != "ok":
            raise RuntimeError(status)
        _log(info, f"wrote {job.npz_path} ({options.num_samples} samples)")
        return job.npz_path
    finally:
        if created:
            distributed.cleanup()
