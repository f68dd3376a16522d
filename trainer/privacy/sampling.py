"""Poisson sampling of logical batches, split into physical micro-batches.

At every logical step each example is included independently with probability q, so
batch sizes vary and empty batches happen; the privacy accounting assumes exactly this.
With several ranks, rank r samples its own disjoint slice (indices r, r + W, r + 2W, ...)
with the same q: the union over ranks is Poisson sampling of the whole set. Each rank
needs its own randomness (the default generator is seeded from OS entropy). Inclusion draws are
float64 (a float32 draw rounds q to a multiple of 2^-24: +19% at q = 1e-7).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from trainer.privacy.noise import entropy_generator


class PoissonBatchSampler:
    """Iterating yields one list of index tensors (micro-batches) per logical step.

    Each micro-batch holds at most ``max_physical_batch_size`` indices (int64, into the
    full dataset); an empty logical batch is a list with one empty tensor. Which indices
    are drawn is private information, and so is the generator's state: ``state_dict()`` holds
    only the number of steps already yielded (a resumed sampler continues from there with
    fresh OS-entropy randomness, which is as private as the original).
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        steps: int,
        max_physical_batch_size: int,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not isinstance(num_examples, int) or num_examples < 0:
            raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be an int >= 1, got {max_physical_batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.num_examples = num_examples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.max_physical_batch_size = max_physical_batch_size
        self.rank = rank
        self.world_size = world_size
        self.generator = generator if generator is not None else entropy_generator("cpu")
        self.local_indices = torch.arange(rank, num_examples, world_size, dtype=torch.int64)
        self.steps_done = 0

    def __len__(self) -> int:
        """Logical steps the next iteration yields (all of them, less those already done)."""
        return self.steps - self.steps_done

    def __iter__(self) -> Iterator[list[Tensor]]:
        while self.steps_done < self.steps:
            draws = torch.rand(self.local_indices.shape[0], generator=self.generator, dtype=torch.float64)
            batch = self.local_indices[draws < self.sample_rate]
            self.steps_done += 1  # counted before yielding: a checkpoint taken after this step resumes after it
            if batch.numel() == 0:
                yield [batch]
            else:
                yield list(torch.split(batch, self.max_physical_batch_size))

    def state_dict(self) -> dict:
        return {
            "steps_done": self.steps_done,
            "num_examples": self.num_examples,
            "sample_rate": self.sample_rate,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_examples", "sample_rate", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler has {getattr(self, key)!r}")
        if "steps_done" not in state:
            raise KeyError("sampler state lacks 'steps_done'")
        if not 0 <= state["steps_done"] <= self.steps:
            raise ValueError(f"sampler state has steps_done={state['steps_done']}, outside [0, {self.steps}]")
        self.steps_done = int(state["steps_done"])
