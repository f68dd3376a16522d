"""DPGradientEngine against a brute-force loop: one example at a time, flatten, clip, sum."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.privacy import DPGradientEngine

VOCAB, D, CH, H = 11, 8, 4, 4


class CrossAttention(nn.Module):
    """q from x, k/v from a context, through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, ctx_dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, t.shape[1], self.heads, t.shape[2] // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).flatten(2))


class PositionScale(nn.Module):
    """A bare nn.Parameter used in a module's forward (fallback rule)."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(tokens, dim) * 0.5 + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class TinyNet(nn.Module):
    """Conv3x3 -> GroupNorm -> conv1x1 -> frozen Linear (+inplace ReLU) -> LayerNorm -> cross-attention
    on an embedded context -> MLP with an in-place ReLU, called twice -> fallback param -> LayerNorm again (called
    twice) -> head tied to the embedding (a parameter shared by two modules)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D, padding_idx=0)
        self.conv3 = nn.Conv2d(1, CH, 3, padding=1)
        self.gn = nn.GroupNorm(2, CH)
        self.conv1 = nn.Conv2d(CH, D, 1)
        self.frozen = nn.Linear(D, D)
        self.act = nn.ReLU(inplace=True)
        self.ln = nn.LayerNorm(D)
        self.attn = CrossAttention(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(inplace=True), nn.Linear(2 * D, D))
        self.pos = PositionScale(H * H, D)
        self.head = nn.Linear(D, VOCAB)
        self.head.weight = self.embed.weight
        self.frozen.requires_grad_(False)
        self.attn.to_out.bias.requires_grad_(False)  # trainable weight, frozen bias in one module

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.gn(self.conv3(image))))  # [B, D, H, W]
        h = self.act(self.frozen(h.flatten(2).transpose(1, 2)))  # [B, HW, D]
        h = h + self.attn(self.ln(h), self.embed(tokens))
        for _ in range(2):  # the MLP is called twice; in-place ReLU on the output (a view) of a trainable Linear
            h = h + self.mlp(h)
        h = self.ln(self.pos(h))
        return self.head(h.mean(dim=1))  # [B, VOCAB]


def per_example_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    image, tokens, target = batch
    return F.cross_entropy(model(image, tokens), target, reduction="none") * 3.0


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 1, H, H, generator=g) * torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)
    tokens = torch.randint(0, VOCAB, (n, 5), generator=g)
    tokens[0, :2] = 0  # padding positions
    tokens[1, :] = 3  # one token repeated: rows grouped by id
    target = torch.randint(0, VOCAB, (n,), generator=g)
    return image, tokens, target


