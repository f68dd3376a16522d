"""The fast engine is exact or refuses: the self-check, one engine per module, shared inputs, secure noise."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.privacy import DPGradientEngine, EngineSelfCheckError, secure_standard_normal

B, T, D, V = 5, 3, 4, 9


class SequenceFirstScale(nn.Module):
    """A user's module that takes a sequence-first [T, B, D] input and returns batch-first [B, T, D]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x_tbd: torch.Tensor) -> torch.Tensor:
        return (x_tbd * self.w).tanh().transpose(0, 1)


class SequenceFirstNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.mix = SequenceFirstScale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, D]
        return self.mix(self.inp(x).transpose(0, 1))


class TiedHead(nn.Module):
    """Output head tied to the embedding through F.linear: the weight is used outside its module."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(tokens).mean(dim=1))
        return F.linear(h, self.embed.weight)


class SharedInput(nn.Module):
    """A per-example input and one broadcast over the batch (leading dimension 1)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))
        self.v = nn.Parameter(torch.randn(D))

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w + shared * self.v)


def brute_force_clipped_sum(model: nn.Module, losses_of, n: int, C: float) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(n):
        grads = torch.autograd.grad(losses_of(slice(i, i + 1)).sum(), params)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        c = min(1.0, C / (float(norm) + 1e-6))
        total = [t + c * g.double() for t, g in zip(total, grads)]
    return total


@pytest.mark.parametrize("seq_len", [T, B])  # T != B (input taken as shared) and T == B (taken as per-example)
def test_sequence_first_input_is_refused_by_the_check_before_training(seq_len):
    torch.manual_seed(0)
    model = SequenceFirstNet()
    x = torch.randn(B, seq_len, D)
    engine = DPGradientEngine(model, 1.0, 0.0, float(B))
    with pytest.raises(EngineSelfCheckError, match="mixes examples"):
        engine.check(lambda rows: model(x[rows]).pow(2).sum(dim=(1, 2)), B)
    engine.finalize()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters()), "nothing was added before refusing"
    DPGradientEngine(model, 1.0, 0.0, float(B)).detach()  # the refused engine detached itself


def test_the_first_micro_batch_is_checked_too():
    """... and its refusal carries no value computed from the batch's gradients (a private batch's own)."""
    import re
    torch.manual_seed(0)
    model = SequenceFirstNet()
    engine = DPGradientEngine(model, 1.0, 0.0, float(B))
    with pytest.raises(EngineSelfCheckError, match="'mix'") as refused:
        engine.accumulate(model(torch.randn(B, T, D)).pow(2).sum(dim=(1, 2)))
    numbers = set(re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?%?", str(refused.value)))
    assert numbers <= {str(B), "0", "1", f"{engine.self_check_rtol:g}"}, str(refused.value)


def test_a_padding_micro_batch_does_not_use_up_the_check_of_the_first_private_one():
    """A rank with no example of its own first runs the public padding example with loss x 0:
    nothing to compare there, so the check waits for the rank's first real micro-batch."""
    torch.manual_seed(0)
    model = SequenceFirstNet()
    engine = DPGradientEngine(model, 1.0, 0.0, float(B))
    engine.accumulate(model(torch.randn(1, T, D)).pow(2).sum(dim=(1, 2)) * 0.0)
    with pytest.raises(EngineSelfCheckError, match="'mix'"):
        engine.accumulate(model(torch.randn(B, T, D)).pow(2).sum(dim=(1, 2)))


def test_removing_one_example_moves_the_clipped_sum_by_at_most_C_once_checked():
    """Why the check matters: without it the mixed 'per-example' gradients break the sensitivity bound."""
    torch.manual_seed(0)
    model = SequenceFirstNet()
    x = torch.randn(B, T, D) * 3

    def clipped_sum(rows: torch.Tensor, **kwargs) -> torch.Tensor:
        engine = DPGradientEngine(model, 1.0, 0.0, 1.0, **kwargs)
        engine.accumulate(model(x[rows]).pow(2).sum(dim=(1, 2)))
        engine.finalize()
        engine.detach()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    everyone, without_first = torch.arange(B), torch.arange(1, B)
    moved = float((clipped_sum(everyone, self_check=False) - clipped_sum(without_first, self_check=False)).norm())
    assert moved > 1.0 + 1e-3, "the unchecked fast path mixes examples (sensitivity above C)"
    with pytest.raises(EngineSelfCheckError):
        clipped_sum(everyone)
    exact = float((clipped_sum(everyone, mode="reference") - clipped_sum(without_first, mode="reference")).norm())
    assert exact <= 1.0 + 1e-5


def test_weight_used_outside_its_module_is_refused():
    torch.manual_seed(0)
    model = TiedHead()
    tokens = torch.randint(0, V, (B, T))
    target = torch.randint(0, V, (B,))
    engine = DPGradientEngine(model, 1.0, 0.0, float(B))
    with pytest.raises(EngineSelfCheckError, match=r"embed\.weight \(module 'embed'"):
        engine.check(lambda rows: F.cross_entropy(model(tokens[rows]), target[rows], reduction="none"), B)
    # the same model is exact in reference mode (batched autograd over every use of the weight)
    C = 0.5
    want = brute_force_clipped_sum(model, lambda s: F.cross_entropy(model(tokens[s]), target[s], reduction="none"),
                                   B, C)
    ref = DPGradientEngine(model, C, 0.0, 1.0, mode="reference")
    ref.accumulate(F.cross_entropy(model(tokens), target, reduction="none"))
    ref.finalize()
    ref.detach()
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad.double(), w, rtol=1e-5, atol=1e-7)


