"""The KL-regularised autoencoder of the LDM (CompVis `AutoencoderKL`, same key layout).

Images in [-1, 1], NCHW. The encoder gives the mean and log-variance of a diagonal Gaussian
posterior over latents of shape [B, embed_dim, H/f, W/f] with f = 2 ** (len(ch_mult) - 1);
the decoder maps a latent back to an image. Keys: `encoder.*`, `decoder.*`, `quant_conv.*`,
`post_quant_conv.*`. Every op is per example (GroupNorm, per-image attention).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import dot_product_attention

_DDCONFIG_REQUIRED = ("z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                      "attn_resolutions")
_DDCONFIG_OPTIONAL = {"double_z": True, "dropout": 0.0, "attn_type": "vanilla"}  # CompVis' names and defaults


def _normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a (1x1 `nin_shortcut`) skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv `q`, `k`, `v`, `proj_out`; residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Strided 3x3 `conv` with CompVis' asymmetric (right/bottom) zero padding: halves H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 `conv`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks, possibly empty), resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self._resample_name = None if resample is None else name
        if resample is not None:
            self.add_module(name, resample)  # "downsample" / "upsample", as in CompVis

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if self._resample_name is not None:
            h = getattr(self, self._resample_name)(h)
        return h


class _Middle(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (`block_1`, `attn_1`, `block_2`)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image [B, in_channels, R, R] -> [B, 2*z_channels (double_z) or z_channels, R/f, R/f]."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[level], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            last = level == len(ch_mult) - 1
            self.down.append(_Level(blocks, attns, None if last else Downsample(block_in), "downsample"))
            if not last:
                res //= 2
        self.mid = _Middle(block_in, dropout)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, R/f, R/f] -> image [B, out_ch, R, R]."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int, dropout: float = 0.0):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Middle(block_in, dropout)
        levels: list[_Level] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            levels.insert(0, _Level(blocks, attns, Upsample(block_in) if level != 0 else None, "upsample"))
            if level != 0:
                res *= 2
        self.up = nn.ModuleList(levels)  # indexed by level, run from the lowest resolution up
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def parse_ddconfig(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    """Check a CompVis `ddconfig` mapping and fill defaults; unknown or missing keys raise ValueError."""
    unknown = set(ddconfig) - set(_DDCONFIG_REQUIRED) - set(_DDCONFIG_OPTIONAL)
    if unknown:
        raise ValueError(f"ddconfig: unknown key(s) {sorted(unknown)}")
    missing = [k for k in _DDCONFIG_REQUIRED if k not in ddconfig]
    if missing:
        raise ValueError(f"ddconfig: missing key(s) {missing}")
    cfg = {**_DDCONFIG_OPTIONAL, **ddconfig}
    if cfg["attn_type"] != "vanilla":
        raise ValueError(f"ddconfig: attn_type {cfg['attn_type']!r}: this autoencoder's attention is CompVis' "
                         "'vanilla' (the only one it builds)")
    cfg["ch_mult"] = tuple(cfg["ch_mult"])
    cfg["attn_resolutions"] = tuple(cfg["attn_resolutions"])
    return cfg


class AutoencoderKL(nn.Module):
    """KL autoencoder: `encode(x) -> (mean, std)`, `decode(z) -> x`, `forward(x) -> (x_rec, mean, std)`.

    x: [B, in_channels, R, R] in [-1, 1]; mean, std, z: [B, embed_dim, R/f, R/f].
    The log-variance is clamped to [-30, 20] as in CompVis. No loss lives here (see kl_divergence).
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int):
        super().__init__()
        cfg = parse_ddconfig(ddconfig)
        if not cfg["double_z"]:
            raise ValueError("ddconfig['double_z'] must be True for a KL autoencoder (mean and log-variance)")
        self.ddconfig = cfg
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(cfg["ch_mult"]) - 1)
        common = {k: cfg[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                                      "z_channels", "dropout")}
        self.encoder = Encoder(in_channels=cfg["in_channels"], double_z=True, **common)
        self.decoder = Decoder(out_ch=cfg["out_ch"], **common)
        self.quant_conv = nn.Conv2d(2 * cfg["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, cfg["z_channels"], 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and standard deviation, each [B, embed_dim, R/f, R/f]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return mean, torch.exp(0.5 * logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Latent [B, embed_dim, h, w] -> image [B, out_ch, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruct x from a posterior sample (or the posterior mean when sample=False)."""
        mean, std = self.encode(x)
        z = mean + std * torch.randn_like(mean) if sample else mean
        return self.decode(z), mean, std


def kl_divergence(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(0, 1)) per example, summed over all latent dims: [B, ...] -> [B]."""
    var = std.pow(2)
    kl = 0.5 * (mean.pow(2) + var - 1.0 - torch.log(var))
    return kl.flatten(1).sum(dim=1)
