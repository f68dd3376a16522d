"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention projections.

``LoRALinear`` wraps a frozen ``nn.Linear``: ``y = base(x) + (alpha / r) * up(down(x))`` with
``down`` [r, d_in] initialised like a Linear and ``up`` [d_out, r] at zero, so an adapted model
starts exactly equal to its base. ``down`` and ``up`` are plain ``nn.Linear`` modules over the
same [B, T, d] inputs, so a per-example gradient engine handles them like any Linear.
Keys: ``<proj>.base.weight`` (the frozen weight), ``<proj>.lora_down.weight``, ``<proj>.lora_up.weight``.
"""
from __future__ import annotations

from torch import Tensor, nn

from .attention import CrossAttention

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_up(self.lora_down(x))


def add_lora(modules: list[nn.Module], rank: int, alpha: float | None = None) -> list[LoRALinear]:
    """Wrap the ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` projections of every CrossAttention
    inside ``modules`` in place; returns the adapters (already-wrapped projections are kept)."""
    adapters: list[LoRALinear] = []
    for root in modules:
        for attn in [m for m in root.modules() if isinstance(m, CrossAttention)]:
            for target in LORA_TARGETS:
                parent, _, name = target.rpartition(".")
                owner = attn.get_submodule(parent) if parent else attn
                current = getattr(owner, name) if not name.isdigit() else owner[int(name)]
                if isinstance(current, LoRALinear):
                    adapters.append(current)
                    continue
                adapter = LoRALinear(current, rank, alpha)
                if name.isdigit():
                    owner[int(name)] = adapter
                else:
                    setattr(owner, name, adapter)
                adapters.append(adapter)
    return adapters
