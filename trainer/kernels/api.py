"""The public functions: validate the inputs, then run the Triton kernel or the torch reference.

``backend``: "triton" forces the kernels (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), "torch" the reference, "auto" Triton on CUDA and torch otherwise.
Inputs may be float32, float16 or bfloat16; every result is float32.
"""
from __future__ import annotations

from torch import Tensor

from trainer.kernels import reference
from trainer.kernels.backend import (
    check_clip_factors,
    check_linear_inputs,
    check_method,
    resolve_backend,
)
from trainer.kernels.reference import as_sequence, ghost_is_cheaper


def per_sample_linear_sqnorms(
    activations: Tensor, grad_outputs: Tensor, method: str = "auto", bias: bool = False, backend: str = "auto"
) -> Tensor:
    """Per-example squared gradient norms of a Linear layer -> [B] float32.

    activations A [B, T, d_in] and grad_outputs G [B, T, d_out] (or [B, d], the T = 1 case):
    ||G_i^T A_i||_F^2, plus ||sum_t G_it||^2 when ``bias``. ``method``: "ghost" (T x T Gram
    tiles), "instantiate" (d_out x d_in tiles) or "auto" (ghost when 2 T^2 <= d_in d_out).
    """
    check_linear_inputs(activations, grad_outputs)
    check_method(method)
    if resolve_backend(backend, activations.device) == "torch":
        return reference.per_sample_linear_sqnorms(activations, grad_outputs, method=method, bias=bias)
    from trainer.kernels import triton_norms

    a, g = as_sequence(activations), as_sequence(grad_outputs)
    if method == "auto":
        method = "ghost" if ghost_is_cheaper(a.shape[1], a.shape[2], g.shape[2]) else "instantiate"
    if method == "ghost":
        return triton_norms.ghost_sqnorms(a, g, bias)
    return triton_norms.instantiate_sqnorms(a, g, bias)


def clipped_linear_grad(
    activations: Tensor,
    grad_outputs: Tensor,
    clip_factors: Tensor,
    bias: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """(sum_i c_i G_i^T A_i [d_out, d_in], sum_i c_i sum_t G_it [d_out] or None), float32.

    clip_factors c [B]. No noise: the DP engine adds it once per coordinate per logical step
    (``DPGradientEngine.finalize``), after every micro-batch's clipped sum.
    """
    check_linear_inputs(activations, grad_outputs)
    check_clip_factors(clip_factors, activations.shape[0])
    if resolve_backend(backend, activations.device) == "torch":
        return reference.clipped_linear_grad(activations, grad_outputs, clip_factors, bias)
    from trainer.kernels import triton_clipped_grad

    return triton_clipped_grad.clipped_grad(as_sequence(activations), as_sequence(grad_outputs), clip_factors, bias)