def brute_force(model: nn.Module, data: tuple[torch.Tensor, ...], C: float, expected: float):
    """Per-example backward one at a time; returns (summed clipped grad / expected per param, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flats = []
    for i in range(data[0].shape[0]):
        grads = torch.autograd.grad(
            per_example_loss(model, tuple(t[i : i + 1] for t in data)).sum(), params, allow_unused=True
        )
        flats.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    flat = torch.stack(flats).double()
    norms = flat.norm(dim=1)
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    total = (c[:, None] * flat).sum(0) / expected
    out, offset = [], 0
    for p in params:
        out.append(total[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out, norms


def run_engine(model, data, C, sigma, expected, mode, splits, generator=None):
    engine = DPGradientEngine(model, C, sigma, expected, mode=mode, generator=generator)
    norms, start = [], 0
    for size in splits:
        idx = slice(start, start + size)
        start += size
        engine.accumulate(per_example_loss(model, tuple(t[idx] for t in data)))
        assert engine.last_per_sample_norms.shape == (size,)
        norms.append(engine.last_per_sample_norms)
        assert all(p.grad is None for p in model.parameters()), "accumulate must not write .grad"
    stats = engine.finalize()
    engine.detach()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], torch.cat(norms), stats


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_engine_matches_brute_force(mode):
    torch.manual_seed(0)
    model = TinyNet()
    data = make_data(8)
    _, ref_norms = brute_force(model, data, C=1.0, expected=1.0)
    C = float(ref_norms.sort().values[3:5].mean())  # half the examples clipped, half not
    expected = 6.5
    ref_grads, _ = brute_force(model, data, C, expected)
    grads, norms, stats = run_engine(model, data, C, 0.0, expected, mode, splits=[3, 0, 4, 1])
    assert 0 < (ref_norms > C).sum() < len(ref_norms)
    assert rel_err(norms, ref_norms) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5
    assert stats["nonprivate_batch_size"] == 8
    assert stats["nonprivate_clip_fraction"] == 0.5
    assert stats["nonprivate_mean_grad_norm"] == pytest.approx(float(ref_norms.mean()), rel=1e-5)
    # frozen params never get a gradient
    assert model.frozen.weight.grad is None and model.attn.to_out.bias.grad is None


def test_fast_covers_every_rule():
    """The fast engine routes each module to the intended rule (so the test above exercises them)."""
    from trainer.privacy.layer_rules import (
        ConvRule, EmbeddingRule, FunctionalRule, GroupNormRule, LayerNormRule, LinearRule,
    )

    model = TinyNet()
    engine = DPGradientEngine(model, 1.0, 1.0, 4.0)
    kinds = {rule.name: type(rule) for rule in engine._rules}
    engine.detach()
    assert kinds == {
        "embed": EmbeddingRule, "conv3": ConvRule, "gn": GroupNormRule, "conv1": LinearRule,
        "ln": LayerNormRule, "attn.to_q": LinearRule, "attn.to_k": LinearRule, "attn.to_v": LinearRule,
        "attn.to_out": LinearRule, "mlp.0": LinearRule, "mlp.2": LinearRule, "pos": FunctionalRule,
        "head": LinearRule,
    }


CONVS = {
    "3x3 stride 2": lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
    "5x3 dilated, asymmetric padding": lambda: nn.Conv2d(3, 4, (5, 3), dilation=(2, 1), padding=(3, 0)),
    "2x2 'same' (asymmetric)": lambda: nn.Conv2d(3, 4, 2, padding="same", bias=False),
    "3x3 reflect": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "3x3 circular": lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="circular"),
    "1x1 padded": lambda: nn.Conv2d(3, 4, 1, padding=1),
    "conv1d 4 stride 3": lambda: nn.Conv1d(3, 4, 4, stride=3, padding=2),
    "conv1d 'same' replicate": lambda: nn.Conv1d(3, 4, 3, padding="same", padding_mode="replicate"),
}


@pytest.mark.parametrize("which", list(CONVS))
def test_conv_rule_matches_brute_force(which):
    """Convolutions of any kernel, stride, dilation and padding: norms and clipped sums by unfolded
    patches, against per-example autograd; the same conv called twice per example."""
    from trainer.privacy.layer_rules import ConvRule

    torch.manual_seed(2)
    conv = CONVS[which]()
    spatial = (7, 6) if isinstance(conv, nn.Conv2d) else (11,)
    model = nn.Sequential(conv, nn.SiLU())
    x = torch.randn(6, 3, *spatial) * torch.linspace(0.1, 3.0, 6).view(6, *([1] * (1 + len(spatial))))

    def losses(inputs: torch.Tensor) -> torch.Tensor:
        h = model(inputs)
        return (h.pow(2).flatten(1).sum(1) + model(inputs.flip(-1)).flatten(1).sum(1)) * 0.1

    params = [p for p in model.parameters()]
    flat = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(losses(x[i : i + 1]).sum(), params)
        flat.append(torch.cat([g.reshape(-1) for g in grads]))
    flat = torch.stack(flat).double()
    ref_norms = flat.norm(dim=1)
    C = float(ref_norms.median())
    ref_sum = ((C / (ref_norms + 1e-6)).clamp(max=1.0)[:, None] * flat).sum(0) / 4.0

    engine = DPGradientEngine(model, C, 0.0, 4.0, mode="fast")
    assert [type(r) for r in engine._rules] == [ConvRule]
    engine.accumulate(losses(x[:4]))
    norms = [engine.last_per_sample_norms]
    engine.accumulate(losses(x[4:]))
    norms.append(engine.last_per_sample_norms)
    engine.finalize()
    engine.detach()
    assert rel_err(torch.cat(norms), ref_norms) < 1e-5
    assert rel_err(torch.cat([p.grad.reshape(-1) for p in params]), ref_sum) < 1e-5


def test_grouped_conv_falls_back_to_exact_per_example_grads():
    from trainer.privacy.layer_rules import FunctionalRule

    model = nn.Conv2d(4, 4, 3, groups=2)
    engine = DPGradientEngine(model, 1.0, 0.0, 2.0)
    assert [type(r) for r in engine._rules] == [FunctionalRule]
    engine.detach()


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_multihead_attention_absorbs_out_proj():
    """nn.MultiheadAttention uses out_proj's weight without calling out_proj: one rule covers both."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(5, 3, 6)

    def losses():
        h = model(x)
        return mha(h, h, h, need_weights=False)[0].pow(2).sum(dim=(1, 2))

    full = nn.ModuleDict({"mlp": model, "mha": mha})
    engine = DPGradientEngine(full, 0.5, 0.0, 5.0, mode="fast")
    engine.accumulate(losses())
    engine.finalize()
    fast = [p.grad.clone() for p in full.parameters()]
    full.zero_grad(set_to_none=True)
    engine.detach()
    ref_engine = DPGradientEngine(full, 0.5, 0.0, 5.0, mode="reference")
    ref_engine.accumulate(losses())
    ref_engine.finalize()
    for g, p in zip(fast, full.parameters()):
        assert rel_err(g, p.grad) < 1e-5


