"""The LDM noise schedule and the per-example epsilon-prediction loss.

A small pure object in the spirit of diffusers' schedulers: it holds the schedule and knows how
to noise a clean latent; it owns no model.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

# eps_model(x_t [B,C,H,W], t LongTensor[B], context [B,L,D] | None) -> predicted noise [B,C,H,W]
EpsModel = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


class NoiseSchedule:
    """LDM "linear" schedule: beta_t = (linspace(sqrt(b0), sqrt(b1), T))^2, t = 0..T-1."""

    def __init__(self, timesteps: int = 1000, linear_start: float = 0.0015, linear_end: float = 0.0195):
        if timesteps < 1 or not 0 < linear_start < linear_end < 1:
            raise ValueError(f"bad schedule: timesteps={timesteps}, linear_start={linear_start}, linear_end={linear_end}")
        self.timesteps = timesteps
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def per_example_loss(
    eps_model: EpsModel,
    x0: Tensor,
    context: Optional[Tensor],
    schedule: NoiseSchedule,
    generator: Optional[torch.Generator] = None,
    multiplicity: int = 1,
    t_range: Optional[tuple[int, int]] = None,
) -> Tensor:
    """Epsilon-prediction MSE per example -> [B], averaged over ``multiplicity`` (t, noise) draws.

    Each draw is its own forward pass over the batch, so a per-example gradient is still a
    function of one example only (the DP engine clips it as a whole). Averaging K draws before
    clipping lowers the variance of the gradient at no privacy cost. ``t_range`` = [lo, hi):
    draw t uniformly from lo..hi-1 only (default: every step of the schedule).
    """
    if multiplicity < 1:
        raise ValueError(f"multiplicity must be >= 1, got {multiplicity}")
    lo, hi = t_range if t_range is not None else (0, schedule.timesteps)
    if not 0 <= lo < hi <= schedule.timesteps:
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= {schedule.timesteps}, got {t_range}")
    B = x0.shape[0]
    total = x0.new_zeros(B)
    for _ in range(multiplicity):
        t = torch.randint(lo, hi, (B,), generator=generator, device="cpu").to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        pred = eps_model(schedule.q_sample(x0, t, noise), t, context)
        total = total + (pred - noise).pow(2).flatten(1).mean(dim=1)
    return total / multiplicity


def guided_eps(eps_model: EpsModel, context: Optional[Tensor], uncond_context: Optional[Tensor],
               guidance_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x_t, t) -> eps`` for the samplers: classifier-free guidance eps_u + s (eps_c - eps_u), both
    branches in one batch, when ``uncond_context`` is given and s != 1; else the conditional eps."""
    if uncond_context is None or guidance_scale == 1.0:
        return lambda x, t: eps_model(x, t, context)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        e_u, e_c = eps_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond_context, context])).chunk(2)
        return e_u + guidance_scale * (e_c - e_u)
    return guided
