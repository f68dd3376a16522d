"""Triton kernels of the DP engine, each beside its plain-torch reference (``trainer.kernels.reference``).

Importing this package does not import Triton (see ``trainer.kernels.backend``).
"""
from trainer.kernels.api import clipped_linear_grad, per_sample_linear_sqnorms

__all__ = ["per_sample_linear_sqnorms", "clipped_linear_grad"]
