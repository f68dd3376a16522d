"""Where a stage runs: the device, the numeric precision (the top-level ``device`` and
``precision`` config keys) and the process group, shared by every stage (:class:`Runtime`).

``device``: ``auto`` (the CUDA device of this process when one is visible, else the CPU),
``cpu``, ``cuda`` or ``cuda:N``. ``precision``: ``fp32``, ``bf16`` (autocast of the forward
and backward passes; weights, optimizer state, and in DP fine-tuning the per-example norms,
clip factors, clipped sums and noise stay float32), or ``auto``: bf16 where the device multiplies
bf16 matrices natively (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX), else fp32.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager, NoReturn

import torch

from trainer.config import ConfigError
from trainer.errors import RunError, UsageError

PRECISIONS = ("fp32", "bf16", "auto")


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params``, its fused kernel where torch has one (CPU and CUDA).

    The same update as the per-tensor loop that torch picks on the CPU by default (to float
    rounding); on the demo's 4.2M-parameter UNet a step takes ~6 ms instead of ~20-30 ms on two
    CPU cores, ~8 % of a pretraining step of batch 64. The optimizer's state loads either way.
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def with_padding_row(mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Private rows plus one last row, the public padding example (a zero latent, label 0): a
    stand-in a step runs at loss weight 0 (a rank with no example of its own, an example left out)."""
    return (torch.cat([mean, torch.zeros_like(mean[:1])]), torch.cat([std, torch.zeros_like(std[:1])]),
            torch.cat([labels, labels[:1] * 0]))


class LeftOut:
    """The examples of one logical step left out for a non-finite gradient (NaN or inf: it would make
    the whole released step NaN), and how the step is accumulated again without them.

    Every pass runs the same micro-batches of local rows with the same draws (``generator``, the
    one the losses draw timesteps and noise from, and torch's default generators, rewound to the
    step's start), a left-out example replaced by the padding row at loss weight 0. So every other
    example contributes what it did, and a left-out one contributes 0 (within the clipping bound),
    decided by its own gradient alone.
    """

    BROKEN = 2  # :meth:`update`'s verdict when the step cannot be released (``problem`` says why)

    def __init__(self, micro_batches: list[torch.Tensor], padding_row: int | None,
                 generator: torch.Generator | None):
        self.micro_batches, self.padding_row, self.generator = micro_batches, padding_row, generator
        self.out = [torch.zeros(len(idx), dtype=torch.bool) for idx in micro_batches]
        self.start = generator.get_state() if generator is not None else None
        # the default generators too: dropout in a trainable text encoder or UNet draws from them
        self.cpu_start = torch.get_rng_state()
        self.cuda_start = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.problem = ""

    def begin_pass(self) -> None:
        """Rewind every generator the losses may draw from to where the step began."""
        if self.generator is not None:
            self.generator.set_state(self.start)
        torch.set_rng_state(self.cpu_start)
        if self.cuda_start is not None:
            torch.cuda.set_rng_state_all(self.cuda_start)

    def losses(self, k: int, example_losses) -> torch.Tensor:
        """Per-example losses of micro-batch ``k``, left-out examples replaced and weighted 0."""
        idx, out = self.micro_batches[k], self.out[k]
        if not out.any():
            return example_losses(idx)
        out = out.to(idx.device)
        losses = example_losses(torch.where(out, torch.full_like(idx, self.padding_row), idx))
        return losses * (~out).to(losses.device, losses.dtype)

    def kept(self, k: int) -> int:
        return int((~self.out[k]).sum())

    @property
    def count(self) -> int:
        return sum(int(out.sum()) for out in self.out)

    def update(self, engine) -> int:
        """After a pass: 0 (release it), 1 (examples newly left out: ``engine.discard()`` and run the
        pass again) or ``BROKEN``. Micro-batches past ``micro_batches`` are padding ones."""
        try:
            bad = engine.nonfinite_examples()
        except RuntimeError as err:
            self.problem = str(err)
            return self.BROKEN
        for k, flagged in enumerate(bad):
            if len(flagged) and (k >= len(self.out) or bool(self.out[k][flagged].any())):
                self.problem = ("the public padding example's gradient is not finite: the model is broken "
                                "(NaN weights?)")
                return self.BROKEN
        if bad and self.padding_row is None:
            self.problem = "an example's gradient is not finite, and there is no padding row to leave it out with"
            return self.BROKEN
        for out, flagged in zip(self.out, bad):
            out[flagged] = True
        return int(bool(bad))

    def again(self, engine, verdict: int) -> bool:
        """After a pass whose :meth:`update` gave ``verdict`` (on several ranks, their maximum): False
        to release the step, True to run the pass again (what it accumulated discarded); RunError
        when the step cannot be released."""
        if verdict == 0:
            return False
        engine.discard()
        if verdict == self.BROKEN:
            raise RunError(f"DP step refused: {self.problem or 'on another rank'}")
        return True


