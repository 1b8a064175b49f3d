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
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launch.sample import files as sf
from launch.sample.guided import GuidedSampler, load_network, weights_sha256
from launch.sample.options import (NOISE_STREAM, RUN_FILE, UPSAMPLE_NOISE_STREAM, Labels, SampleOptions, canonical_scale,
                                   check_options, sample_seed)
from runtime import distributed
from runtime.files import atomic_write_json, file_sha256
from runtime.npz import NpzArray, read_array

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
        model, mp = load_network(o.model, o.preset, "model")
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
            clf, cp = load_network(o.classifier, o.classifier_preset, "classifier")
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
            self.low_res = NpzArray(o.upsample_from, "arr_0")
            self.low_res.verify()  # rows are read in shard order, not as one run: check the CRC up front
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
            base_labels = read_array(o.upsample_from, "arr_1")
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
                                     network_batch=self.network_batch, skip_type=o.skip_type,
                                     thresholding=o.thresholding, solver_start=o.solver_start)
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
            "classifier_scale": None if o.classifier is None else canonical_scale(
                1.0 if o.classifier_scale is None else o.classifier_scale),
            "cfg_scale": None if o.cfg_scale is None else canonical_scale(o.cfg_scale), "labels": self.labels.identity(), "seed": o.seed,
            "num_samples": o.num_samples, "precision": o.precision, "rounding": o.rounding,
            "clip_denoised": o.clip_denoised,
            "upsample": o.upsample_from is not None,
            # Only for DPM-Solver++, so that the hashes of DDPM / DDIM runs (and their resumes) stay as they were.
            **({"dpm_solver": {"order": self.sampler.plan.order, "evaluations": self.sampler.plan.steps,
                               "skip_type": self.sampler.plan.skip_type,
                               "thresholding": self.sampler.plan.thresholding,
                               "start_timestep": self.sampler.plan.start_timestep}}
               if self.sampler.plan is not None else {}),
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
        for candidate in (out / sf.SHARD_DIR / RUN_FILE, out / "options.json"):
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
        atomic_write_json(out / sf.SHARD_DIR / RUN_FILE, {"options_hash": self.hash, "content": self.content})
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
        stream = UPSAMPLE_NOISE_STREAM if o.upsample_from else NOISE_STREAM
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
            with NpzArray(self.npz_path, "arr_0") as arr:
                sf.write_grid(out / "grid.png", arr.read(0, min(o.grid_size, o.num_samples)))
        options = dataclasses.asdict(o)
        options.update({
            "options_hash": self.hash, "samples_file": self.npz_path.name, "image_size": self.image_shape[0],
            "num_classes": self.num_classes, "sampler": self.sampler.kind, "num_steps": self.sampler.num_steps,
            "network_evaluations": self.sampler.num_steps,
            "skip_type": self.sampler.plan.skip_type if self.sampler.plan is not None else None,
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
    check_options(options)
    created = not (dist.is_available() and dist.is_initialized())
    info = distributed.setup(timeout_minutes=180.0)
    try:
        job = _Job(options, info)
        job.prepare()
        pending = job.plan()
        if pending is None:
            _log(info, f"{job.npz_path} is already complete")
            if created:
                distributed.finish()
            return job.npz_path
        _log(info, f"{options.num_samples} samples in {job.num_shards} shards of {options.shard_size}; "
                   f"{len(pending)} to compute on {info.world_size} process(es), batch {options.batch_size} "
                   f"(network batch {job.network_batch}), "
                   f"{job.sampler.kind} {job.sampler.num_steps} "
                   f"{'evaluations' if job.sampler.plan is not None else 'steps'}, {options.precision} on {job.device}")
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
        if created:
            distributed.finish()  # every rank ends in step: no teardown under a peer's last collective
        return job.npz_path
    finally:
        if created:
            distributed.cleanup()
