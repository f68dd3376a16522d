"""Fused DP kernels (Triton), each beside its plain-torch reference (``kernels.reference``).

Importing this package does not import Triton (see ``kernels.backend``).
"""
from kernels.api import clip_sum_noise_flat, clipped_linear_grad, per_sample_linear_sqnorms
from kernels.seeds import derive_seed, fresh_seed

__all__ = [
    "per_sample_linear_sqnorms",
    "clipped_linear_grad",
    "clip_sum_noise_flat",
    "derive_seed",
    "fresh_seed",
]