def resolve_device(spec: str, flag: str | None = None) -> torch.device:
    """The config's ``device`` (or the command-line ``flag``, e.g. ``--device``) -> a torch device; a
    CUDA request without CUDA is a ConfigError (UsageError naming the flag)."""
    def refuse(words: str) -> NoReturn:
        if flag:
            raise UsageError(f"{flag}: {words}")
        raise ConfigError(f"device: {words}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            refuse(f"{spec!r} asked for, but torch sees no CUDA device here; use cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            refuse(f"{spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    refuse(f"must be auto, cpu, cuda or cuda:N, got {spec!r}")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with bf16 support, or a CPU
    with AVX-512 BF16 or AMX (elsewhere bf16 is emulated, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def resolve_precision(spec: str, device: torch.device) -> str:
    """The config's ``precision`` on ``device`` -> ``fp32`` or ``bf16``."""
    if spec not in PRECISIONS:
        raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    if spec == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return spec


@dataclass(frozen=True)
class Placement:
    """A device and a precision: where tensors go and how the forward/backward passes compute."""

    device: torch.device
    precision: str = "fp32"

    @classmethod
    def from_config(cls, cfg, private: bool = False) -> "Placement":
        """The config's ``device`` and ``precision``; for the DP steps (``private``) ``finetune.precision``
        when it is set."""
        device = resolve_device(cfg.device)
        spec = cfg.finetune.precision if private and cfg.finetune.precision is not None else cfg.precision
        return cls(device, resolve_precision(spec, device))

    def on_local_rank(self) -> "Placement":
        """Under a launcher: ``cuda`` without an index becomes this process's GPU (``LOCAL_RANK``),
        made the current device."""
        placement = self
        if self.device.type == "cuda" and self.device.index is None:
            placement = Placement(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), self.precision)
        if placement.device.type == "cuda":
            torch.cuda.set_device(placement.device)
        return placement

    def autocast(self) -> ContextManager:
        """Mixed precision around a forward (and its backward) pass; nothing in fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


class Runtime:
    """Where and how a stage runs: a :class:`Placement` (device, precision) and this process's
    place among the data-parallel processes (rank ``rank`` of ``world_size``; 0 of 1 alone).

    Every stage runs on one. Public pretraining uses it directly (:meth:`start`: under ``torchrun``
    or the ``deepspeed`` launcher it joins the process group, NCCL on CUDA, else gloo); DP
    fine-tuning uses its two shapes, :class:`trainer.distributed.SingleProcess` and
    :class:`trainer.distributed.DistributedRun`, which add the private-data steps. The collectives
    below are no-ops in one process, and take tensors on the runtime's device (NCCL needs them there).
    """

    def __init__(self, placement: Placement | None = None, rank: int = 0, world_size: int = 1):
        self.placement = placement or Placement(torch.device("cpu"))
        self.device = self.placement.device
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self._joined = False  # this object initialised the process group (close() leaves it)

    padding_row: int | None = None  # the row of the public padding example among the private rows held

    def mark_padding_row(self, rows: int) -> None:
        """The last of the ``rows`` private rows held (:func:`with_padding_row`) is the padding example."""
        self.padding_row = rows - 1

    @classmethod
    def start(cls, cfg) -> "Runtime":
        """The config's device and precision; under a launcher (``WORLD_SIZE`` > 1), join the
        default process group and take this rank's GPU (``device: auto`` or ``cuda``)."""
        placement = Placement.from_config(cfg)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls(placement)
        import torch.distributed as dist
        placement = placement.on_local_rank()
        joined = not dist.is_initialized()
        if joined:
            dist.init_process_group("nccl" if placement.device.type == "cuda" else "gloo")
        runtime = cls(placement, dist.get_rank(), dist.get_world_size())
        runtime._joined = joined
        return runtime

    def autocast(self) -> ContextManager:
        """The forward's precision context (``precision: bf16``: autocast)."""
        return self.placement.autocast()

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def _all_reduce(self, values: list, dtype: torch.dtype, op: str) -> torch.Tensor:
        import torch.distributed as dist
        t = torch.tensor(values, dtype=dtype, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t

    # one process: no tensor and no device sync (these run every step)
    def sum_over_ranks(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        return self._all_reduce(values, torch.float64, "SUM").tolist()

    def max_over_ranks(self, value: int) -> int:
        if self.world_size == 1:
            return int(value)
        return int(self._all_reduce([value], torch.int64, "MAX").item())

    def same_on_every_rank(self, values: list[float]) -> bool:
        """Whether every rank holds these ``values`` (compared exactly, as float64)."""
        if self.world_size == 1:
            return True
        high, low = (self._all_reduce(values, torch.float64, op) for op in ("MAX", "MIN"))
        return torch.equal(high, low)

    @contextlib.contextmanager
    def refusing_together(self):
        """A block of checks each rank runs on its own (no collective inside): when one rank refuses
        (raises), every rank does, each with the reason it can know, instead of the others waiting in
        their next collective until the launcher stops them."""
        if self.world_size == 1:
            yield
            return
        try:
            yield
        except Exception:
            try:
                self.any_rank(True)
            except Exception:  # noqa: BLE001 - a peer already gone: this rank's own reason is the one to show
                pass
            raise
        if self.any_rank(False):
            raise RunError("another process refused the run (its message says why); nothing was written")

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on some rank (e.g. a stop request: every rank stops at the same step)."""
        return bool(self.max_over_ranks(int(flag)))

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Every rank starts from rank 0's weights (and buffers)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each ``.grad`` by its mean over the ranks, as DDP does: one all-reduce of one flat
        buffer. With each rank's loss the mean over its B / world_size examples, the result is the
        gradient of the mean loss over the B examples of the step (a missing ``.grad`` counts as 0).
        Public data only: DP fine-tuning sums clipped, noised gradients instead (``DistributedRun``)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def close(self, finished: bool = False) -> None:
        """Leave the process group this runtime joined. ``finished``: the work ended normally on
        every rank, so wait at a barrier first and no rank tears its connections down while
        another still writes or communicates (after an error there is no barrier: the other
        ranks may never arrive)."""
        if self._joined:
            import torch.distributed as dist
            if dist.is_initialized():
                if finished:
                    self.barrier()
                dist.destroy_process_group()
            self._joined = False

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)

    # ------------------------------------------------------------------ splitting public work
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
        """The public-data generator's seed of this rank (rank 0: the config's seed, as in one process)."""
        return seed + 1_000_003 * self.rank
