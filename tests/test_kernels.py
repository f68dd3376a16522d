"""Triton kernels and torch references of ``trainer.kernels`` against brute-force per-example math.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched
on before Triton is first imported (hence the environment line above the imports). On a
GPU machine the same tests run compiled kernels on CUDA tensors.
"""
import importlib.util
import os
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from trainer import kernels  # noqa: E402
from trainer.kernels import reference, triton_clipped_grad, triton_norms  # noqa: E402
from trainer.kernels.backend import resolve_backend  # noqa: E402

BACKENDS = ["triton", "torch"]
HALF = [torch.bfloat16, torch.float16]
# (B, T, d_in, d_out): none a multiple of the block sizes; T = 1 is passed as 2-D tensors
SHAPES = [(3, 19, 37, 45), (4, 1, 70, 33), (2, 40, 20, 130)]


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
        a, g, c, True, per_example=per_example, splits=splits, block_out=16, block_in=32, block_k=16
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


def test_clipped_grad_of_an_empty_batch_is_zero():
    a, g = make_inputs(0, 5, 30, 40)
    for backend in BACKENDS:
        grad_w, grad_b = kernels.clipped_linear_grad(a, g, torch.ones(0), bias=True, backend=backend)
        assert grad_w.shape == (40, 30) and grad_b.shape == (40,)
        assert not grad_w.any() and not grad_b.any()


# ---------------------------------------------------------------- backends, errors


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



def test_the_project_does_not_shadow_the_kernels_distribution():
    """A top-level ``kernels`` package here hides HuggingFace's, which transformers >= 5.25 imports."""
    spec = importlib.util.find_spec("kernels")
    repo = Path(__file__).resolve().parents[1]
    assert spec is None or Path(spec.origin).resolve().parents[1] != repo, spec.origin
