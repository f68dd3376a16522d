"""PoissonBatchSampler: inclusion rate, empty steps, rank slices, micro-batch sizes, resuming."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.privacy import PoissonBatchSampler


def logical_batches(sampler: PoissonBatchSampler) -> list[torch.Tensor]:
    out = []
    for micro_batches in sampler:
        assert len(micro_batches) >= 1
        out.append(torch.cat(micro_batches))
    return out


def within(count: int, n: int, p: float, z: float = 5.0) -> bool:
    """|count - n p| within z binomial standard deviations."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_inclusion_frequency_matches_q():
    N, q, steps = 40, 0.3, 500
    sampler = PoissonBatchSampler(N, q, steps, max_physical_batch_size=7, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(N, dtype=torch.int64)
    for batch in logical_batches(sampler):
        assert batch.unique().numel() == batch.numel(), "an example appears twice in one logical batch"
        counts += torch.bincount(batch, minlength=N)
    assert all(within(int(c), steps, q) for c in counts)
    assert within(int(counts.sum()), steps * N, q)


def test_micro_batches_are_bounded_and_empty_steps_come_at_the_poisson_rate():
    N, q, steps, max_b = 20, 0.02, 3000, 3
    sampler = PoissonBatchSampler(N, q, steps, max_b, generator=torch.Generator().manual_seed(1))
    empty = 0
    for micro_batches in sampler:
        assert all(mb.numel() <= max_b and mb.dtype == torch.int64 for mb in micro_batches)
        if sum(mb.numel() for mb in micro_batches) == 0:
            assert len(micro_batches) == 1
            empty += 1
        else:
            assert all(mb.numel() > 0 for mb in micro_batches)
    assert within(empty, steps, (1 - q) ** N)


def test_large_batches_split_into_full_micro_batches():
    sampler = PoissonBatchSampler(10, 1.0, 1, 4, generator=torch.Generator().manual_seed(0))
    (micro_batches,) = list(sampler)
    assert [mb.numel() for mb in micro_batches] == [4, 4, 2]
    assert torch.equal(torch.cat(micro_batches), torch.arange(10))


def test_rank_slices_are_disjoint_and_cover_all_indices():
    N, W = 23, 3
    seen = []
    for rank in range(W):
        sampler = PoissonBatchSampler(N, 1.0, 2, 5, generator=torch.Generator().manual_seed(rank), rank=rank, world_size=W)
        indices = torch.cat(logical_batches(sampler)[:1])
        assert torch.all(indices % W == rank)
        seen.append(set(indices.tolist()))
    assert all(not (seen[a] & seen[b]) for a in range(W) for b in range(a + 1, W))
    assert set().union(*seen) == set(range(N))


def test_resume_continues_at_the_step_with_fresh_randomness_and_no_secret_state():
    def make(seed):
        return PoissonBatchSampler(50, 0.2, 10, 4, generator=torch.Generator().manual_seed(seed))

    full = logical_batches(make(7))
    first = make(7)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    flat = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert not flat and "generator_state" not in state, "the generator state would let a reader replay batches"
    resumed = make(999)
    resumed.load_state_dict(state)
    assert len(resumed) == 6
    rest = logical_batches(resumed)
    assert len(rest) == 6 and not all(torch.equal(a, b) for a, b in zip(rest, full[4:]))


def test_inclusion_draws_are_float64():
    """The mask is exactly ``U < q`` for float64 uniforms of the sampler's generator (float32 would round q)."""
    N, q = 100_000, 1.5 * 2.0**-24 * 1000  # not a multiple of 2^-24
    sampler = PoissonBatchSampler(N, q, 1, N, generator=torch.Generator().manual_seed(3))
    batch = torch.cat(next(iter(sampler)))
    u = torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(batch, torch.nonzero(u < q).flatten())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.2}, "sample_rate"),
        ({"max_physical_batch_size": 0}, "max_physical_batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"steps": -1}, "steps"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    args = {"num_examples": 10, "sample_rate": 0.5, "steps": 3, "max_physical_batch_size": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(**args)


def test_default_generators_differ():
    a = logical_batches(PoissonBatchSampler(200, 0.5, 3, 200))
    b = logical_batches(PoissonBatchSampler(200, 0.5, 3, 200))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))
