"""The resumable training loop shared by the public pretraining stages.

A run folder holds ``<name>.safetensors`` for each trained module (EMA weights when EMA is on,
the raw ones in ``<name>.raw.safetensors``) and ``train-state.pt`` (optimizer, step, RNG state,
EMA, MLflow run id). An interrupted stage restarts from its last checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from trainer.config import TrainConfig
from trainer.diffusion import EMA
from trainer.interrupt import StopRequest
from trainer.io import load_safetensors, load_state, save_safetensors, save_state
from trainer.runtime import Runtime
from trainer.stages.common import STATE_FILE
from trainer.tracking import Run


class Trainer:
    """Run ``step_fn(step) -> metrics`` for ``train.steps`` steps with checkpoints and logging."""

    def __init__(self, run_dir: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                 train: TrainConfig, generator: torch.Generator, desc: str, runtime: Runtime | None = None):
        self.run_dir, self.modules, self.optimizer = run_dir, modules, optimizer
        self.train, self.generator, self.desc = train, generator, desc
        self.runtime = runtime or Runtime()
        params = nn.ModuleDict(modules)
        self.ema = EMA(params, train.ema_decay) if train.ema_decay else None
        self._params = params
        self.step = 0
        self.mlflow_run_id: Optional[str] = None
        self._resume()

    def _resume(self) -> None:
        state = load_state(self.run_dir / STATE_FILE)
        if state is None:
            return
        for name, module in self.modules.items():
            raw = self.run_dir / f"{name}.raw.safetensors"
            module.load_state_dict(load_safetensors(raw if raw.is_file() else self.run_dir / f"{name}.safetensors").state_dict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if self.runtime.rank == 0:
            self.generator.set_state(state["generator"])
        else:  # only rank 0's data stream is saved; the others start fresh ones (public data)
            self.generator.manual_seed(self.generator.initial_seed() + self.step)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.mlflow_run_id = state.get("mlflow_run_id")

    def save(self, run: Run) -> None:
        """Weights and state (rank 0 only: every rank holds the same weights)."""
        if not self.runtime.is_main:
            return
        for name, module in self.modules.items():
            raw = dict(module.state_dict())
            if self.ema is not None:
                save_safetensors(raw, self.run_dir / f"{name}.raw.safetensors", {"step": self.step})
                ema = {k[len(name) + 1:]: v for k, v in self.ema.state_dict().items() if k.startswith(name + ".")}
                save_safetensors({**raw, **ema}, self.run_dir / f"{name}.safetensors", {"step": self.step, "ema": True})
            else:
                save_safetensors(raw, self.run_dir / f"{name}.safetensors", {"step": self.step})
        state = {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "step": self.step, "mlflow_run_id": run.run_id or self.mlflow_run_id,
                 "world_size": self.runtime.world_size}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        save_state(state, self.run_dir / STATE_FILE)

    def fit(self, step_fn: Callable[[int], dict[str, float]], run: Run) -> None:
        """Train to ``train.steps``; on Ctrl-C / SIGTERM finish the step, checkpoint, raise KeyboardInterrupt."""
        t0, first = time.time(), self.step
        for module in self.modules.values():
            module.train()
        with StopRequest() as stop, tqdm(total=self.train.steps, initial=self.step, desc=self.desc,
                                         dynamic_ncols=True, disable=not self.runtime.is_main) as bar:
            while self.step < self.train.steps:
                metrics = step_fn(self.step)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self._params)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
                if self.step % self.train.log_every == 0 or self.step == self.train.steps:
                    run.log_metrics(metrics, step=self.step)
                stopping = self.runtime.any_rank(stop.requested)
                if stopping or self.step % self.train.checkpoint_every == 0 or self.step == self.train.steps:
                    self.save(run)
                if stopping:
                    raise KeyboardInterrupt
        if self.step > first:  # a rerun of a finished stage keeps the wall time of the run that trained
            run.log_metrics({"wall_time_s": time.time() - t0})
        for module in self.modules.values():
            module.eval()

    def load_best(self) -> None:
        """Load the weights that were saved as the stage's result (EMA ones when EMA is on)."""
        for name, module in self.modules.items():
            module.load_state_dict(load_safetensors(self.run_dir / f"{name}.safetensors").state_dict)
