"""Data-parallel strategies: DDP, FSDP2 (`fully_shard` per block, optional hybrid sharding) and
DeepSpeed ZeRO 0-3, behind one small interface the trainer uses:

    strategy.forward                  the callable to run the model with (wrapped / compiled)
    with strategy.micro_step(last):   one accumulation micro-step (gradient sync only when `last`)
        strategy.backward(loss)
    found_inf, gnorm = strategy.step(lr, scaler, grad_clip)   once per optimizer step; both are
                                      device tensors (nothing in a step waits for the device)
    strategy.ema_sources()            the tensors EMA mirrors on this rank (param, shard or partition)
    strategy.save(folder, ema) / strategy.load(folder, ema)  model + optimizer + EMA

Parameters, gradients and optimizer state are float32 under DDP/FSDP (autocast supplies bf16/fp16
arithmetic); DeepSpeed keeps its own half-precision copies and float32 master weights.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from runtime.distributed import DistInfo, free_port, peers
from runtime.safe_load import dcp_load
from launch.train.ema import EMA
from launch.precision import LossScaler, apply_optimizer_step


def ensure_process_group(info: DistInfo) -> None:
    """FSDP2 and DeepSpeed need a process group even for one process: create a world of one."""
    if dist.is_initialized():
        return
    if info.world_size != 1:
        raise AssertionError("runtime.distributed.setup() should have created the process group")
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1, timeout=datetime.timedelta(minutes=30))


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """AdamW with the config's betas, eps and weight decay (lr is set by the trainer every step).

    The fused kernel where torch has one for the parameters' device (CUDA, CPU, ...): it unscales
    and skips an overflowing step on the device (`launch.precision.apply_optimizer_step`).
    """
    params = list(params)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # no fused kernel for this device: the step reads its finiteness flag
        return torch.optim.AdamW(params, **kwargs)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: each entry of the UNet's block lists and the middle block.

    Sharding per block lets FSDP all-gather one block's weights while the previous block computes.
    """
    units = []
    for name in ("input_blocks", "output_blocks"):
        blocks = getattr(module, name, None)
        if isinstance(blocks, nn.ModuleList):
            units.extend(b for b in blocks if any(True for _ in b.parameters()))
    middle = getattr(module, "middle_block", None)
    if middle is not None:
        units.append(middle)
    if not units:  # another architecture: shard each direct child that holds parameters
        units = [m for m in module.children() if any(True for _ in m.parameters())]
    return units


