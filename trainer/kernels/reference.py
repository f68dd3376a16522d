"""Plain-torch references of the DP kernels.

Each function here is the specification of the Triton kernel of the same name in
this package: same arguments, same result (up to float rounding). They are also
the CPU implementation that the DP engine uses when Triton is not available.

Shapes: activations A [B, T, d_in] (or [B, d_in], the T = 1 case), output
gradients G [B, T, d_out]. The weight gradient of example i is G_i^T A_i
[d_out, d_in]; its bias gradient is sum_t G_it [d_out]. All results are float32.
"""
from __future__ import annotations

import torch
from torch import Tensor


def as_sequence(x: Tensor) -> Tensor:
    """View [B, d] as [B, 1, d]; leave [B, T, d] alone."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"expected a [B, d] or [B, T, d] tensor, got shape {tuple(x.shape)}")
    return x


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
    bias: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """sum_i c_i G_i^T A_i as one GEMM, float32.

    Returns (grad_weight [d_out, d_in], grad_bias [d_out] or None); c_i = clip_factors[i].
    """
    A = as_sequence(activations).float()
    G = as_sequence(grad_outputs).float()
    c = clip_factors.float().to(G.device)
    Gc = G * c[:, None, None]
    d_out, d_in = G.shape[-1], A.shape[-1]
    grad_w = Gc.reshape(-1, d_out).t() @ A.reshape(-1, d_in)
    grad_b = Gc.sum(dim=(0, 1)) if bias else None
    return grad_w, grad_b

