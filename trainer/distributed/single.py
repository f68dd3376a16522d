"""The fine-tuning runtime in one process (the other shape, for several processes, is :mod:`trainer.distributed.run`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from trainer.config import ConfigError
from trainer.distributed.checkpoint import (CHECKPOINTS, EMA_FILE, STATE_FILE, WEIGHTS_FILE, Checkpoint, TrainState,
                                            load_ema, load_trainable)
from trainer.errors import RunError
from trainer.io import load_state, save_safetensors, save_state
from trainer.pipeline import encode_images
from trainer.runtime import Runtime, adamw, isolate_nonfinite


class SingleProcess(Runtime):
    """The fine-tuning runtime in one process: the whole private set, plain AdamW, noise in ``finalize``.

    :class:`trainer.distributed.run.DistributedRun` has the same methods for several processes.
    """

    def place(self, ldm, autoencoder) -> None:
        """Both models on this process's device."""
        ldm.to(self.device)
        autoencoder.to(self.device)

    def layout(self) -> None:
        """No partitioning to describe."""

    def encode(self, autoencoder, images: torch.Tensor, labels: torch.Tensor):
        """Posterior (mean, std) and labels of every private example, on the device; row i is example i."""
        mean, std = encode_images(autoencoder, images, desc="encode private set", device=self.device)
        return mean, std, labels.to(self.device)

    def hold(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor):
        """An already encoded private set (a latent cache): every row on the device, row i is example i."""
        return mean.to(self.device), std.to(self.device), labels.to(self.device)

    def make_optimizer(self, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return adamw(params, lr, weight_decay)

    def train_step(self, engine, optimizer, micro_batches: list[torch.Tensor],
                   example_losses: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """One logical DP-SGD step: clip every example, noise once, step; non-private metrics.

        An example whose gradient is not finite is left out (the step is accumulated again:
        :func:`trainer.runtime.isolate_nonfinite`); ``nonfinite`` counts them.
        """
        dropped = 0
        while True:
            loss_sum, count = 0.0, 0
            for idx in micro_batches:
                losses = example_losses(idx)
                engine.accumulate(losses)
                loss_sum += float(losses.detach().sum())
                count += len(idx)
            bad = engine.nonfinite_examples()
            if not bad:
                break
            engine.discard()
            micro_batches, removed = isolate_nonfinite(micro_batches, bad)
            dropped += removed
        stats = engine.finalize()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum / max(1, count), "batch_size": count,
                "clip_fraction": stats["nonprivate_clip_fraction"], "nonfinite": dropped}

    def check_engine(self, engine, probe_losses: Callable[[torch.Tensor], torch.Tensor], size: int) -> None:
        """The engine's self-check on ``size`` public stand-in examples (raises EngineSelfCheckError)."""
        engine.check(probe_losses, size)

    def sample_grid(self, make_grid: Callable[[Path], Path], path: Path) -> Path:
        return make_grid(path)

    def save_checkpoint(self, run_dir: Path, step: int, mlflow_run_id: str | None, state: TrainState) -> None:
        metadata = state.weights_metadata(step)
        save_safetensors({k: p.detach() for k, p in state.trainable.items()}, run_dir / WEIGHTS_FILE, metadata)
        if state.ema is not None:
            save_safetensors(state.ema.state_dict(), run_dir / EMA_FILE, metadata)
        save_state({"optimizer": state.optimizer.state_dict(), "step": step, "mlflow_run_id": mlflow_run_id,
                    "ledger": state.ledger.state_dict()}, run_dir / STATE_FILE)

    def resume(self, run_dir: Path, state: TrainState) -> Checkpoint:
        """Weights and optimizer from the last checkpoint; the sampler continues at its step."""
        if (run_dir / CHECKPOINTS).is_dir():
            raise ConfigError(f"{run_dir}: this run was checkpointed by a distributed run ({CHECKPOINTS}/); "
                              "resume it the same way (e.g. torchrun --nproc_per_node 1 ...)")
        saved = load_state(run_dir / STATE_FILE)
        if saved is None:
            if (run_dir / WEIGHTS_FILE).is_file():
                raise RunError(f"{run_dir / STATE_FILE}: missing, but {WEIGHTS_FILE} holds trained weights: the run "
                               "cannot resume; restore the file, or start another run (finetune.name=...)")
            return Checkpoint()
        load_trainable(run_dir / WEIGHTS_FILE, state.trainable)
        load_ema(run_dir / EMA_FILE, state)
        state.optimizer.load_state_dict(saved["optimizer"])
        step = int(saved["step"])
        state.sampler.steps_done = step
        return Checkpoint(step, saved.get("mlflow_run_id"), int(saved.get("ledger", {}).get("steps_taken", step)))
