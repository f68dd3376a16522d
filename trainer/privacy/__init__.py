"""DP-SGD: per-example clipping and noise, Poisson sampling, privacy accounting.

Knows nothing about diffusion: the engine works for any ``nn.Module`` whose loss is
given per example.
"""
from trainer.privacy.accounting import (Mechanism, PrivacyBudgetExceeded, PrivacyLedger, calibrate_noise,
                                        composed_epsilon, epsilon, rdp_epsilon, signal_to_noise_bound)
from trainer.privacy.engine import DPGradientEngine, EngineSelfCheckError
from trainer.privacy.noise import entropy_generator, secure_standard_normal
from trainer.privacy.sampling import PoissonBatchSampler

__all__ = [
    "DPGradientEngine",
    "EngineSelfCheckError",
    "entropy_generator",
    "secure_standard_normal",
    "signal_to_noise_bound",
    "PoissonBatchSampler",
    "epsilon",
    "rdp_epsilon",
    "calibrate_noise",
    "Mechanism",
    "composed_epsilon",
    "PrivacyLedger",
    "PrivacyBudgetExceeded",
]
