"""The training loop shared by `adm train` (diffusion) and `adm train-classifier`.

An *objective* (launch/train/diffusion.py, launch/train/classifier.py) says what one micro-batch's loss is and
what is logged; this module does everything else: the run directory, seeds, the strategy, EMA,
precision, the data stream, checkpoints, preemption and logging. One optimizer step is:

    for each of grad_accum micro-batches:
        loss = objective.losses(model, images, labels)      # under autocast
        backward(loss * loss_scale / grad_accum)            # gradient sync on the last one only
    unscale, check finite on all ranks, clip, optimizer step (skipped if not finite)
    EMA update (only after an applied step)

Nothing in a steady-state step waits for the device: finiteness, clipping, the loss scale, the
skip decision and the EMA gate are device tensors, and the metrics, gradient norms and the
non-finite guard are read once per `log_every` steps (tests/launch/test_host_syncs.py counts this).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runtime import preemption
from runtime.files import atomic_write_json
from runtime.preemption import Preempted
from data.shards import ShardReadError
from launch.train import config as config_mod
from runtime import distributed
from launch.train.checkpointing import CheckpointManager, latest_checkpoint, rng_state, set_rng_state
from launch.train.ema import EMA
from launch.precision import DTYPES, LossScaler, autocast, check_supported
from launch.train.strategies import build_strategy
from launch.train.tb_logging import MetricWindow, RunLogger, format_metrics
from launch.train.perf import Throughput, flops_per_image, measured_matmul_peak, peak_flops, peak_memory_gb
from launch.train.stop_poll import StopPoll



def lr_at(cfg, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's seed: a function of the run seed and the rank only (not of the world size)."""
    return (seed * 1_000_003 + rank * 7_919 + 1) % (2 ** 63)


def check_run_dir(run_dir: Path, resolved: dict) -> bool:
    """Compare RUN/config.json with this run's config (read only); returns whether a run was there.

    Fields that a resume may change (config.RESUMABLE_FIELDS) may differ; any other difference is a
    ValueError naming them.
    """
    path = run_dir / "config.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    diffs = config_mod.diff_configs(saved, resolved)
    if diffs:
        raise ValueError(
            f"run directory {run_dir} holds a run with a different config ({len(diffs)} field(s)): "
            + "; ".join(diffs) + f". Use another --run-dir, or rerun with the saved config ({path})")
    return True


def write_run_config(run_dir: Path, resolved: dict, rank: int) -> None:
    """Rank 0 writes RUN/config.json (a collective: every rank calls it)."""
    distributed.barrier()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", resolved)
    distributed.barrier()


def prepare_run_dir(run_dir: Path, resolved: dict, rank: int) -> bool:
    """`check_run_dir`, then `write_run_config`; returns True when the directory already held a run."""
    existed = check_run_dir(run_dir, resolved)
    write_run_config(run_dir, resolved, rank)
    return existed


def check_data(shards) -> int:
    """Fail before building anything when the training shards are missing or empty; returns their class count."""
    from data.shards import resolve_shards

    found = resolve_shards(shards)  # FileNotFoundError / ValueError naming the problem
    if found.counts and sum(found.counts.values()) == 0:
        raise ValueError(f"training data {shards} holds no samples (its manifest counts 0 in every shard); "
                         "re-create the shards with `adm prepare-imagenet`")
    return len(found.classes)