def test_a_second_engine_on_the_same_module_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    first = DPGradientEngine(model, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="already has a DPGradientEngine"):
        DPGradientEngine(model, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"\(Linear\) already has a DPGradientEngine"):
        DPGradientEngine(model[0], 1.0, 1.0, 2.0, mode="reference")
    first.detach()
    second = DPGradientEngine(model, 1.0, 0.0, 2.0)
    second.accumulate(model(torch.randn(3, 3)).sum(1))
    second.finalize()
    second.detach()


def test_input_broadcast_over_the_batch_is_shared_and_exact():
    torch.manual_seed(0)
    model = SharedInput()
    x, shared = torch.randn(B, T, D), torch.randn(1, T, D)

    def losses_of(s):
        return model(x[s], shared).pow(2).sum(dim=(1, 2))

    C = 0.7
    want = brute_force_clipped_sum(model, losses_of, B, C)
    engine = DPGradientEngine(model, C, 0.0, 1.0)
    engine.check(losses_of, B)  # passes: the broadcast input is shared, not per-example
    engine.accumulate(losses_of(slice(0, B)))
    engine.finalize()
    engine.detach()
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad.double(), w, rtol=1e-5, atol=1e-7)


class SharedTable(SharedInput):
    """A per-example input and a table of K rows shared by every example (the vmap fallback's rule)."""

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w + (table * self.v).sum(0))


@pytest.mark.parametrize("rows", [3, 1])
def test_a_shared_table_stays_shared_in_a_micro_batch_of_its_length(rows):
    """Poisson micro-batches vary in size: one of exactly K examples must not take the K-row table as
    per-example (each example would get one row: wrong norms, a clipped sum moving by more than C)."""
    torch.manual_seed(0)
    model, table, x = SharedTable(), torch.randn(rows, D) * 3, torch.randn(16, D) * 3

    def losses_of(s):
        return model(x[s], table).pow(2).sum(dim=1)

    C = 1.0
    engine = DPGradientEngine(model, C, 0.0, 1.0)
    engine.check(losses_of, B)  # a batch of B != K rows: the table shows itself shared
    batch = torch.arange(8, 8 + rows)  # then a micro-batch of exactly K examples
    engine.accumulate(losses_of(batch))
    engine.finalize()
    engine.detach()
    want = brute_force_clipped_sum(model, lambda s: losses_of(batch[s]), rows, C)
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad.double(), w, rtol=1e-5, atol=1e-7)


