"""Exponential moving average of weights (public pretraining; DP fine-tuning, as post-processing)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor, nn

Weights = Union[nn.Module, Mapping[str, Tensor]]


def _tensors(source: Weights) -> Mapping[str, Tensor]:
    return source.state_dict() if isinstance(source, nn.Module) else source


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, for every float parameter and buffer of a
    module (or every float tensor of a name -> tensor mapping, e.g. the parameters a stage trains)."""

    def __init__(self, model: Weights, decay: float = 0.999):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in _tensors(model).items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: Weights) -> None:
        tensors = _tensors(model)
        keys = [k for k in self.shadow if k in tensors]
        # one multi-tensor kernel instead of a lerp per tensor (~300 in the demo's UNet)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [tensors[k].detach() for k in keys], 1 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore a saved shadow (into the current tensors, so they keep their device)."""
        with torch.no_grad():
            self.shadow = {k: self.shadow[k].copy_(v) if k in self.shadow else v.clone() for k, v in state.items()}

    @torch.no_grad()
    def copy_to(self, model: Weights) -> None:
        """Write the averages into a module, or into the tensors of a name -> tensor mapping."""
        if isinstance(model, nn.Module):
            model.load_state_dict({**model.state_dict(), **self.shadow})
        else:
            for k, v in self.shadow.items():
                model[k].copy_(v)
