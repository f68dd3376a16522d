"""Triton kernels and torch references of ``kernels`` against brute-force per-example math.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched
on before Triton is first imported (hence the environment line above the imports). On a
GPU machine the same tests run compiled kernels on CUDA tensors.
"""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from scipy.stats import chi2  # noqa: E402

import kernels  # noqa: E402
from kernels import reference, triton_clipped_grad, triton_flat, triton_norms  # noqa: E402
from kernels.backend import resolve_backend  # noqa: E402
from kernels.seeds import derive_seed  # noqa: E402

BACKENDS = ["triton", "torch"]
HALF = [torch.bfloat16, torch.float16]
# (B, T, d_in, d_out): none a multiple of the block sizes; T = 1 is passed as 2-D tensors
SHAPES = [(3, 19, 37, 45), (4, 1, 70, 33), (2, 40, 20, 130)]
TAIL = 1e-6  # two-sided tail probability of the statistical checks


def make_inputs(B, T, d_in, d_out, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape_a, shape_g = ((B, d_in), (B, d_out)) if T == 1 else ((B, T, d_in), (B, T, d_out))
    a = torch.randn(shape_a, generator=gen).to(device=DEVICE, dtype=dtype)
    g = torch.randn(shape_g, generator=gen).to(device=DEVICE, dtype=dtype)
    return a, g


def per_example_grads(a, g):
    """Brute force in float64: (weight grads [B, d_out, d_in], bias grads [B, d_out])."""
    a64, g64 = reference.as_sequence(a).double(), reference.as_sequence(g).double()
    return torch.einsum("bto,bti->boi", g64, a64), g64.sum(dim=1)


def max_rel_error(x, exact):
    return ((x.double() - exact).abs().max() / exact.abs().max()).item()


def clip_factors(B, seed=1):
    c = torch.rand(B, generator=torch.Generator().manual_seed(seed))
    c[0] = 0.0
    c[1 % B] = 1.0
    return c.to(DEVICE)


# ---------------------------------------------------------------- per-example norms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ghost", "instantiate", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_sqnorms_match_brute_force(backend, method, shape, bias):
    a, g = make_inputs(*shape)
    gw, gb = per_example_grads(a, g)
    exact = gw.pow(2).sum(dim=(1, 2)) + (gb.pow(2).sum(dim=1) if bias else 0)
    got = kernels.per_sample_linear_sqnorms(a, g, method=method, bias=bias, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    assert ((got.double() - exact).abs() / exact).max() <= 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_sqnorms_with_many_small_tiles(bias):
    a, g = make_inputs(2, 37, 35, 50)
    gw, gb = per_example_grads(a, g)
    exact = gw.pow(2).sum(dim=(1, 2)) + (gb.pow(2).sum(dim=1) if bias else 0)
    inst = triton_norms.instantiate_sqnorms(a, g, bias, block_out=16, block_in=16, block_t=16)
    ghost = triton_norms.ghost_sqnorms(a, g, bias, block_t=16, block_d=16)
    for got in (inst, ghost):
        assert ((got.double() - exact).abs() / exact).max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("dtype", HALF)
def test_sqnorms_half_inputs_match_float32_of_rounded_inputs(backend, method, dtype):
    a, g = make_inputs(3, 19, 37, 45, dtype=dtype)
    gw, gb = per_example_grads(a.float(), g.float())
    exact = gw.pow(2).sum(dim=(1, 2)) + gb.pow(2).sum(dim=1)
    got = kernels.per_sample_linear_sqnorms(a, g, method=method, bias=True, backend=backend)
    assert ((got.double() - exact).abs() / exact).max() <= 1e-5


def test_auto_method_follows_the_cost_rule():
    assert reference.ghost_is_cheaper(T=16, d_in=32, d_out=16)  # 512 <= 512
    assert not reference.ghost_is_cheaper(T=17, d_in=32, d_out=16)


def test_sqnorms_of_an_empty_batch():
    a, g = make_inputs(0, 5, 8, 9)
    for backend in BACKENDS:
        assert kernels.per_sample_linear_sqnorms(a, g, backend=backend).shape == (0,)


# ---------------------------------------------------------------- clipped sum


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_clipped_grad_matches_brute_force(backend, shape, bias):
    a, g = make_inputs(*shape)
    c = clip_factors(shape[0])
    gw, gb = per_example_grads(a, g)
    c64 = c.double()
    grad_w, grad_b = kernels.clipped_linear_grad(a, g, c, bias=bias, backend=backend)
    assert grad_w.dtype == torch.float32 and grad_w.shape == (shape[3], shape[2])
    assert max_rel_error(grad_w, torch.einsum("b,boi->oi", c64, gw)) <= 1e-5
    if bias:
        assert max_rel_error(grad_b, c64 @ gb) <= 1e-5
    else:
        assert grad_b is None


@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipped_grad_fold_modes_and_splits(per_example, splits, dtype):
    a, g = make_inputs(4, 21, 40, 36, dtype=dtype)
    c = clip_factors(4)
    gw, gb = per_example_grads(a.float(), g.float())
    grad_w, grad_b = triton_clipped_grad.clipped_grad(
        a, g, c, 0.0, 0, True, per_example=per_example, splits=splits, block_out=16, block_in=32, block_k=16
    )
    assert max_rel_error(grad_w, torch.einsum("b,boi->oi", c.double(), gw)) <= 1e-5
    assert max_rel_error(grad_b, c.double() @ gb) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("T", [1, 19])
def test_clipped_grad_half_inputs_match_float32_of_rounded_inputs(backend, dtype, T):
    a, g = make_inputs(3, T, 37, 45, dtype=dtype)
    c = clip_factors(3)
    gw, gb = per_example_grads(a.float(), g.float())
    grad_w, grad_b = kernels.clipped_linear_grad(a, g, c, bias=True, backend=backend)
    assert max_rel_error(grad_w, torch.einsum("b,boi->oi", c.double(), gw)) <= 1e-5
    assert max_rel_error(grad_b, c.double() @ gb) <= 1e-5


def test_clipped_grad_mixed_dtypes():
    a, _ = make_inputs(2, 18, 24, 20, dtype=torch.float32)
    _, g = make_inputs(2, 18, 24, 20, dtype=torch.bfloat16)
    c = clip_factors(2)
    gw, _ = per_example_grads(a, g.float())
    grad_w, _ = kernels.clipped_linear_grad(a, g, c, backend="triton")
    assert max_rel_error(grad_w, torch.einsum("b,boi->oi", c.double(), gw)) <= 1e-5


# ---------------------------------------------------------------- noise


def noise_of(backend, seed, noise_std=0.7, B=3, T=5, d_in=80, d_out=64):
    """The noise the clipped sum adds: noisy minus noiseless result, weight and bias flattened."""
    a, g = make_inputs(B, T, d_in, d_out)
    c = clip_factors(B)
    clean_w, clean_b = kernels.clipped_linear_grad(a, g, c, bias=True, backend=backend)
    noisy_w, noisy_b = kernels.clipped_linear_grad(a, g, c, noise_std, seed=seed, bias=True, backend=backend)
    return torch.cat([(noisy_w - clean_w).flatten(), noisy_b - clean_b]).double().cpu()


def assert_standard_normal(z):
    n = z.numel()
    assert abs(z.mean().item()) <= 5 / n**0.5
    sum_sq = z.pow(2).sum().item()
    assert chi2.ppf(TAIL / 2, n) <= sum_sq <= chi2.ppf(1 - TAIL / 2, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_grad_noise_statistics_and_seeds(backend):
    noise_std = 0.7
    first = noise_of(backend, seed=123, noise_std=noise_std)
    z = first / noise_std
    assert_standard_normal(z)
    again = noise_of(backend, seed=123, noise_std=noise_std)
    torch.testing.assert_close(again, first, rtol=0, atol=1e-4)
    other = noise_of(backend, seed=124, noise_std=noise_std) / noise_std
    assert_standard_normal(other)
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) <= 5 / z.numel() ** 0.5
    fresh = noise_of(backend, seed=None, noise_std=noise_std)  # OS entropy: differs call to call
    assert not torch.allclose(fresh, noise_of(backend, seed=None, noise_std=noise_std))


def test_clipped_grad_noise_is_added_once_whatever_the_split():
    a, g = make_inputs(4, 21, 40, 36)
    c = clip_factors(4)
    runs = {}
    for splits in (1, 3):
        clean = triton_clipped_grad.clipped_grad(a, g, c, 0.0, 0, True, splits=splits, block_out=16, block_in=32)
        noisy = triton_clipped_grad.clipped_grad(a, g, c, 1.5, 99, True, splits=splits, block_out=16, block_in=32)
        runs[splits] = torch.cat([(noisy[0] - clean[0]).flatten(), noisy[1] - clean[1]])
    torch.testing.assert_close(runs[3], runs[1], rtol=0, atol=1e-4)
    assert_standard_normal(runs[1].double().cpu() / 1.5)


def test_noise_of_an_empty_batch():
    a, g = make_inputs(0, 5, 30, 40)
    for backend in BACKENDS:
        grad_w, grad_b = kernels.clipped_linear_grad(a, g, torch.ones(0), 2.0, seed=5, bias=True, backend=backend)
        z = torch.cat([grad_w.flatten(), grad_b]).double().cpu() / 2.0
        assert_standard_normal(z)
        # a coordinate reusing another's draw would repeat whole rows; float32 ties by chance are rare
        assert z.numel() - torch.unique(z).numel() <= 2


# ---------------------------------------------------------------- flat per-example gradients


def flat_inputs(B, P, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, P, generator=gen) * torch.logspace(-2, 1, B)[:, None] / P**0.5  # norms 0.01 .. 10
    return x.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flat_clip_sum_matches_brute_force(backend, dtype):
    x = flat_inputs(6, 5000, dtype)
    x64 = x.double()
    norms = x64.norm(dim=1)
    c = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    assert c.min() < 1 and c.max() == 1  # some rows clipped, some not
    summed, got_norms = kernels.clip_sum_noise_flat(x, 1.0, backend=backend)
    assert max_rel_error(got_norms, norms) <= 1e-5
    assert max_rel_error(summed, c @ x64) <= 1e-5


def test_flat_kernel_with_several_chunks_matches_reference():
    x = flat_inputs(5, 3001)
    summed, norms = triton_flat.clip_sum_noise(x, 0.5, 0.0, 0, block_p=256, chunks=4)
    ref_summed, ref_norms = reference.clip_sum_noise_flat(x, 0.5)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(summed, ref_summed, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_noise_statistics_and_seeds(backend):
    x = flat_inputs(4, 6000)
    clean, _ = kernels.clip_sum_noise_flat(x, 1.0, backend=backend)
    noisy, _ = kernels.clip_sum_noise_flat(x, 1.0, noise_std=2.0, seed=7, backend=backend)
    again, _ = kernels.clip_sum_noise_flat(x, 1.0, noise_std=2.0, seed=7, backend=backend)
    other, _ = kernels.clip_sum_noise_flat(x, 1.0, noise_std=2.0, seed=8, backend=backend)
    z = ((noisy - clean) / 2.0).double().cpu()
    z_other = ((other - clean) / 2.0).double().cpu()
    assert_standard_normal(z)
    assert torch.equal(noisy, again)
    assert abs(torch.corrcoef(torch.stack([z, z_other]))[0, 1].item()) <= 5 / z.numel() ** 0.5


def test_flat_empty_batch_is_pure_noise():
    x = flat_inputs(0, 4000)
    for backend in BACKENDS:
        summed, norms = kernels.clip_sum_noise_flat(x, 1.0, noise_std=3.0, seed=1, backend=backend)
        assert norms.shape == (0,)
        assert_standard_normal(summed.double().cpu() / 3.0)


# ---------------------------------------------------------------- backends, seeds, errors


def test_auto_backend_is_triton_on_cuda_only():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("triton", torch.device(DEVICE)) == "triton"  # interpreter on CPU


def test_bad_arguments_are_named():
    a, g = make_inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match="backend"):
        kernels.per_sample_linear_sqnorms(a, g, backend="cuda")
    with pytest.raises(ValueError, match="method"):
        kernels.per_sample_linear_sqnorms(a, g, method="fast")
    with pytest.raises(ValueError, match="grad_outputs"):
        kernels.per_sample_linear_sqnorms(a, g[:, :2])
    with pytest.raises(TypeError, match="activations"):
        kernels.per_sample_linear_sqnorms(a.double(), g)
    with pytest.raises(ValueError, match="clip_factors"):
        kernels.clipped_linear_grad(a, g, torch.ones(3))
    with pytest.raises(ValueError, match="noise_std"):
        kernels.clipped_linear_grad(a, g, torch.ones(2), noise_std=-1.0)
    with pytest.raises(ValueError, match="seed"):
        kernels.clipped_linear_grad(a, g, torch.ones(2), noise_std=1.0, seed=-3)
    with pytest.raises(ValueError, match="max_grad_norm"):
        kernels.clip_sum_noise_flat(a[:, 0], 0.0)


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(42, 3, 0) == derive_seed(42, 3, 0)
    seeds = {derive_seed(base, step, shard) for base in (1, 2) for step in range(50) for shard in range(4)}
    assert len(seeds) == 2 * 50 * 4
    assert all(0 <= s < 2**63 for s in seeds)