def test_a_shared_table_as_long_as_the_check_batch_is_refused():
    torch.manual_seed(0)
    model, table, x = SharedTable(), torch.randn(B, D) * 3, torch.randn(B, D) * 3
    engine = DPGradientEngine(model, 1.0, 0.0, 1.0)
    with pytest.raises(EngineSelfCheckError):
        engine.check(lambda s: model(x[s], table).pow(2).sum(dim=1), B)


@pytest.mark.parametrize("bug", ["ignores the factors", "swaps two examples' factors"])
def test_a_clipped_sum_that_misapplies_the_clip_factors_is_refused(monkeypatch, bug):
    """The check weights the examples as clipping does (distinct factors in (0, 1]): a kernel that sums
    the per-example gradients right but applies the factors wrong cannot pass it."""
    from trainer.privacy.layer_rules import LinearRule
    real = LinearRule.clipped_sums

    def clipped_sums(self, factors):
        wrong = torch.ones_like(factors) if bug == "ignores the factors" else factors[[1, 0, *range(2, len(factors))]]
        return real(self, wrong)

    monkeypatch.setattr(LinearRule, "clipped_sums", clipped_sums)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 1))
    x = torch.randn(B, D)
    engine = DPGradientEngine(model, 1.0, 0.0, 1.0)
    with pytest.raises(EngineSelfCheckError, match="weighted by clip factors do not sum to the batch gradient"):
        engine.check(lambda rows: model(x[rows]).squeeze(1), B)


def test_an_embedding_on_broadcast_ids_is_refused_before_anything_is_added():
    """BERT-style position ids [1, L] give an output gradient summed over the batch: not attributable."""
    emb, proj = nn.Embedding(V, D), nn.Linear(D, 1)
    model = nn.ModuleDict({"pos": emb, "proj": proj})
    x = torch.randn(B, T, D)
    engine = DPGradientEngine(model, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="'pos'"):
        engine.check(lambda rows: proj(x[rows] + emb(torch.arange(T)[None])).sum(dim=(1, 2)), B)
    engine.finalize()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    engine.detach()


def test_secure_gaussian_is_standard_normal_and_never_repeats():
    z = secure_standard_normal((400_000,)).double()
    assert z.dtype == torch.float64 and z.shape == (400_000,)
    n = z.numel()
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float(z.pow(4).mean()) - 3) < 5 * (96 / n) ** 0.5  # Var(z^4) = 105 - 9
    assert not torch.equal(secure_standard_normal((8,)), secure_standard_normal((8,)))


