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
from trainer.runtime import LeftOut, Runtime, adamw, with_padding_row


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
        """Posterior (mean, std) and labels of every private example, on the device; row i is example i,
        and one more row is the public padding example (:func:`trainer.runtime.with_padding_row`)."""
        mean, std = encode_images(autoencoder, images, desc="encode private set", device=self.device)
        return self.hold(mean, std, labels)

    def hold(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor):
        """An already encoded private set (a latent cache): every row on the device, row i is example i,
        and one more row is the public padding example."""
        mean, std, labels = with_padding_row(mean.to(self.device), std.to(self.device), labels.to(self.device))
        self.mark_padding_row(len(mean))
        return mean, std, labels

    def make_optimizer(self, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return adamw(params, lr, weight_decay)

    def train_step(self, engine, optimizer, micro_batches: list[torch.Tensor],
                   example_losses: Callable[[torch.Tensor], torch.Tensor],
                   generator: torch.Generator | None = None) -> dict[str, float]:
        """One logical DP-SGD step: clip every example, noise once, step; non-private metrics.

        An example whose gradient is not finite is left out (:class:`trainer.runtime.LeftOut`; its
        redo replays ``generator``, the one ``example_losses`` draws from); ``nonfinite`` counts them.
        """
        left_out = LeftOut(micro_batches, self.padding_row, generator)
        while True:
            left_out.begin_pass()
            loss_sum, count = 0.0, 0
            for k in range(len(micro_batches)):
                losses = left_out.losses(k, example_losses)
                engine.accumulate(losses)
                loss_sum += float(losses.detach().sum())
                count += left_out.kept(k)
            if not left_out.again(engine, left_out.update(engine)):
                break
        stats = engine.finalize()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum / max(1, count), "batch_size": count,
                "clip_fraction": stats["nonprivate_clip_fraction"], "nonfinite": left_out.count}

    def check_engine(self, engine, probe_losses: Callable[[torch.Tensor], torch.Tensor], size: int,
                     rtol: float | None = None) -> None:
        """The engine's self-check on ``size`` public stand-in examples, to ``rtol`` (raises EngineSelfCheckError)."""
        engine.check(probe_losses, size, rtol)

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
