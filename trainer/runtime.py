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
