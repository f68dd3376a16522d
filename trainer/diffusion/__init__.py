"""Diffusion: the noise schedule, the per-example loss, DDIM and DPM-Solver++ sampling, EMA."""
from trainer.diffusion.ddim import ddim_sample, ddim_timesteps
from trainer.diffusion.dpm_solver import dpmpp_2m_sample
from trainer.diffusion.ema import EMA
from trainer.diffusion.schedule import NoiseSchedule, per_example_loss

__all__ = ["NoiseSchedule", "per_example_loss", "ddim_sample", "ddim_timesteps", "dpmpp_2m_sample", "EMA"]
