"""ZeRO-3 partitioning of the frozen weights (the trainable ones stay whole, for the DP engine)."""
from __future__ import annotations

import copy
from typing import Callable, Optional

from torch import nn


# --- ZeRO-3 for the frozen weights ----------------------------------------------------------------

def frozen_subtrees(module: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``module`` whose parameters are all frozen (and that have some).

    A module with trainable parameters of its own stays whole with everything under it: the DP
    engine may recompute its forward (the torch.func rule), which must not gather weights.
    """
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        return []
    parts: list[nn.Module] = []
    for child in module.children():
        parts.extend(frozen_subtrees(child))
    return parts


class _FrozenRoot(nn.Module):
    """The module DeepSpeed manages: the frozen parts, and a forward that runs any function.

    Running model code as ``root(fn)`` makes each call one forward of DeepSpeed's root, which is
    where ZeRO-3 starts its bookkeeping of the modules it gathers.
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, fn: Callable[[], None]) -> None:
        fn()


class FrozenPartition:
    """ZeRO-3 partitioning of the frozen weights of ``module``; with ``ds_config=None``, nothing.

    ``partition(fn, *args)`` runs ``fn`` (code that calls the module): each frozen module's
    weights are gathered for its forward (and backward) and released after. Every rank must
    make the same calls in the same order. Trainable parameters stay ordinary tensors.
    """

    def __init__(self, module: nn.Module, ds_config: Optional[dict]):
        self.module = module
        self.frozen = [p for p in module.parameters() if not p.requires_grad]
        self.root: Optional[nn.Module] = None
        parts = frozen_subtrees(module) if ds_config is not None else []
        if parts:
            import deepspeed
            engine, *_ = deepspeed.initialize(model=_FrozenRoot(parts), config=copy.deepcopy(ds_config))
            self.root = engine.module  # called directly: DeepSpeed's engine forward expects engine.backward

    def __call__(self, fn: Callable, *args, **kwargs):
        if self.root is None:
            return fn(*args, **kwargs)
        result = []  # handed back outside the root's output, which DeepSpeed expects to hold tensors only
        self.root(lambda: result.append(fn(*args, **kwargs)))
        return result[0]

    def frozen_numel(self) -> int:
        """Elements of all frozen weights (whole model)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.frozen)

    def resident_frozen_numel(self) -> int:
        """Elements of frozen weights this rank holds now: its partitions plus any gathered copies."""
        return sum(p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in self.frozen)
