"""The latent diffusion model as used by the stages: UNet + conditioner + schedule + latent scale,
and the frozen autoencoder's encoding of images in batches.

It knows nothing of privacy: the fine-tuning stage asks it for per-example losses and hands
them to the DP engine.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from trainer.diffusion import NoiseSchedule, ddim_sample, dpmpp_2m_sample, per_example_loss


class LatentDiffusion(nn.Module):
    """eps-prediction LDM over latents z = scale_factor * (posterior sample of the autoencoder)."""

    def __init__(self, unet: nn.Module, conditioner: nn.Module, schedule: NoiseSchedule, scale_factor: float = 1.0):
        super().__init__()
        self.unet = unet
        self.cond_stage_model = conditioner  # CompVis name: checkpoints map cond_stage_model.* here
        self.schedule = schedule
        self.scale_factor = float(scale_factor)

    def eps(self, x: Tensor, t: Tensor, context: Optional[Tensor]) -> Tensor:
        return self.unet(x, t, context=context)

    def context(self, conds) -> Optional[Tensor]:
        """Class labels (LongTensor [B]) or prompts (list[str]) -> context [B, L, D], or None."""
        return self.cond_stage_model(conds)

    def null_context(self, batch_size: int) -> Optional[Tensor]:
        return self.cond_stage_model.null_condition(batch_size)

    def drop_conditions(self, conds, prob: float, generator: Optional[torch.Generator] = None):
        """Replace each condition by the null one with probability ``prob`` (classifier-free guidance)."""
        if prob <= 0 or conds is None:
            return conds
        n = len(conds)
        drop = torch.rand(n, generator=generator) < prob
        if isinstance(conds, Tensor):
            null = getattr(self.cond_stage_model, "null_class", None)
            if null is None:
                return conds
            return torch.where(drop.to(conds.device), torch.full_like(conds, null), conds)
        return ["" if d else c for c, d in zip(conds, drop.tolist())]

    def loss(self, z0: Tensor, conds, generator: Optional[torch.Generator] = None,
             multiplicity: int = 1, cond_drop_prob: float = 0.0,
             t_range: Optional[tuple[int, int]] = None) -> Tensor:
        """Per-example diffusion loss [B] for clean (already scaled) latents z0 (timesteps drawn from
        ``t_range`` = [lo, hi), default all)."""
        conds = self.drop_conditions(conds, cond_drop_prob, generator)
        context = self.context(conds) if conds is not None else None
        return per_example_loss(self.eps, z0, context, self.schedule, generator, multiplicity, t_range)

    @torch.no_grad()
    def sample_latents(self, conds: Sequence, latent_shape: tuple[int, int, int], steps: int = 50,
                       eta: float = 0.0, guidance_scale: float = 1.0,
                       generator: Optional[torch.Generator] = None, progress: bool = False,
                       sampler: str = "ddim") -> Tensor:
        """Latents [len(conds), *latent_shape] by ``sampler`` (ddim | dpmpp_2m, the latter with eta 0 only),
        unscaled back: divided by scale_factor."""
        n = len(conds)
        device = next(self.unet.parameters()).device
        context = self.context(conds)
        uncond = self.null_context(n) if guidance_scale != 1.0 else None
        common = dict(context=context, uncond_context=uncond, guidance_scale=guidance_scale, steps=steps,
                      generator=generator, device=device, progress=progress)
        if sampler == "ddim":
            z = ddim_sample(self.eps, self.schedule, (n, *latent_shape), eta=eta, **common)
        elif sampler == "dpmpp_2m":
            if eta != 0:
                raise ValueError(f"the dpmpp_2m sampler is deterministic: eta must be 0, got {eta}")
            z = dpmpp_2m_sample(self.eps, self.schedule, (n, *latent_shape), **common)
        else:
            raise ValueError(f"unknown sampler {sampler!r}: ddim or dpmpp_2m")
        return z / self.scale_factor


@torch.no_grad()
def encode_images(autoencoder, images: torch.Tensor, batch_size: int = 256, desc: str = "encode",
                  device: torch.device | str | None = None):
    """Posterior (mean, std) of every image, in batches on ``device`` (default: the model's) -> two
    tensors [N, c, h, w] on that device."""
    from tqdm import tqdm
    device = device or next(autoencoder.parameters()).device
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        m, s = autoencoder.encode(images[i:i + batch_size].to(device))
        means.append(m)
        stds.append(s)
    return torch.cat(means), torch.cat(stds)


def autoencoder_encode_fn(model: torch.nn.Module, device: torch.device | str):
    """``images [B, C, R, R] in [-1, 1] -> (mean, std)`` on the CPU, encoded on ``device`` without gradients."""
    model = model.to(device)

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            mean, std = model.encode(images.to(device))
        return mean.cpu(), std.cpu()
    return encode
