"""Where a stage runs: the device and the numeric precision (the top-level ``device`` and
``precision`` config keys), shared by every stage.

``device``: ``auto`` (the CUDA device of this process when one is visible, else the CPU),
``cpu``, ``cuda`` or ``cuda:N``. ``precision``: ``fp32``, or ``bf16`` (autocast of the forward
and backward passes; weights, optimizer state, and in DP fine-tuning the per-example norms,
clip factors, clipped sums and noise stay float32).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager

import torch

from trainer.config import ConfigError

PRECISIONS = ("fp32", "bf16")


def resolve_device(spec: str) -> torch.device:
    """The config's ``device`` -> a torch device; a CUDA request without CUDA is a ConfigError."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} asked for, but torch sees no CUDA device here; use device=cpu "
                              "or device=auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {spec!r}")


@dataclass(frozen=True)
class Placement:
    """A device and a precision: where tensors go and how the forward/backward passes compute."""

    device: torch.device
    precision: str = "fp32"

    @classmethod
    def from_config(cls, cfg) -> "Placement":
        if cfg.precision not in PRECISIONS:
            raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        return cls(resolve_device(cfg.device), cfg.precision)

    def autocast(self) -> ContextManager:
        """Mixed precision around a forward (and its backward) pass; nothing in fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the data-parallel processes of a public pretraining stage."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on some rank (every rank then stops at the same step)."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, src=0)
        return float(t.item())

    def per_rank(self, batch_size: int, key: str) -> int:
        """This rank's share of a global batch; ConfigError naming ``key`` unless it divides evenly."""
        if batch_size % self.world_size:
            raise ConfigError(f"{key}: {batch_size} examples per step do not split over {self.world_size} processes")
        return batch_size // self.world_size

    def announce(self, stage: str, batch_size: int) -> None:
        if self.world_size > 1 and self.is_main:
            print(f"{stage}: data parallel over {self.world_size} processes "
                  f"({batch_size // self.world_size} examples each per step, gradients averaged)")

    def data_seed(self, seed: int) -> int:
        """The data generator's seed of this rank (rank 0: the config's seed, as in one process)."""
        return seed + 1_000_003 * self.rank


def join_data_parallel(device: torch.device) -> ProcessGroup:
    """Under ``torchrun`` or the ``deepspeed`` launcher (``WORLD_SIZE`` > 1), join the default process
    group (NCCL on CUDA, else gloo) and return this rank; in one process, rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return ProcessGroup()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ProcessGroup(dist.get_rank(), dist.get_world_size())


def broadcast_parameters(module: torch.nn.Module, group: ProcessGroup) -> None:
    """Every rank starts from rank 0's weights (and buffers)."""
    if group.world_size == 1:
        return
    import torch.distributed as dist
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], group: ProcessGroup) -> None:
    """Replace each ``.grad`` by its mean over the ranks, as DDP does: one all-reduce of one flat
    buffer. With each rank's loss the mean over its B / world_size examples, the result is the
    gradient of the mean loss over the B examples of the step (a missing ``.grad`` counts as 0)."""
    if group.world_size == 1:
        return
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= group.world_size
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()
