"""One rank of a data-parallel DP fine-tuning run (see the package docstring)."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import Config, ConfigError
from trainer.distributed.checkpoint import (CHECKPOINTS, EMA_FILE, LATEST, STATE_FILE, WEIGHTS_FILE, Checkpoint,
                                            TrainState, load_ema, load_trainable)
from trainer.distributed.deepspeed_config import (DEFAULT_DEEPSPEED_CONFIG, DeepSpeedSettings, check_deepspeed_config,
                                                  load_deepspeed_config)
from trainer.distributed.partition import FrozenPartition
from trainer.distributed.sharded_adamw import ShardedAdamW
from trainer.io import load_state, save_safetensors, save_state, write_json
from trainer.runtime import LeftOut, Placement, Runtime, with_padding_row

if TYPE_CHECKING:
    from trainer.privacy import DPGradientEngine


# process counts that MPI and Slurm launchers set for each process they start (torchrun and the deepspeed
# launcher set WORLD_SIZE); DistributedRun discovers the MPI ones (through DeepSpeed), not Slurm's
MPI_WORLD_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
SLURM_WORLD_SIZES = ("SLURM_STEP_NUM_TASKS",)
FOREIGN_WORLD_SIZES = (*MPI_WORLD_SIZES, *SLURM_WORLD_SIZES)


def foreign_launch(variables: tuple[str, ...] = FOREIGN_WORLD_SIZES) -> Optional[str]:
    """``VAR=N`` when a launcher setting one of ``variables`` started this process as one of N > 1 and
    ``WORLD_SIZE`` does not say it has company (unset, or 1 as a container may export), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    for var in variables:
        value = os.environ.get(var, "1")
        if value.isdigit() and int(value) > 1:
            return f"{var}={value}"
    return None