def test_empty_step_and_mixed_dtype_grad():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).to(torch.float64)
    engine = DPGradientEngine(model, 1.0, 0.0, 2.0)
    engine.accumulate(torch.zeros(0))
    assert engine.last_per_sample_norms.shape == (0,)
    stats = engine.finalize()
    for p in model.parameters():
        assert p.grad.dtype == torch.float64 and torch.count_nonzero(p.grad) == 0
    assert stats["nonprivate_batch_size"] == 0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="BatchNorm1d"):
        DPGradientEngine(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        DPGradientEngine(nn.Linear(3, 3).requires_grad_(False), 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="mode"):
        DPGradientEngine(nn.Linear(3, 3), 1.0, 1.0, 2.0, mode="ghost")
    lin = nn.Linear(3, 2)
    engine = DPGradientEngine(lin, 1.0, 1.0, 2.0)
    x = torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match="batch-first"):  # batch flattened into the rows: cannot attribute
        engine.accumulate(lin(x.reshape(20, 3)).reshape(4, 10).sum(1))
    with pytest.raises(ValueError, match="1-D"):
        engine.accumulate(lin(x).sum(-1))
    engine.detach()
    lin(x)
    assert all(rule.num_calls == 0 for rule in engine._rules), "detach must remove the hooks"


