"""Plain-torch references of the fused DP kernels.

Each function here is the specification of the Triton kernel of the same name in
this package: same arguments, same result (up to float rounding). They are also
the CPU implementation that the DP engine uses when Triton is not available.
Noise is drawn in float32 from a torch.Generator seeded with ``seed`` (a fresh seed
from OS entropy when None); the Triton kernels draw it with Philox from the same
seed, so the two backends give the same distribution, not the same numbers.

Shapes: activations A [B, T, d_in] (or [B, d_in], the T = 1 case), output
gradients G [B, T, d_out]. The weight gradient of example i is G_i^T A_i
[d_out, d_in]; its bias gradient is sum_t G_it [d_out]. All results are float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.seeds import check_seed


def as_sequence(x: Tensor) -> Tensor:
    """View [B, d] as [B, 1, d]; leave [B, T, d] alone."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"expected a [B, d] or [B, T, d] tensor, got shape {tuple(x.shape)}")
    return x


def noise_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A dedicated generator for DP noise on ``device`` (never the global one)."""
    return torch.Generator(device=device).manual_seed(check_seed(seed))


def ghost_is_cheaper(T: int, d_in: int, d_out: int) -> bool:
    """The cost rule: Gram matrices (T x T) beat instantiating G_i^T A_i when 2 T^2 <= d_in d_out."""
    return 2 * T * T <= d_in * d_out


def per_sample_linear_sqnorms(
    activations: Tensor, grad_outputs: Tensor, method: str = "auto", bias: bool = False
) -> Tensor:
    """||G_i^T A_i||_F^2 (+ ||sum_t G_it||^2 if bias) for each example i -> [B] float32."""
    A = as_sequence(activations).float()
    G = as_sequence(grad_outputs).float()
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(f"activations {tuple(A.shape)} and grad_outputs {tuple(G.shape)} disagree on [B, T]")
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    if method == "auto":
        method = "ghost" if ghost_is_cheaper(T, d_in, d_out) else "instantiate"
    if method == "ghost":
        # sum_{s,t} (A_s . A_t)(G_s . G_t): the Frobenius norm via T x T Gram matrices
        sq = (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum(dim=(1, 2))
    elif method == "instantiate":
        sq = torch.bmm(G.transpose(1, 2), A).pow(2).sum(dim=(1, 2))
    else:
        raise ValueError(f"method must be 'ghost', 'instantiate' or 'auto', got {method!r}")
    if bias:
        sq = sq + G.sum(dim=1).pow(2).sum(dim=1)
    return sq


def clipped_linear_grad(
    activations: Tensor,
    grad_outputs: Tensor,
    clip_factors: Tensor,
    noise_std: float = 0.0,
    seed: int | None = None,
    bias: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """sum_i c_i G_i^T A_i (+ noise_std * N(0, 1) per coordinate) as one GEMM, float32.

    Returns (grad_weight [d_out, d_in], grad_bias [d_out] or None); c_i = clip_factors[i].
    """
    A = as_sequence(activations).float()
    G = as_sequence(grad_outputs).float()
    c = clip_factors.float().to(G.device)
    Gc = G * c[:, None, None]
    d_out, d_in = G.shape[-1], A.shape[-1]
    grad_w = Gc.reshape(-1, d_out).t() @ A.reshape(-1, d_in)
    grad_b = Gc.sum(dim=(0, 1)) if bias else None
    if noise_std > 0:
        generator = noise_generator(seed, grad_w.device)
        grad_w = grad_w + noise_std * torch.randn(grad_w.shape, generator=generator, device=grad_w.device)
        if grad_b is not None:
            grad_b = grad_b + noise_std * torch.randn(grad_b.shape, generator=generator, device=grad_b.device)
    return grad_w, grad_b


def clip_sum_noise_flat(
    per_example_grads: Tensor,
    max_grad_norm: float,
    noise_std: float = 0.0,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Flat per-example gradients [B, P] -> (clipped sum + noise [P], norms [B]), float32.

    Clip factor c_i = min(1, C / (n_i + 1e-6)).
    """
    g = per_example_grads.float()
    norms = g.norm(dim=1)
    c = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    out = c @ g
    if noise_std > 0:
        generator = noise_generator(seed, out.device)
        out = out + noise_std * torch.randn(out.shape, generator=generator, device=out.device)
    return out, norms