def shard_groups_note(groups: list[list[int]]) -> str:
    """HSDP's shard groups (the rows of its (replicate, shard) mesh) and the hosts they run on, in one line.

    Each group should be one node's processes, so that parameter all-gathers stay inside the node; a
    group spanning nodes is flagged (fsdp_shard_size different from the processes per node).
    """
    host_of = {p.rank: p.host for p in peers()}
    parts, spanning = [], 0
    for group in groups:
        hosts = list(dict.fromkeys(host_of.get(r, "?") for r in group))
        spanning += len(hosts) > 1
        parts.append(f"ranks {', '.join(map(str, group))} on {', '.join(hosts)}")
    line = f"HSDP: {len(groups)} replicas, each sharded over {len(groups[0])} ranks: " + "; ".join(parts)
    if spanning:
        line += (f". Warning: {spanning} shard group(s) span several nodes, so every parameter all-gather crosses "
                 "the network: set fsdp_shard_size to the number of processes per node")
    return line


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class TorchStrategy:
    """DDP (`strategy=ddp`) and FSDP2 (`strategy=fsdp`)."""

    def __init__(self, cfg, module: nn.Module, info: DistInfo):
        self.kind = cfg.strategy
        self.notes: list[str] = []  # lines for the run's log (rank 0 writes them)
        self.info = info
        self.module = module.to(info.device)
        wrapped: nn.Module = self.module
        if self.kind == "fsdp":
            ensure_process_group(info)
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            world = dist.get_world_size()
            shard = cfg.fsdp_shard_size or world
            if world % shard:
                raise ValueError(f"fsdp_shard_size={shard} must divide the world size {world}")
            if shard == world:
                mesh = init_device_mesh(info.device.type, (world,), mesh_dim_names=("shard",))
            else:  # HSDP: shard inside a group (a node), replicate across groups
                mesh = init_device_mesh(info.device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
                self.notes.append(shard_groups_note(mesh.mesh.tolist()))
            for unit in shard_units(self.module):
                fully_shard(unit, mesh=mesh)
            fully_shard(self.module, mesh=mesh)
        elif info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [info.device.index] if info.device.type == "cuda" else None
            # Gradients as views of the all-reduce buckets: saves one float32 copy of the model.
            wrapped = DDP(self.module, device_ids=ids, gradient_as_bucket_view=True)
        self._wrapped = wrapped
        self.forward = torch.compile(wrapped) if cfg.compile else wrapped
        self.optimizer = make_optimizer(self.module.parameters(), cfg)

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def ema_sources(self) -> dict[str, torch.Tensor]:
        return dict(self.module.named_parameters())

    def micro_step(self, last: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step."""
        if last:
            if self.kind == "fsdp":
                self.module.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        if hasattr(self._wrapped, "no_sync"):
            return self._wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler: LossScaler, grad_accum: int) -> None:
        (loss * (scaler.scale_tensor / grad_accum)).backward()

    def step(self, lr: float, scaler: LossScaler, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, check, clip and apply the gradients on the device; returns (found_inf, grad norm).

        The norm is global (DDP gradients are identical after the all-reduce; FSDP reduces the
        shards' norms), so every rank takes the same decision without another collective.
        """
        _set_lr(self.optimizer, lr)
        found_inf, norm = apply_optimizer_step(self.optimizer, self.params, scaler.scale_tensor, grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        scaler.update(found_inf)
        return found_inf, norm

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self, ema: EMA) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}

    def save(self, folder: Path, ema: EMA) -> None:
        """Write model, optimizer and EMA with torch.distributed.checkpoint (every rank calls)."""
        with _single_process_quiet():
            dcp.save(self._state(ema), checkpoint_id=str(folder / "state"), no_dist=not dist.is_initialized())

    def load(self, folder: Path, ema: EMA, meta: dict) -> None:
        """Read a checkpoint written by DDP or FSDP at any world size (DCP reshards)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if meta.get("strategy") == "deepspeed":
            raise ValueError(f"{folder} was written by strategy=deepspeed; resume it with --set strategy=deepspeed "
                             f"(DeepSpeed checkpoints cannot be read by {self.kind})")
        state = self._state(ema)
        with _single_process_quiet():
            dcp_load(state, folder / "state", no_dist=not dist.is_initialized())
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @torch.no_grad()
    def full_ema(self, ema: EMA, name: str) -> dict[str, torch.Tensor]:
        """Unsharded EMA weights on every rank (collective under FSDP)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in ema.shadows[name].items()}

    @torch.no_grad()
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded model weights on every rank (collective under FSDP)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in self.module.state_dict().items()}


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_sizes(param_numels: list[int], device_type: str) -> dict:
    """ZeRO communication settings sized to the model (DeepSpeed's defaults assume billions of parameters).

    - reduce / all-gather buckets on GPUs: about 1/16 of the model, so ~16 buckets stream out during
      the backward and overlap it, but never smaller than the largest tensor nor larger than
      DeepSpeed's default 5e8 elements (fixed 5e8-element buckets made a tiny model allocate
      gigabytes); on CPUs (gloo, nothing to overlap with) one bucket of the whole model;
    - overlap_comm on GPUs only (separate CUDA streams);
    - contiguous_gradients: gradients copied into one buffer as they are produced (no fragmentation);
    - ZeRO-3: prefetch one bucket ahead; tensors below 1/10000 of the model (at most 1e5 elements,
      DeepSpeed's default) stay whole on every rank, where gathering them would cost more latency
      than the memory it saves.
    """
    total = max(sum(param_numels), 1)
    largest = max(param_numels, default=1)
    share = -(-total // 16) if device_type == "cuda" else total
    bucket = int(min(max(share, largest), 5e8))
    return {
        "overlap_comm": device_type == "cuda",
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": bucket,
        "stage3_param_persistence_threshold": int(min(max(total // 10_000, 1), 1e5)),
    }


def deepspeed_config(cfg, micro_batch: int, world_size: int, device_type: str,
                     param_numels: list[int] | None = None) -> dict:
    """The DeepSpeed JSON for a training config, with `cfg.deepspeed_config` deep-merged over it.

    `param_numels` (the model's tensor sizes) sizes buckets and thresholds (`deepspeed_sizes`);
    without it DeepSpeed's defaults apply.
    """
    zero = {"stage": cfg.zero_stage}
    if param_numels:
        zero.update(deepspeed_sizes(param_numels, device_type))
    generated = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": float(cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": int(round(math.log2(cfg.loss_scale_init))),
            "loss_scale_window": cfg.loss_scale_window,
            "min_loss_scale": cfg.loss_scale_floor,
            "hysteresis": 1,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
    }
    if not cfg.deepspeed_config:
        return generated
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"deepspeed_config {path} does not exist; pass a JSON file of DeepSpeed options")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed_config {path} is not valid JSON: {err}") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler"):
        if key in user and user[key] != generated.get(key):
            raise ValueError(f"{path} sets {key!r}; the trainer owns batch size, accumulation, optimizer and lr schedule: "
                             "set batch_size / grad_accum / lr / lr_schedule in the training config instead")
    return _deep_merge(generated, user)


class DeepSpeedStrategy:
    """DeepSpeed ZeRO stage 0-3 (`strategy=deepspeed`, `zero_stage=N`)."""

    kind = "deepspeed"

    def __init__(self, cfg, module: nn.Module, info: DistInfo, micro_batch: int):
        try:
            import deepspeed
        except ImportError:
            raise ValueError("strategy=deepspeed needs DeepSpeed: pip install 'adm-guided[deepspeed]'") from None
        # The shm_comm op JIT-compiles for minutes on first use and gloo does the same job on CPUs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ensure_process_group(info)
        # DeepSpeed reads the launcher's variables even when the process group already exists.
        for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size)):
            os.environ.setdefault(key, str(value))
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.info = info
        self.config = deepspeed_config(cfg, micro_batch, dist.get_world_size(), info.device.type,
                                       [p.numel() for p in module.parameters()])
        self.stage = int(self.config["zero_optimization"].get("stage", 0))
        module = module.to(info.device)
        self.optimizer = make_optimizer(module.parameters(), cfg)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=self.config)
        self.module = self.engine.module
        self.forward = torch.compile(self.engine) if cfg.compile else self.engine
        self._bad_loss = torch.zeros((), device=info.device)  # 1 once a micro-step's loss was not finite

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def ema_sources(self) -> dict[str, torch.Tensor]:
        if self.stage == 3:
            return {k: p.ds_tensor for k, p in self.module.named_parameters()}
        return dict(self.module.named_parameters())

    def micro_step(self, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler: LossScaler, grad_accum: int) -> None:
        # DeepSpeed divides by the accumulation steps and applies its fp16 loss scale itself.
        torch.maximum(self._bad_loss, (~torch.isfinite(loss.detach())).float(), out=self._bad_loss)
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self, lr: float, scaler: LossScaler, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed's step (its own clipping and fp16 scaling); returns (found_inf, grad norm) tensors.

        found_inf also marks a non-finite loss on any rank (bf16/fp32 DeepSpeed applies such a step).
        """
        _set_lr(self.optimizer, lr)
        self.engine.step()
        device = self.info.device
        # DeepSpeed decided `applied` on the host already; torch.full makes no copy that could wait.
        bad = torch.maximum(self._bad_loss, torch.full((), float(not self.engine.was_step_applied()), device=device))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._bad_loss.zero_()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = torch.full((), float("nan"), device=device)
        elif not isinstance(norm, torch.Tensor):
            norm = torch.full((), float(norm), device=device)
        scaler.update(bad)
        return bad, norm.detach().float()

    @property
    def loss_scale(self) -> float:
        opt = self.engine.optimizer
        return float(getattr(opt, "cur_scale", getattr(getattr(opt, "loss_scaler", None), "cur_scale", 1.0)) or 1.0)

    # -- ZeRO-3 partitions <-> full tensors ---------------------------------------------------
    def _gather(self, name: str, part: torch.Tensor) -> torch.Tensor:
        p = dict(self.module.named_parameters())[name]
        chunks = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, part.contiguous())
        return torch.cat(chunks)[: p.ds_numel].view(p.ds_shape)

    def _partition(self, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        flat = full.reshape(-1)
        start = dist.get_rank() * n
        piece = flat[start:start + n]
        out = torch.zeros_like(like)
        out.view(-1)[: piece.numel()].copy_(piece)
        return out

    @torch.no_grad()
    def full_ema(self, ema: EMA, name: str) -> dict[str, torch.Tensor]:
        """Unsharded EMA weights on every rank (collective under ZeRO-3)."""
        shadow = ema.shadows[name]
        if self.stage != 3:
            return {k: v.detach().clone() for k, v in shadow.items()}
        return {k: self._gather(k, v) for k, v in shadow.items()}

    @torch.no_grad()
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded float32 model weights on every rank (collective under ZeRO-3)."""
        if self.stage != 3:
            return {k: v.detach().float().clone() for k, v in self.module.state_dict().items()}
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in self.module.state_dict().items()}

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, folder: Path, ema: EMA) -> None:
        """DeepSpeed's own checkpoint (model, optimizer partitions, loss scale) plus the EMA via DCP."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="ds", client_state={}, save_latest=False)
        if ema:
            full = {name: self.full_ema(ema, name) for name in ema.names}
            dcp.save({"ema": full}, checkpoint_id=str(folder / "state"))

    def load(self, folder: Path, ema: EMA, meta: dict) -> None:
        """Read a DeepSpeed checkpoint of the same world size and ZeRO stage (files read weights-only)."""
        from launch.train.checkpointing import load_deepspeed_checkpoint

        if meta.get("strategy") != "deepspeed":
            raise ValueError(f"{folder} was written by strategy={meta.get('strategy')}; resume it with that strategy "
                             "(DeepSpeed cannot read torch.distributed.checkpoint folders)")
        if meta.get("world_size") != dist.get_world_size():
            raise ValueError(f"{folder} was written by {meta.get('world_size')} DeepSpeed processes but this run has "
                             f"{dist.get_world_size()}: ZeRO optimizer partitions cannot be resharded. Resume with "
                             f"{meta.get('world_size')} processes, or restart from the exported weights with --init-from")
        load_deepspeed_checkpoint(self.engine, folder / "deepspeed", tag="ds")
        if ema:
            target = {"ema": {name: {k: torch.empty(self.module.get_parameter(k).ds_shape if self.stage == 3 else v.shape,
                                                     dtype=torch.float32, device=v.device)
                                     for k, v in ema.shadows[name].items()} for name in ema.names}}
            dcp_load(target, folder / "state")
            with torch.no_grad():
                for name in ema.names:
                    for k, v in ema.shadows[name].items():
                        full = target["ema"][name][k]
                        v.copy_(self._partition(k, full, v) if self.stage == 3 else full)


def build_strategy(cfg, module: nn.Module, info: DistInfo, micro_batch: int):
    """The strategy object named by `cfg.strategy`, wrapping `module` (built identically on every rank)."""
    if cfg.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg, module, info, micro_batch)
    if cfg.strategy in ("ddp", "fsdp"):
        return TorchStrategy(cfg, module, info)
    raise ValueError(f"strategy={cfg.strategy!r} is not one of ddp, fsdp, deepspeed")


__all__ = ["build_strategy", "TorchStrategy", "shard_groups_note", "DeepSpeedStrategy", "deepspeed_config", "deepspeed_sizes",
           "ensure_process_group",
           "shard_units", "make_optimizer"]
