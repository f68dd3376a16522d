"""DP-SGD: per-example clipping and noise, Poisson sampling, privacy accounting.

Knows nothing about diffusion: the engine works for any ``nn.Module`` whose loss is
given per example.
"""
from trainer.privacy.accounting import PrivacyBudgetExceeded, PrivacyLedger, calibrate_noise, epsilon, rdp_epsilon
from trainer.privacy.engine import DPGradientEngine
from trainer.privacy.sampling import PoissonBatchSampler

__all__ = [
    "DPGradientEngine",
    "PoissonBatchSampler",
    "epsilon",
    "rdp_epsilon",
    "calibrate_noise",
    "PrivacyLedger",
    "PrivacyBudgetExceeded",
]
