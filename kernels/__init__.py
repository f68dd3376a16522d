"""Fused DP kernels (Triton) and their plain-torch references (``kernels.reference``)."""
from __future__ import annotations

import torch
from torch import Tensor

from kernels import reference


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch' (Triton is not wired in yet), got {backend!r}")


def per_sample_linear_sqnorms(
    activations: Tensor, grad_outputs: Tensor, method: str = "auto", bias: bool = False, backend: str = "auto"
) -> Tensor:
    _check_backend(backend)
    return reference.per_sample_linear_sqnorms(activations, grad_outputs, method=method, bias=bias)


def clipped_linear_grad(
    activations: Tensor, grad_outputs: Tensor, clip_factors: Tensor, noise_std: float = 0.0,
    seed: int | None = None, bias: bool = False, backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    _check_backend(backend)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=activations.device).manual_seed(seed)
    return reference.clipped_linear_grad(activations, grad_outputs, clip_factors, noise_std, gen, bias)


def clip_sum_noise_flat(
    per_example_grads: Tensor, max_grad_norm: float, noise_std: float = 0.0, seed: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    _check_backend(backend)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=per_example_grads.device).manual_seed(seed)
    return reference.clip_sum_noise_flat(per_example_grads, max_grad_norm, noise_std, gen)


__all__ = ["per_sample_linear_sqnorms", "clipped_linear_grad", "clip_sum_noise_flat"]