class Trainer:
    """One training run (construct on every rank; `fit()` trains to `cfg.total_steps`)."""

    def __init__(self, cfg, preset, run_dir: str | os.PathLike, objective_cls, info: distributed.DistInfo):
        self.cfg, self.preset, self.info = cfg, preset, info
        self.run_dir = Path(run_dir)
        self.device = info.device
        self.resolved = config_mod.resolved_dict(cfg, preset)
        world = info.world_size
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by world_size x grad_accum = "
                             f"{world} x {cfg.grad_accum}; change batch_size or grad_accum")
        self.micro_batch = cfg.batch_size // (world * cfg.grad_accum)
        check_supported(cfg.precision, self.device, cfg.allow_slow_precision)
        self._check_labels(check_data(cfg.data))
        self._set_determinism()
        # Nothing is written into the run directory until everything below accepted this config:
        # a refused run must not leave a config.json that refuses the corrected command.
        check_run_dir(self.run_dir, self.resolved)
        self.ckpt = CheckpointManager(self.run_dir, info.rank, world, cfg.keep_last)
        resume_from = latest_checkpoint(self.run_dir)

        # Identical initial weights on every rank, then per-rank randomness.
        torch.manual_seed(cfg.seed)
        module = preset.build()
        if cfg.init_from and resume_from is None:
            self._init_from(module)
        seed = rank_seed(cfg.seed, info.rank)
        self._seed_everything(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed + 1)

        self.strategy = build_strategy(cfg, module, info, self.micro_batch)
        self.ema = EMA(self.strategy.ema_sources(), config_mod.ema_rates_of(cfg))
        self.scaler = LossScaler(dynamic=cfg.precision == "fp16" and cfg.strategy != "deepspeed",
                                 init_scale=cfg.loss_scale_init, floor=cfg.loss_scale_floor,
                                 growth_interval=cfg.loss_scale_window, max_nonfinite=cfg.max_nonfinite_steps,
                                 device=self.device)
        self.objective = objective_cls(self)
        self.step = 0
        self.images_seen = 0
        loader_state = None
        data_seed = cfg.seed
        self.logger_lines: list[str] = []
        if resume_from is not None:
            loader_state, data_seed = self._resume(resume_from)
        self.loader = self.objective.make_loader(cfg.data, self.micro_batch, data_seed, train=True)
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        self.batches = iter(self.loader)
        # The config is accepted: from here on the run directory is written.
        write_run_config(self.run_dir, self.resolved, info.rank)
        self.ckpt.clean_partial()
        self.logger = RunLogger(self.run_dir, info.rank, self.step, cfg.total_steps, cfg.progress)
        for line in self.logger_lines:
            self.logger.line(line)
        self.window = MetricWindow(self.objective.metric_names, self.objective.num_timesteps, self.device)
        self.signals = preemption.watch()
        # Sum and count of the applied steps' gradient norms since the last log (on the device).
        self._grad_norm_acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._throughput = None

    # -- set-up helpers -----------------------------------------------------------------------
    def _set_determinism(self) -> None:
        if self.cfg.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def _init_from(self, module: torch.nn.Module) -> None:
        """Start from released or exported weights (fine-tuning); refuses another model's weights."""
        from launch.model_io import config_differences, load_model

        spec = self.cfg.init_from
        if spec.startswith("openai:"):
            from diffusion_core import presets
            from diffusion_core.openai_compat import preset_for_openai_file

            try:
                released = presets.get(preset_for_openai_file(spec[len("openai:"):]))
            except ValueError:
                released = None  # a renamed file: the strict shape check below still applies
            if released is not None:
                diffs = [d for d in config_differences(released.to_dict(), self.preset)
                         if not d.startswith(("model.dropout", "model.use_checkpoint", "diffusion.timestep_respacing"))]
                if diffs:
                    raise ValueError(f"--init-from {spec} is the released {released.name} model, not preset "
                                     f"{self.preset.name}: " + "; ".join(diffs))
        loaded, _ = load_model(spec, preset=self.preset, device="cpu")
        try:
            module.load_state_dict(loaded.state_dict(), strict=True)
        except RuntimeError as err:
            raise ValueError(f"--init-from {spec} does not fit preset {self.preset.name}: {err}") from None

    def _resume(self, folder: Path):
        """Restore everything from a checkpoint folder; returns (loader state or None, data seed)."""
        trainer_state, rank_state, meta = self.ckpt.load(folder, self.strategy, self.ema)
        saved_cfg = trainer_state.get("config", {})
        diffs = config_mod.diff_configs(saved_cfg, self.resolved)
        if diffs:
            raise ValueError(f"checkpoint {folder} belongs to another model or config: " + "; ".join(diffs))
        self.step = int(trainer_state["step"])
        self.images_seen = int(trainer_state["images_seen"])
        self.scaler.load_state_dict(trainer_state["scaler"])
        self.objective.load_state_dict(trainer_state["objective"])
        self.logger_lines.append(f"resumed from {folder} (step {self.step})")
        if rank_state is not None:
            set_rng_state(rank_state["rng"], self.generator)
            return rank_state["loader"], self.cfg.seed
        # Another world size: the weights, optimizer and EMA were resharded by DCP; per-rank RNG
        # streams and data positions have no counterpart, so they restart from seeds tied to the step.
        seed = rank_seed(self.cfg.seed + self.step, self.info.rank)
        self._seed_everything(seed)
        self.generator.manual_seed(seed + 1)
        self.logger_lines.append(
            f"world size changed ({meta['world_size']} -> {self.info.world_size}): model, optimizer and EMA "
            "resharded; data order and noise restart from seeds derived from the step (not bit-identical)")
        return None, self.cfg.seed + self.step

    def _check_labels(self, data_classes: int) -> None:
        """The data's labels must fit the network (a 10-class preset cannot take ImageNet's 1000)."""
        model = self.preset.model
        fits = getattr(model, "num_classes", None) if self.cfg.kind == "diffusion" else model.out_channels
        if fits is not None and data_classes > fits:
            key = "model.num_classes" if self.cfg.kind == "diffusion" else "model.out_channels"
            raise ValueError(f"the shards in {self.cfg.data} have {data_classes} classes but preset {self.preset.name} "
                             f"has {fits}: use a preset for this data or --set {key}={data_classes}")

    # -- the step -----------------------------------------------------------------------------
    def model_fn(self, *args, **kwargs) -> torch.Tensor:
        """The network under the run's autocast; outputs float32 so the loss maths stay float32."""
        with autocast(self.cfg.precision, self.device):
            out = self.strategy.forward(*args, **kwargs)
        return out.float()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self.batches)
        except ShardReadError as err:
            raise ValueError(f"training data {self.cfg.data}: {err}") from None
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        return images, labels

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns whether it was applied (a 0-d
        device tensor, 1.0 or 0.0: reading it waits for the device)."""
        cfg = self.cfg
        for micro in range(cfg.grad_accum):
            images, labels = self.next_batch()
            last = micro == cfg.grad_accum - 1
            with self.strategy.micro_step(last):
                out = self.objective.losses(self.model_fn, images, labels)
                self.strategy.backward(out["loss"], self.scaler, cfg.grad_accum)
            self.window.add(out["t"], out["metrics"])
            self.objective.after_micro_step(out)
        found_inf, norm = self.strategy.step(lr_at(cfg, self.step), self.scaler, cfg.grad_clip)
        applied = 1.0 - found_inf
        self.ema.update(self.strategy.ema_sources(), applied)
        counted = applied.bool() & torch.isfinite(norm)
        pair = torch.stack([torch.where(counted, norm, 0.0), counted.to(norm.dtype)])
        self._grad_norm_acc += pair.to(self._grad_norm_acc)
        return applied

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> int:
        """Train from the current step to cfg.total_steps; returns the final step.

        Raises `Preempted` after writing a checkpoint when SIGTERM/SIGUSR1/SIGUSR2 arrived.
        """
        cfg, info = self.cfg, self.info
        self.stop_poll = StopPoll(cfg.preempt_check_every, self.device)
        self._saved_step, self._longest_save_s, self._training_on = self.step, 0.0, False
        self._start_throughput()
        self.logger.line(f"{cfg.kind} training: preset {self.preset.name}, {self._param_count():,} parameters, "
                         f"strategy {cfg.strategy}, precision {cfg.precision}, world size {info.world_size}, "
                         f"batch {cfg.batch_size} = {info.world_size} x {cfg.grad_accum} x {self.micro_batch}, "
                         f"steps {self.step} -> {cfg.total_steps}")
        for note in getattr(self.strategy, "notes", ()):
            self.logger.line(note)
        try:
            while self.step < cfg.total_steps:
                self.train_step()
                self.step += 1
                self.images_seen += cfg.batch_size
                self._throughput.add(cfg.batch_size)
                self.logger.advance(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                    self._log()
                final = self.step == cfg.total_steps
                self.objective.periodic(self.step, final=final)
                save_due = self.step % cfg.save_every == 0 or final
                # A host-side flag, agreed by the ranks only at check steps (launch/train/stop_poll.py).
                stop = self.stop_poll.agree(self.step) if self.stop_poll.due(self.step, save_due) else None
                stop = stop if not final else None  # a finished run just ends
                if stop == "requeue" and self._train_on_after_requeue_signal():
                    stop = None
                if (save_due or stop) and self._saved_step != self.step:
                    self.save()
                if stop:
                    sig = preemption.signal_name()
                    self.logger.line(f"stopping at step {self.step} after a stop signal"
                                     + (f" ({sig})" if sig else "") + "; checkpoint written")
                    raise Preempted(f"checkpoint of step {self.step} written to {self.run_dir}")
            return self.step
        finally:
            self.logger.flush()
            self.logger.close()
            self.signals.uninstall()

    def _train_on_after_requeue_signal(self) -> bool:
        """After an agreed requeue (time-limit) signal: checkpoint the progress at once, then keep
        training while every rank's Guard leaves time for another check interval and two checkpoint
        writes before it forces the requeue; returns whether to train on (agreed by all ranks).

        Without a Guard (torchrun, a plain process) there is no such time: the run stops here.
        """
        if not self._training_on and self._saved_step != self.step:
            self.save()
        reserve = 2.0 * self._longest_save_s + self.stop_poll.seconds_between_checks + 5.0
        spare = self.stop_poll.time_to_spare(reserve)
        if spare and not self._training_on:
            self.logger.line(f"requeue signal ({preemption.signal_name()}) at step {self.step}: checkpoint written; "
                             "training on while the time before the requeue allows")
        self._training_on = spare
        return spare

    def _param_count(self) -> int:
        # DTensor.numel() is the global size; ZeRO-3 keeps the full size in ds_numel.
        return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in self.strategy.params)

    def _start_throughput(self) -> None:
        flops, peak, measured, source = 0.0, 0.0, 0.0, ""
        if self.info.rank == 0:
            # Measuring draws random tensors: keep the training RNG where a resumed run expects it.
            devices = [self.device] if self.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices):
                    flops = float(flops_per_image(self.preset, self.device))
                    peak, source = peak_flops(self.device, self.cfg.precision)
                    measured = peak if source.startswith("measured") else measured_matmul_peak(
                        self.device, DTYPES[self.cfg.precision])
            except Exception as err:  # MFU is a diagnostic: never fail a run over it
                self.logger.line(f"MFU unavailable: {err}")
                flops = 0.0
            if flops:
                self.logger.line(f"{flops / 1e9:.3f} GFLOP per training image (forward + backward); "
                                 f"peak {peak / 1e12:.3f} TFLOP/s per device ({source}); measured matmul "
                                 f"{measured / 1e12:.3f} TFLOP/s ({measured / peak:.0%} of the peak)")
                self.logger.scalars(self.step, {"peak_tflops": peak / 1e12, "measured_matmul_tflops": measured / 1e12,
                                                "gflop_per_image": flops / 1e9}, prefix="perf")
        self._throughput = Throughput(flops, peak, self.info.world_size)

    def _log(self) -> None:
        # The one place a step's results are read back (besides checkpoints): every log_every steps.
        self.scaler.check()
        values = self.window.reduce(self.device)
        perf = self._throughput.read()
        norm_sum, norm_count = self._grad_norm_acc.tolist()
        self._grad_norm_acc.zero_()
        values.update(
            grad_norm=norm_sum / norm_count if norm_count else float("nan"),
            lr=lr_at(self.cfg, self.step - 1),
            loss_scale=self._loss_scale(),
            skipped_steps=float(self.scaler.skipped_total),
            images_per_s=perf["images_per_s"],
            mfu=perf["mfu"],
            peak_memory_gb=peak_memory_gb(self.device),
            images_seen=float(self.images_seen),
        )
        self.logger.scalars(self.step, values)
        self.logger.line(format_metrics(self.step, values, self.objective.log_keys + (
            "grad_norm", "lr", "loss_scale", "images_per_s", "mfu", "peak_memory_gb")))
        self.logger.advance(0, {k: f"{values[k]:.4g}" for k in self.objective.log_keys[:2] if k in values})
        self.logger.flush()

    def _loss_scale(self) -> float:
        if hasattr(self.strategy, "loss_scale"):
            return self.strategy.loss_scale
        return self.scaler.scale

    def save(self) -> Path:
        """Write a checkpoint of the current step (a collective)."""
        self.scaler.check()  # a diverged run stops before it writes a checkpoint
        trainer_state = {
            "step": self.step,
            "images_seen": self.images_seen,
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "config": self.resolved,
        }
        rank_state = {"rng": rng_state(self.generator), "loader": self.loader.state_dict()}
        meta = {"strategy": self.cfg.strategy, "zero_stage": self.cfg.zero_stage if self.cfg.strategy == "deepspeed" else None,
                "kind": self.cfg.kind, "preset": self.preset.name, "ema_names": list(self.ema.names),
                "images_seen": self.images_seen}
        started = time.monotonic()
        folder = self.ckpt.save(self.step, self.strategy, self.ema, trainer_state, rank_state, meta)
        self._saved_step = self.step
        self._longest_save_s = max(getattr(self, "_longest_save_s", 0.0), time.monotonic() - started)
        self.logger.line(f"checkpoint {folder}")
        return folder

    # -- helpers for objectives ---------------------------------------------------------------
    def full_weights_for_sampling(self) -> dict[str, torch.Tensor]:
        """Unsharded EMA (first rate) or model weights on every rank (a collective)."""
        if self.ema:
            return self.strategy.full_ema(self.ema, self.ema.names[0])
        return self.strategy.full_model_state()

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized tensors from every rank (a collective; identity on one process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)


def run(cfg, preset, run_dir: str | os.PathLike, objective_cls) -> int:
    """Set up torch.distributed (torchrun, srun or one process), train, tear down; returns the final step."""
    info = distributed.setup()
    try:
        trainer = Trainer(cfg, preset, run_dir, objective_cls, info)
        try:
            step = trainer.fit()
        except Preempted:
            distributed.finish()  # every rank stopped after the same step
            raise
        distributed.finish()
        return step
    finally:
        distributed.cleanup()


__all__ = ["Trainer", "run", "lr_at", "rank_seed", "Preempted", "prepare_run_dir", "check_run_dir", "write_run_config"]
