"""Options of a sampling run, checked once, and what each sample index owns: its seeds and its label.

Sample index i owns its randomness: a generator seeded from (seed, i) gives its x_T and, in order,
the noise of every stochastic step; its label is drawn from another stream of (seed, i) (or taken
from a balanced shuffled list or a file). Nothing depends on which rank computes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.npz import npz_keys, read_array, read_npy
from launch.choices import COMPILE_MODES, PRECISIONS, SAMPLERS, SKIP_TYPES, default_sampler, dpm_solver_steps

NOISE_STREAM, LABEL_STREAM, UPSAMPLE_NOISE_STREAM, BALANCED_STREAM = 0, 1, 2, 3
RUN_FILE = "run.json"  # in OUT/shards: the options hash the shards were made with


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SampleOptions:
    """Every option of a sampling run (the CLI flags of `adm sample`, same names with `_`).

    `model` / `classifier`: our model file, `openai:FILE` (a released checkpoint; `preset` names its
    configuration when the file name does not) or a training run directory.
    `steps`: the timestep respacing ("250", "ddim25", "10,10,10"; "" = all training steps), or
    "dpm++2m-N" / "dpm++1-N": DPM-Solver++ of order 2 / 1 in N network evaluations.
    `sampler`: "ddpm" (ancestral), "ddim" or "dpm++"; None: the one `steps` implies
    (launch.choices.default_sampler). `skip_type` (DPM-Solver++ time grid: time_uniform (None),
    logSNR, time_quadratic), `thresholding` (dynamic thresholding of x0) and `solver_start` (the
    original timestep of the first evaluation; None: lambda = -5.1 or N-1) apply to DPM-Solver++ only.
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
    skip_type: str | None = None
    thresholding: bool = False
    solver_start: float | None = None
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


def check_options(o: SampleOptions) -> None:
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
    _check_sampler(o)
    if not (isinstance(o.eta, (int, float)) and 0 <= o.eta <= 1):  # also refuses NaN
        raise ValueError(f"eta must lie in [0, 1] (0: DDIM, 1: DDPM-like noise), got {o.eta}")
    if int(o.seed) < 0:
        raise ValueError(f"seed must be >= 0, got {o.seed}")
    for name in ("classifier_scale", "cfg_scale"):
        if getattr(o, name) is not None:
            check_scale(getattr(o, name), name)
    if o.eta != 0 and sampler_kind(o) != "ddim":
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


MAX_GUIDANCE_SCALE = 1000.0  # the paper's scales are 0.5..10; far beyond, float32 guidance overflows


def check_scale(value, name: str) -> None:
    """A guidance scale or schedule whose every number is finite and within +-MAX_GUIDANCE_SCALE."""
    from diffusion_core.guidance import GuidanceInterval, GuidanceSchedule, parse_guidance_scale

    try:
        todo, numbers = [parse_guidance_scale(value)], []
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    while todo:
        item = todo.pop()
        if isinstance(item, (int, float)):
            numbers.append(float(item))
        elif isinstance(item, GuidanceSchedule):
            numbers += [float(item.start)] + ([float(item.end)] if item.end is not None else [])
        elif isinstance(item, GuidanceInterval):
            todo.append(item.scale)
            if item.outside is not None:
                numbers.append(float(item.outside))
    for number in numbers:
        if abs(number) > MAX_GUIDANCE_SCALE:
            raise ValueError(f"{name}={value!r}: scales must lie within +-{MAX_GUIDANCE_SCALE:g}, got {number:g}")


def _check_sampler(o: SampleOptions) -> None:
    kind = sampler_kind(o)
    if kind == "dpm++":
        dpm_solver_steps(o.steps)
    elif default_sampler(o.steps) == "dpm++":
        raise ValueError(f"steps {o.steps!r} are DPM-Solver++ steps but the sampler is {kind!r}: drop --sampler")
    if kind != "dpm++" and (o.skip_type is not None or o.thresholding or o.solver_start is not None):
        raise ValueError("--skip-type, --thresholding and --solver-start apply to DPM-Solver++ only (--steps dpm++2m-N)")
    if o.skip_type is not None and o.skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {o.skip_type!r}")


def sampler_kind(o: SampleOptions) -> str:
    """The sampler a run uses: --sampler, else the one its --steps implies."""
    return o.sampler or default_sampler(o.steps)


def canonical_scale(scale):
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
def sample_seed(seed: int, index: int, stream: int = NOISE_STREAM) -> int:
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
            rng = np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(BALANCED_STREAM,)))
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
                entropy=int(self.seed), spawn_key=(LABEL_STREAM, int(i)))).integers(self.num_classes)
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
    # runtime.npz checks declared sizes (a forged header cannot allocate terabytes) and the zip CRC.
    if path.suffix == ".npy":
        arr = read_npy(path)
    elif path.suffix == ".npz":
        keys = npz_keys(path)
        if not keys:
            raise ValueError(f"labels file {path} holds no arrays")
        arr = read_array(path, "arr_1" if "arr_1" in keys else keys[0])
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