def launch(cfg: Config) -> Optional["DistributedRun"]:
    """The distributed runtime when launched on several processes or with a DeepSpeed config, else None.

    A process that srun, or an MPI launcher without a DeepSpeed config (whose initialisation finds
    MPI ranks itself), started as one of several with no ``WORLD_SIZE`` above 1 is refused: each would
    fine-tune on the whole private set alone, and their releases would compose.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    name = cfg.finetune.deepspeed_config
    foreign = foreign_launch(FOREIGN_WORLD_SIZES if name is None else SLURM_WORLD_SIZES)
    if foreign:
        raise ConfigError(f"launched as one of several processes ({foreign}) and WORLD_SIZE is not above 1: each "
                          "would train on the whole private set alone; launch with torchrun (under srun: one "
                          "torchrun per node), with mpirun and finetune.deepspeed_config set, or as one process")
    if world_size == 1 and name is None:
        return None
    placement = Placement.from_config(cfg, private=True)  # device "auto"/"cuda": this rank's GPU (LOCAL_RANK)
    if name is None:
        settings = check_deepspeed_config(DEFAULT_DEEPSPEED_CONFIG, cfg.finetune, "default: ZeRO stage 0")
    else:
        settings = load_deepspeed_config(name, cfg.finetune)
    return DistributedRun(settings, placement)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedRun(Runtime):
    """One rank of a data-parallel DP fine-tuning run (see the package docstring).

    The methods mirror :class:`trainer.distributed.single.SingleProcess`; the stage calls them in
    the same order on every rank.
    """

    def __init__(self, settings: DeepSpeedSettings, placement: Optional[Placement] = None):
        import deepspeed

        launched = any(k in os.environ for k in ("RANK", *MPI_WORLD_SIZES))
        if not launched:  # a plain process with a DeepSpeed config: a world of one
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        placement = (placement or Placement(torch.device("cpu"))).on_local_rank()
        deepspeed.init_distributed(dist_backend="nccl" if placement.device.type == "cuda" else "gloo")
        super().__init__(placement, dist.get_rank(), dist.get_world_size())
        self._joined = True
        self.settings = settings
        self.ldm_partition: Optional[FrozenPartition] = None  # set by place()
        self.ae_partition: Optional[FrozenPartition] = None
        self._padding_rows: Optional[Tensor] = None  # set by encode()

    # ------------------------------------------------------------------ models and data
    def place(self, ldm: nn.Module, autoencoder: nn.Module) -> None:
        """Move both models to this rank's device; with ZeRO-3, partition their frozen weights."""
        ldm.to(self.device)
        autoencoder.to(self.device)
        zero3 = self.settings.config if self.settings.zero_stage == 3 else None
        self.ldm_partition = FrozenPartition(ldm, zero3)
        self.ae_partition = FrozenPartition(autoencoder, zero3)

    def layout(self) -> dict:
        """World size, ZeRO stage and the frozen elements each rank holds (a collective)."""
        partitions = self._partitions()
        held = [float(sum(part.resident_frozen_numel() for part in partitions))]
        per_rank = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(per_rank, torch.tensor(held, dtype=torch.float64, device=self.device))
        return {"world_size": self.world_size, "zero_stage": self.settings.zero_stage,
                "frozen_parameters": sum(part.frozen_numel() for part in partitions),
                "frozen_parameters_held_per_rank": [int(t.item()) for t in per_rank]}

    def _partitions(self) -> tuple[FrozenPartition, FrozenPartition]:
        if self.ldm_partition is None or self.ae_partition is None:
            raise RuntimeError("DistributedRun.place(ldm, autoencoder) must run first")
        return self.ldm_partition, self.ae_partition

    def _model(self, fn: Callable, *args, **kwargs):
        """Run LDM code on this rank (through ZeRO-3, and bf16 autocast when configured)."""
        dtype = self.settings.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return self._partitions()[0](fn, *args, **kwargs)

    @torch.no_grad()
    def encode(self, autoencoder: nn.Module, images: Tensor, labels: Tensor,
               batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior (mean, std) and labels of this rank's slice, on its device (rows as in :meth:`hold`).

        Every rank encodes the same number of batches (the partitioned encoder's gathers are collective).
        """
        local = images[self.rank::self.world_size]
        if len(local) == 0:
            raise ValueError(f"data.private: {len(images)} examples cannot be split over {self.world_size} ranks")
        batches = math.ceil(math.ceil(len(images) / self.world_size) / batch_size)
        means, stds = [], []
        for k in range(batches):
            x = local[k * batch_size: (k + 1) * batch_size]
            real = len(x) > 0
            if not real:  # keeps this rank in step with the others' collectives; discarded
                x = torch.zeros_like(images[:1])
            m, s = self._partitions()[1](autoencoder.encode, x.to(self.device))
            if real:
                means.append(m)
                stds.append(s)
        return self._with_padding(torch.cat(means), torch.cat(stds), labels[self.rank::self.world_size])

    def hold(self, mean: Tensor, std: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keep this rank's rows of an already encoded private set (a latent cache).

        Row k holds private example ``rank + k * world_size``; one more row, a zero latent with
        label 0, is the public padding example.
        """
        if len(mean) < self.world_size:
            raise ValueError(f"data.private: {len(mean)} examples cannot be split over {self.world_size} ranks")
        sl = slice(self.rank, None, self.world_size)
        return self._with_padding(mean[sl].to(self.device), std[sl].to(self.device), labels[sl])

    def _with_padding(self, mean: Tensor, std: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, std, local_labels = with_padding_row(mean, std, labels.to(mean.device))
        self.mark_padding_row(len(mean))
        return mean, std, local_labels.to(self.device)

    def mark_padding_row(self, rows: int) -> None:
        super().mark_padding_row(rows)
        self._padding_rows = torch.tensor([self.padding_row], device=self.device)

    def make_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> ShardedAdamW:
        return ShardedAdamW(params, lr, weight_decay, self.rank, self.world_size,
                            offload=self.settings.offload_optimizer)

    # ------------------------------------------------------------------ one logical step
    def train_step(self, engine: "DPGradientEngine", optimizer: ShardedAdamW, micro_batches: list[Tensor],
                   example_losses: Callable[[Tensor], Tensor],
                   generator: Optional[torch.Generator] = None) -> dict[str, float]:
        """Clip, noise (rank 0), sum over ranks and step; returns metrics summed over ranks.

        ``micro_batches`` are global indices of this rank's Poisson batch;
        ``example_losses(rows)`` gives the per-example losses of local rows (see :meth:`encode`),
        drawing from ``generator``. The metrics are non-private diagnostics (loss, realised batch
        size, clip fraction, examples left out for a non-finite gradient: every rank then runs the
        step again, see :class:`trainer.runtime.LeftOut`).
        """
        if self._padding_rows is None:
            raise RuntimeError("DistributedRun.encode must run before train_step (it builds the local rows)")
        real = [(idx // self.world_size).to(self.device) for idx in micro_batches if idx.numel() > 0]
        rounds = self.max_over_ranks(len(real))  # every rank runs as many forwards (ZeRO-3 gathers in them)
        left_out = LeftOut(real, self.padding_row, generator)
        while True:
            left_out.begin_pass()
            loss_sum, count = 0.0, 0
            for k in range(rounds):
                if k < len(real):
                    losses = self._model(left_out.losses, k, example_losses)
                    engine.accumulate(losses)
                    loss_sum += float(losses.detach().sum())
                    count += left_out.kept(k)
                else:  # the public padding example: forward and backward run, its gradient is exactly 0
                    engine.accumulate(self._model(example_losses, self._padding_rows) * 0.0)
            if not left_out.again(engine, self.max_over_ranks(left_out.update(engine))):  # the same on every rank
                break
        stats = engine.finalize(add_noise=self.rank == 0)
        optimizer.step()
        clipped = stats["nonprivate_clip_fraction"] * stats["nonprivate_batch_size"]  # padding is never clipped
        loss_sum, count, clipped, dropped = self.sum_over_ranks([loss_sum, float(count), clipped,
                                                                 float(left_out.count)])
        return {"loss": loss_sum / max(1.0, count), "batch_size": count,
                "clip_fraction": clipped / count if count else 0.0, "nonfinite": dropped}

    def check_engine(self, engine: "DPGradientEngine", probe_losses: Callable[[Tensor], Tensor], size: int,
                     rtol: float | None = None) -> None:
        """The engine's self-check on ``size`` public stand-in examples, to ``rtol``, on every rank (raises
        EngineSelfCheckError)."""
        engine.check(lambda rows: self._model(probe_losses, rows), size, rtol)

    def sample_grid(self, make_grid: Callable[[Path], Path], path: Path) -> Path:
        """Run ``make_grid(path)`` on every rank (ZeRO-3 gathers collectively); rank 0 keeps the image."""
        if self.is_main:
            return self._model(make_grid, path)
        with tempfile.TemporaryDirectory() as tmp:
            self._model(make_grid, Path(tmp) / path.name)
        return path

    # ------------------------------------------------------------------ checkpoints
    def _rank_file(self, folder: Path, rank: int, world_size: int) -> Path:
        return folder / f"rank-{rank:05d}-of-{world_size:05d}.pt"

    def save_checkpoint(self, run_dir: Path, step: int, mlflow_run_id: Optional[str], state: TrainState) -> None:
        """Every rank writes its shard; rank 0 the weights, then ``latest.json``; older steps are removed."""
        root = run_dir / CHECKPOINTS
        folder = root / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_state({"step": step, "rank": self.rank, "world_size": self.world_size,
                    "optimizer": state.optimizer.state_dict()},
                   self._rank_file(folder, self.rank, self.world_size))
        self.barrier()
        if self.is_main:
            metadata = state.weights_metadata(step)
            weights = {k: p.detach() for k, p in state.trainable.items()}
            save_safetensors(weights, folder / "trainable.safetensors", metadata)
            if state.ema is not None:
                save_safetensors(state.ema.state_dict(), folder / EMA_FILE, metadata)
            write_json({"step": step, "world_size": self.world_size, "folder": folder.name,
                        "mlflow_run_id": mlflow_run_id, "ledger": state.ledger.state_dict()}, root / LATEST)
            for old in root.glob("step-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
            save_safetensors(weights, run_dir / WEIGHTS_FILE, metadata)  # the stage's output, read by `dpldm sample`
            if state.ema is not None:
                save_safetensors(state.ema.state_dict(), run_dir / EMA_FILE, metadata)
        self.barrier()

    def resume(self, run_dir: Path, state: TrainState) -> Checkpoint:
        """Restore the last checkpoint (any world size); an empty :class:`Checkpoint` if there is none."""
        if (run_dir / STATE_FILE).is_file():
            raise ConfigError(f"{run_dir}: this run was checkpointed by a single process ({STATE_FILE}); "
                              "resume it as a single process")
        latest = run_dir / CHECKPOINTS / LATEST
        if not latest.is_file():
            return Checkpoint()
        info = json.loads(latest.read_text())
        folder, saved_world = run_dir / CHECKPOINTS / info["folder"], int(info["world_size"])
        step = int(info["step"])
        load_trainable(folder / "trainable.safetensors", state.trainable)
        load_ema(folder / EMA_FILE, state)
        shards = []
        for r in range(saved_world):
            shard = load_state(self._rank_file(folder, r, saved_world))
            if shard is None:
                raise FileNotFoundError(f"{folder}: the checkpoint lacks the file of rank {r} of {saved_world}")
            shards.append(shard)
        state.optimizer.load_shards([s["optimizer"] for s in shards])
        state.sampler.steps_done = step  # fresh OS-entropy samplers and generators from the saved step
        return Checkpoint(step, info.get("mlflow_run_id"), int(info.get("ledger", {}).get("steps_taken", step)))
