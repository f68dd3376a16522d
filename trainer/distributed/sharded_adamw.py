"""AdamW over the trainable parameters with its state sharded across the ranks."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


# --- the optimizer of the trainable parameters -------------------------------------------------

class ShardedAdamW:
    """AdamW on this rank's shard of the flattened trainable parameters.

    The parameters are concatenated (model order, float32, zero-padded to a multiple of the
    world size) and rank r owns elements ``[r S, (r + 1) S)``. ``step()`` reduce-scatters the
    ``.grad`` of every rank (each rank receives the sum over ranks on its shard), steps AdamW
    on a float32 master copy of the shard (in CPU memory when ``offload``), and all-gathers
    the shards back into the parameters. AdamW is elementwise, so this equals AdamW on the
    whole parameters with the summed gradient.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float, rank: int, world_size: int,
                 offload: bool = False):
        if not params:
            raise ValueError("ShardedAdamW needs at least one parameter")
        self.params = list(params)
        self.rank, self.world_size = rank, world_size
        self.device = self.params[0].device
        self.numel = sum(p.numel() for p in self.params)
        self.shard_size = math.ceil(self.numel / world_size)
        self._start = rank * self.shard_size
        master_device = torch.device("cpu") if offload else self.device
        self.master = nn.Parameter(torch.zeros(self.shard_size, dtype=torch.float32, device=master_device))
        self._refresh_master()
        self.optimizer = torch.optim.AdamW([self.master], lr=lr, weight_decay=weight_decay)

    def _flatten(self, tensors: list[Tensor]) -> Tensor:
        flat = torch.zeros(self.shard_size * self.world_size, dtype=torch.float32, device=self.device)
        offset = 0
        for t in tensors:
            flat[offset: offset + t.numel()] = t.detach().reshape(-1).to(flat.device, torch.float32)
            offset += t.numel()
        return flat

    def _refresh_master(self) -> None:
        """Copy this rank's shard of the current parameter values into the master copy."""
        shard = self._flatten(list(self.params))[self._start: self._start + self.shard_size]
        with torch.no_grad():
            self.master.copy_(shard.to(self.master.device))

    @property
    def param_groups(self) -> list[dict]:
        """The inner AdamW's groups (``lr`` is set there, e.g. by a schedule)."""
        return self.optimizer.param_groups

    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        shard_grad = torch.empty(self.shard_size, dtype=torch.float32, device=self.device)
        dist.reduce_scatter_tensor(shard_grad, self._flatten(grads), op=dist.ReduceOp.SUM)
        self.master.grad = shard_grad.to(self.master.device)
        self.optimizer.step()
        self.master.grad = None
        full = torch.empty(self.shard_size * self.world_size, dtype=torch.float32, device=self.device)
        dist.all_gather_into_tensor(full, self.master.detach().to(self.device))
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(full[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        self.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state, with the layout needed to re-shard it."""
        return {"optimizer": self.optimizer.state_dict(), "numel": self.numel, "shard_size": self.shard_size,
                "rank": self.rank, "world_size": self.world_size}

    def load_shards(self, shards: list[dict]) -> None:
        """Load the optimizer state saved by every rank of a run on any world size.

        ``shards[r]`` is the ``state_dict()`` of old rank r. Call after the parameters hold the
        checkpoint's values (the master copy is taken from them).
        """
        if [s["rank"] for s in shards] != list(range(len(shards))) or shards[0]["world_size"] != len(shards):
            raise ValueError("optimizer shards: expected one state per rank of the saved run, in rank order")
        if shards[0]["numel"] != self.numel:
            raise ValueError(f"optimizer shards hold {shards[0]['numel']} elements, the trainable parameters "
                             f"{self.numel}: the checkpoint belongs to another selection of parameters")
        self._refresh_master()
        states = [s["optimizer"]["state"].get(0) for s in shards]
        if all(state is None for state in states):  # saved before the first step
            return
        state: dict[str, Any] = {}
        for key, value in states[0].items():
            if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == shards[0]["shard_size"]:
                whole = torch.cat([s[key].float() for s in states])[: self.numel]
                padded = torch.zeros(self.shard_size * self.world_size, dtype=torch.float32)
                padded[: self.numel] = whole
                state[key] = padded[self._start: self._start + self.shard_size].to(self.master.device)
            else:  # the step count, the same on every rank
                state[key] = value
        self.optimizer.load_state_dict({"state": {0: state}, "param_groups": shards[0]["optimizer"]["param_groups"]})