def noisy_minus_noiseless(splits, sigma, C, expected, seed):
    """Gradient with noise minus the same gradient without noise, concatenated over params."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 30))
    data = torch.randn(sum(splits), 40)

    def grads(noise):
        engine = DPGradientEngine(model, C, noise, expected, generator=torch.Generator().manual_seed(seed))
        start = 0
        for size in splits:
            engine.accumulate(model(data[start : start + size]).pow(2).sum(1))
            start += size
        engine.finalize()
        engine.detach()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    return grads(sigma) - grads(0.0)


@pytest.mark.parametrize("splits", [[6], [2, 0, 3, 1]])
def test_noise_once_per_step_with_calibrated_std(splits):
    sigma, C, expected = 1.7, 0.3, 4.0
    noise = noisy_minus_noiseless(splits, sigma, C, expected, seed=11).double()
    n = noise.numel()  # 3530 coordinates
    s = sigma * C / expected
    chi2 = float((noise / s).pow(2).sum())
    assert abs(chi2 - n) < 5 * (2 * n) ** 0.5  # chi-square(n): mean n, std sqrt(2n)
    assert abs(float(noise.mean())) < 5 * s / n**0.5


def test_finalize_without_noise_for_non_noising_ranks():
    model = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    grads = []
    for sigma in (0.0, 5.0):
        engine = DPGradientEngine(model, 0.1, sigma, 4.0)
        engine.accumulate(model(x).pow(2).sum(1))
        stats = engine.finalize(add_noise=False)
        engine.detach()
        assert stats["noise_std"] == 0.0
        grads.append(model.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_noise_generators():
    a = noisy_minus_noiseless([3], 1.0, 1.0, 2.0, seed=5)
    b = noisy_minus_noiseless([3], 1.0, 1.0, 2.0, seed=5)
    assert torch.equal(a, b), "a seeded generator gives reproducible noise"
    model = nn.Linear(20, 20)
    draws = []
    for _ in range(2):
        engine = DPGradientEngine(model, 1.0, 1.0, 1.0)  # generator from OS entropy
        engine.finalize()
        engine.detach()
        draws.append(model.weight.grad.clone())
    assert not torch.equal(draws[0], draws[1])


def test_bf16_autocast_against_the_fp32_brute_force():
    """precision: bf16 — the forward/backward run under bf16 autocast, while norms, clip factors and sums stay
    float32 (the grads the engine writes are float32). Tolerance: bf16 keeps 8 mantissa bits (relative rounding
    2^-9 ~ 2e-3 per operation); through this net's ~10 layers the per-example norms move by ~1.4% and the
    clipped sum by a few %, so 5e-2 (norms 3e-2) against the fp32 brute force. Privacy does not rest on this
    tolerance: each example is clipped by the norm of exactly the gradient that is summed, checked below."""
    torch.manual_seed(0)
    model = TinyNet()
    data = make_data(8)
    C, expected = 0.5, 8.0
    ref, ref_norms = brute_force(model, data, C=C, expected=expected)
    engine = DPGradientEngine(model, C, 0.0, expected, mode="fast", self_check_rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = per_example_loss(model, data)
    assert losses.dtype == torch.float32 or losses.dtype == torch.bfloat16
    engine.accumulate(losses)
    norms = engine.last_per_sample_norms.clone()
    engine.finalize()
    engine.detach()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g.dtype == torch.float32 for g in got)
    assert float(((norms.double() - ref_norms).abs() / ref_norms).max()) < 3e-2
    flat_got = torch.cat([g.reshape(-1) for g in got])
    flat_ref = torch.cat([r.reshape(-1) for r in ref])
    assert rel_err(flat_got, flat_ref) < 5e-2
    for p in model.parameters():
        p.grad = None

    # sensitivity under bf16: one example at a time, its released contribution never exceeds C
    for i in range(8):
        engine = DPGradientEngine(model, C, 0.0, 1.0, mode="fast", self_check=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            engine.accumulate(per_example_loss(model, tuple(t[i:i + 1] for t in data)))
        engine.finalize()
        engine.detach()
        total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.requires_grad))
        assert float(total) <= C * (1 + 1e-5)
        for p in model.parameters():
            p.grad = None


def test_bf16_self_check_tolerance_passes_bf16_and_still_catches_a_mixing_model():
    from trainer.privacy import EngineSelfCheckError
    from trainer.privacy.engine import SELF_CHECK_RTOL_BF16
    torch.manual_seed(0)
    model = TinyNet()
    data = make_data(6)

    def loss_fn(rows):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return per_example_loss(model, tuple(t[rows] for t in data))

    engine = DPGradientEngine(model, 1.0, 0.0, 6.0, self_check_rtol=SELF_CHECK_RTOL_BF16)
    engine.check(loss_fn, 6)  # bf16 rounding alone passes
    engine.detach()

    def mixing(rows):  # every example's loss also depends on the batch mean: examples interact
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image, tokens, target = (t[rows] for t in data)
            image = image + image.mean(dim=0, keepdim=True)
            return per_example_loss(model, (image, tokens, target))

    engine = DPGradientEngine(model, 1.0, 0.0, 6.0, self_check_rtol=SELF_CHECK_RTOL_BF16)
    with pytest.raises(EngineSelfCheckError):
        engine.check(mixing, 6)


def test_bf16_self_check_judges_a_cancelling_sum_by_its_terms_and_still_catches_a_tied_weight():
    """Pairs of nearly equal inputs whose losses enter with opposite signs: the weight's batch gradient is
    v (x - x')^T, a tiny remainder of terms ~|v||x|. Under bf16 autocast autograd forms it from bf16(x) and
    bf16(x'), which are equal or one rounding step apart, the engine from the float32 inputs: the two differ
    by ~100 % of the remainder but by far less than bf16 rounding of the terms, and a sound Linear passes.
    A weight also used outside its module is still refused at the same tolerance."""
    from trainer.privacy import EngineSelfCheckError
    from trainer.privacy.engine import SELF_CHECK_RTOL_BF16
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    inputs = torch.stack([x, x + 1e-4 * torch.randn(3, 8)], dim=1).reshape(6, 8)  # (x, x') pairs
    signs = torch.tensor([1.0, -1.0]).repeat(3)
    v = torch.randn(4)

    def cancelling(rows):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return signs[rows] * (lin(inputs[rows]).float() @ v)

    engine = DPGradientEngine(lin, 1.0, 0.0, 6.0, self_check_rtol=SELF_CHECK_RTOL_BF16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = signs * (lin(inputs).float() @ v)
    ref = torch.autograd.grad(losses.sum(), lin.weight)[0]
    exact = torch.einsum("o,bi->oi", v, signs[:, None] * inputs)
    assert (ref - exact).norm() > 0.1 * exact.norm(), "the remainder is below bf16's resolution: the case it tests"
    engine.check(cancelling, 6)
    engine.accumulate(cancelling(torch.arange(6)))  # the first private micro-batch: the same check, passes
    engine.detach()

    data = torch.randn(6, 8)

    def tied(rows):  # lin.weight also enters through F.linear outside lin: the engine cannot see that use
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(data[rows]) + torch.nn.functional.linear(data[rows], lin.weight)
            return h.float().pow(2).sum(dim=1)

    engine = DPGradientEngine(lin, 1.0, 0.0, 6.0, self_check_rtol=SELF_CHECK_RTOL_BF16)
    with pytest.raises(EngineSelfCheckError, match="weight"):
        engine.check(tied, 6)
