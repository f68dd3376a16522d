"""DDIM sampling (Song et al.) with classifier-free guidance, on the LDM timestep grid."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from trainer.diffusion.schedule import EpsModel, NoiseSchedule, guided_eps


def ddim_timesteps(num_steps: int, total: int) -> np.ndarray:
    """LDM's "uniform" grid: 1, 1 + c, 1 + 2c, ... < total + 1 with c = total // num_steps.

    Exactly CompVis' ``make_ddim_timesteps``: when ``num_steps`` does not divide ``total`` the grid
    has a few more points than asked (30 of 1000: 31), so samples match the original code.
    """
    if not 1 <= num_steps <= total:
        raise ValueError(f"ddim steps must be in [1, {total}], got {num_steps}")
    c = total // num_steps
    return np.asarray(list(range(0, total, c))) + 1


@torch.no_grad()
def ddim_sample(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    context: Optional[Tensor] = None,
    uncond_context: Optional[Tensor] = None,
    guidance_scale: float = 1.0,
    steps: int = 50,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Sample latents [shape] from noise; deterministic for a seeded ``generator``.

    Guidance: eps = eps_u + s (eps_c - eps_u) when ``uncond_context`` is given and s != 1.
    """
    ts = ddim_timesteps(steps, schedule.timesteps)
    ts = np.minimum(ts, schedule.timesteps - 1)
    abar = schedule.alphas_cumprod
    a = abar[ts]
    a_prev = torch.cat([abar[:1], abar[ts[:-1]]])
    sig = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    x = torch.randn(shape, generator=generator).to(device)
    eps = guided_eps(eps_model, context, uncond_context, guidance_scale)
    for i in tqdm(range(len(ts) - 1, -1, -1), desc="ddim", disable=not progress, leave=False):
        e = eps(x, torch.full((shape[0],), int(ts[i]), dtype=torch.long, device=device))
        ai, ap, si = (float(v) for v in (a[i], a_prev[i], sig[i]))
        x0 = (x - (1 - ai) ** 0.5 * e) / ai ** 0.5
        x = ap ** 0.5 * x0 + (1 - ap - si ** 2) ** 0.5 * e
        if si > 0:
            x = x + si * torch.randn(shape, generator=generator).to(device)
    return x
