"""Noise schedule, per-example loss, DDIM sampling."""
import numpy as np
import pytest
import torch

from trainer.diffusion import EMA, NoiseSchedule, ddim_sample, ddim_timesteps, per_example_loss


def test_linear_schedule_matches_ldm_definition():
    s = NoiseSchedule(1000, 0.00085, 0.012)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert np.allclose(s.betas.numpy(), betas)
    assert np.allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas))


def test_per_example_loss_is_per_example():
    s = NoiseSchedule(100)
    x0 = torch.randn(5, 2, 4, 4)
    model = lambda x, t, c: 0.5 * x  # noqa: E731
    g = torch.Generator().manual_seed(0)
    loss = per_example_loss(model, x0, None, s, g, multiplicity=3)
    assert loss.shape == (5,)
    # each example's loss depends only on that example
    x1 = x0.clone()
    x1[2] += 10
    loss1 = per_example_loss(model, x1, None, s, torch.Generator().manual_seed(0), multiplicity=3)
    changed = (loss1 - per_example_loss(model, x0, None, s, torch.Generator().manual_seed(0), multiplicity=3)).abs() > 1e-6
    assert changed.tolist() == [False, False, True, False, False]


def test_multiplicity_averages_draws():
    s = NoiseSchedule(100)
    x0 = torch.randn(3, 1, 2, 2)
    model = lambda x, t, c: torch.zeros_like(x)  # noqa: E731 - loss = mean(noise^2)
    g = torch.Generator().manual_seed(1)
    manual = []
    for _ in range(4):
        torch.randint(0, 100, (3,), generator=g)
        manual.append(torch.randn(x0.shape, generator=g).pow(2).flatten(1).mean(1))
    got = per_example_loss(model, x0, None, s, torch.Generator().manual_seed(1), multiplicity=4)
    assert torch.allclose(got, torch.stack(manual).mean(0))


def test_t_range_draws_timesteps_from_the_range_only():
    s = NoiseSchedule(100)
    seen = []
    model = lambda x, t, c: seen.append(t) or torch.zeros_like(x)  # noqa: E731
    per_example_loss(model, torch.randn(64, 1, 2, 2), None, s, torch.Generator().manual_seed(0), 3, t_range=(30, 33))
    drawn = torch.cat(seen)
    assert len(seen) == 3 and set(drawn.tolist()) == {30, 31, 32}
    seen.clear()
    per_example_loss(model, torch.randn(512, 1, 2, 2), None, s, torch.Generator().manual_seed(0))
    assert seen[0].min() == 0 and seen[0].max() == 99  # default: the whole schedule
    for bad in ((5, 5), (-1, 10), (0, 101)):
        with pytest.raises(ValueError, match="t_range"):
            per_example_loss(model, torch.randn(2, 1, 2, 2), None, s, t_range=bad)


def test_ddim_grid_matches_ldm():
    assert ddim_timesteps(50, 1000)[:3].tolist() == [1, 21, 41]
    assert len(ddim_timesteps(50, 1000)) == 50
    from ldm.modules.diffusionmodules.util import make_ddim_timesteps  # the CompVis grid, step counts that
    for steps in (1, 7, 30, 50, 200, 999):                             # do not divide 1000 included
        assert ddim_timesteps(steps, 1000).tolist() == make_ddim_timesteps("uniform", steps, 1000, False).tolist()


def test_ddim_shape_determinism_and_guidance():
    s = NoiseSchedule(1000)
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return 0.1 * x + (0 if c is None else c.mean())

    ctx, unc = torch.ones(2, 1, 3), torch.zeros(2, 1, 3)
    a = ddim_sample(model, s, (2, 4, 8, 8), ctx, unc, guidance_scale=3.0, steps=5, eta=0.5,
                    generator=torch.Generator().manual_seed(0))
    b = ddim_sample(model, s, (2, 4, 8, 8), ctx, unc, guidance_scale=3.0, steps=5, eta=0.5,
                    generator=torch.Generator().manual_seed(0))
    c = ddim_sample(model, s, (2, 4, 8, 8), ctx, unc, guidance_scale=3.0, steps=5, eta=0.5,
                    generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert calls[0] == 4  # conditional and unconditional branches in one batch


def test_ema_tracks_weights():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], w0 + 1.0)


def test_ema_updates_every_float_parameter_and_buffer_and_skips_integer_ones():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(m, decay=0.9)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    m.train()(torch.randn(8, 3))  # moves the running statistics and the integer batch count
    ema.update(m)
    now = m.state_dict()
    assert "1.num_batches_tracked" not in ema.shadow
    assert set(ema.shadow) == {k for k, v in now.items() if v.is_floating_point()}
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v, 0.9 * start[k] + 0.1 * now[k], msg=k)


def test_ema_of_named_parameters_restores_in_place_and_copies_back():
    m = torch.nn.Linear(2, 2)
    params = dict(m.named_parameters())
    ema = EMA(params, decay=0.75)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(4.0)
    ema.update(params)
    assert torch.allclose(ema.shadow["weight"], w0 + 1.0) and set(ema.shadow) == {"weight", "bias"}
    shadow = ema.shadow["weight"]
    ema.load_state_dict({k: v + 1.0 for k, v in ema.state_dict().items()})
    assert ema.shadow["weight"] is shadow and torch.allclose(shadow, w0 + 2.0)  # restored into the same tensor
    ema.copy_to(params)
    assert torch.equal(m.weight.detach(), shadow)