def test_the_default_generators_state_is_not_reachable_from_a_32_bit_seed():
    """mt19937's seeding fills its 624 words from the first by a fixed recurrence, and torch keeps 32 bits
    of a seed: a generator seeded so has one of 2^32 noise streams (searchable in hours). The engine's,
    the sampler's and the loss draws' generator takes all 624 words from OS entropy instead; its normals
    are standard and differ between generators."""
    import numpy as np

    from trainer.privacy import entropy_generator
    from trainer.privacy.engine import DPGradientEngine as Engine
    from trainer.privacy.sampling import PoissonBatchSampler

    def seeded_from_32_bits(generator: torch.Generator) -> bool:
        words = generator.get_state().numpy()[24:24 + 8 * 624].view(np.uint64)
        expected = int(words[0])
        for i in range(1, 624):
            expected = (1812433253 * (expected ^ (expected >> 30)) + i) & 0xFFFFFFFF
            if int(words[i]) != expected:
                return False
        return True
    assert seeded_from_32_bits(torch.Generator().manual_seed(2**62 + 12345))  # the check sees a seeded one
    fresh = [entropy_generator(), Engine(nn.Linear(2, 2), 1.0, 1.0, 4.0).generator,
             PoissonBatchSampler(100, 0.1, 3, 50).generator]
    assert not any(seeded_from_32_bits(g) for g in fresh)
    a, b = (torch.randn(200_000, generator=g).double() for g in fresh[:2])
    n = a.numel()
    assert abs(float(a.mean())) < 5 / n**0.5 and abs(float(a.var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / n**0.5


def test_secure_noise_in_the_engine_has_the_calibrated_std():
    torch.manual_seed(0)
    model = nn.Linear(60, 50)
    x = torch.randn(4, 60)
    sigma, C, expected = 1.3, 0.4, 3.0
    grads = []
    for noise in (sigma, 0.0):
        engine = DPGradientEngine(model, C, noise, expected, secure_noise=True)
        engine.accumulate(model(x).pow(2).sum(1))
        engine.finalize()
        engine.detach()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    noise = (grads[0] - grads[1]) / (sigma * C / expected)
    n = noise.numel()
    assert abs(float(noise.pow(2).sum()) - n) < 5 * (2 * n) ** 0.5


class Recorder:
    """An optimizer that keeps the ``.grad`` each step released."""

    def __init__(self, params):
        self.params, self.released = list(params), []

    def step(self):
        self.released.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_an_example_with_a_non_finite_gradient_is_left_out_of_the_step(mode):
    """A NaN or inf example would make the released step NaN (unbounded sensitivity): the step is
    accumulated again with the same draws, that example replaced by the padding row at weight 0,
    and equals the brute-force clipped sum of the others under their draws of the first pass."""
    from trainer.distributed import SingleProcess
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.GELU(), nn.Linear(8, 3))
    x = torch.cat([torch.randn(12, D) * 3, torch.zeros(1, D)])  # row 12: the public padding row
    x[2, 1] = float("nan")  # in the first micro-batch (the fast engine's first private check)
    x[9, 0] = float("inf")
    g = torch.Generator().manual_seed(5)

    def losses_of(rows):  # draws from g (as the diffusion loss) and from torch's default generator (as dropout)
        noise = 0.1 * torch.randn(len(rows), D, generator=g)
        return model(x[rows] + noise + 0.1 * torch.randn(len(rows), D)).pow(2).sum(dim=1)
    engine = DPGradientEngine(model, 1.0, 0.0, 6.0, mode=mode)
    recorder, rt = Recorder(model.parameters()), SingleProcess()
    rt.padding_row = 12
    torch.manual_seed(7)
    metrics = rt.train_step(engine, recorder, [torch.arange(0, 6), torch.arange(6, 12)], losses_of, g)
    assert metrics["nonfinite"] == 2 and metrics["batch_size"] == 10
    replay = torch.Generator().manual_seed(5)
    torch.manual_seed(7)
    drawn = x[:12] + torch.cat([0.1 * torch.randn(6, D, generator=replay) + 0.1 * torch.randn(6, D)
                                for _ in range(2)])  # the first pass's draws
    finite = torch.tensor([i for i in range(12) if i not in (2, 9)])
    expected = brute_force_clipped_sum(model, lambda s: model(drawn[finite][s]).pow(2).sum(dim=1), len(finite), 1.0)
    for got, want in zip(recorder.released[0], expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want / 6.0, rtol=1e-4, atol=1e-6)
    assert not engine._check_pending, "the first micro-batch was checked on the second pass"


def test_a_broken_model_is_refused_not_trained_on_noise():
    """NaN weights make every example and the public padding row non-finite: the step is refused."""
    from trainer.distributed import SingleProcess
    from trainer.errors import RunError
    model = nn.Sequential(nn.Linear(D, 3), nn.GELU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    engine = DPGradientEngine(model, 1.0, 1.0, 4.0, generator=torch.Generator().manual_seed(0))
    recorder, rt = Recorder(model.parameters()), SingleProcess()
    rt.padding_row = 4
    with pytest.raises(RunError, match="padding example's gradient is not finite: the model is broken"):
        rt.train_step(engine, recorder, [torch.arange(4)], lambda rows: model(torch.randn(len(rows), D)).sum(dim=1))
    assert recorder.released == [], "nothing released"
