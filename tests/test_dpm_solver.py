"""DPM-Solver++(2M) against the exact probability-flow ODE of Gaussian data and a hand-written DDIM loop."""
import numpy as np
import pytest
import torch

from trainer.diffusion.dpm_solver import dpm_solver_timesteps, dpmpp_2m_sample, log_snr
from trainer.diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule(1000, 0.0015, 0.0195)


def gaussian(mean: float, std: float):
    """The exact epsilon-prediction of data ~ N(mean, std^2), and the exact ODE map from t = T-1 to t = 0."""
    abar = SCHEDULE.alphas_cumprod

    def eps(x, t, context):
        a = abar[t].view(-1, *[1] * (x.dim() - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * std ** 2 + 1 - a)

    def flow(x_start):  # the ODE moves every quantile of N(alpha m, alpha^2 s^2 + sigma^2) to the same quantile
        a, b = abar[-1], abar[0]
        z = (x_start - a.sqrt() * mean) / (a * std ** 2 + 1 - a).sqrt()
        return b.sqrt() * mean + (b * std ** 2 + 1 - b).sqrt() * z

    return eps, flow


def run(eps, steps, order=2, **kw):
    return dpmpp_2m_sample(eps, SCHEDULE, (2048, 1), steps=steps, generator=torch.Generator().manual_seed(0),
                           order=order, **kw)


@pytest.mark.parametrize("std", [0.3, 1.0])
def test_second_order_lands_near_the_exact_flow(std):
    torch.set_default_dtype(torch.float64)
    try:
        eps, flow = gaussian(0.7, std)
        exact = flow(torch.randn((2048, 1), generator=torch.Generator().manual_seed(0)))
        err = {(s, o): (run(eps, s, o) - exact).abs().max().item() for s in (10, 50) for o in (1, 2)}
    finally:
        torch.set_default_dtype(torch.float32)
    assert err[10, 2] < 0.1 and err[10, 2] < err[10, 1] / 5, err
    assert err[50, 2] < 0.01 and err[50, 2] < err[10, 2], err


def test_first_order_is_ddim_on_the_same_grid():
    eps, _ = gaussian(0.2, 0.5)
    ts = dpm_solver_timesteps(8, SCHEDULE)
    abar = SCHEDULE.alphas_cumprod.float()
    x = torch.randn((2048, 1), generator=torch.Generator().manual_seed(0))
    for t, t_next in zip(ts[:-1], ts[1:]):
        e = eps(x, torch.full((2048,), int(t)), None)
        x0 = (x - (1 - abar[t]).sqrt() * e) / abar[t].sqrt()
        x = abar[t_next].sqrt() * x0 + (1 - abar[t_next]).sqrt() * e
    torch.testing.assert_close(run(eps, 8, order=1), x, rtol=1e-5, atol=1e-5)


def test_guidance_combines_the_two_predictions():
    def eps(x, t, context):
        return x * context
    cond, uncond = torch.full((2048, 1), 0.3), torch.full((2048, 1), -0.1)
    guided = run(eps, 6, context=cond, uncond_context=uncond, guidance_scale=2.5)
    torch.testing.assert_close(guided, run(lambda x, t, c: x * (-0.1 + 2.5 * (0.3 + 0.1)), 6))
    assert torch.equal(run(eps, 6, context=cond, uncond_context=uncond, guidance_scale=1.0),
                       run(eps, 6, context=cond))


def test_grid_is_even_in_log_snr_and_spans_the_schedule():
    ts = dpm_solver_timesteps(10, SCHEDULE)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 11 and np.all(np.diff(ts) < 0)
    gaps = np.diff(log_snr(SCHEDULE)[ts])
    assert np.allclose(gaps, gaps.mean(), rtol=0.1)
    coarse = NoiseSchedule(30, 0.0015, 0.0195)
    dense = dpm_solver_timesteps(25, coarse)
    assert dense[0] == 29 and dense[-1] == 0 and np.all(np.diff(dense) < 0) and len(dense) <= 26
    with pytest.raises(ValueError, match=r"sampler steps must be in \[1, 999\]"):
        dpm_solver_timesteps(1000, SCHEDULE)
