"""The LDM denoising UNet (CompVis `openaimodel.UNetModel`, same parameter names and shapes).

Input blocks go down in resolution, a middle block, output blocks come back up with skip
connections; ResBlocks take a sinusoidal timestep embedding (plus a class embedding when
`num_classes` is set); attention layers sit at the downsampling rates listed in
`attention_resolutions`: `SpatialTransformer` (cross-attention to a context) when
`use_spatial_transformer`, else `AttentionBlock` (self-attention only).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import AttentionBlock, GroupNorm32, SpatialTransformer, zero_module
from .small_maps import SmallMapConv2d


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-d convolution (2-d: `SmallMapConv2d`, an `nn.Conv2d` fast on maps below 3x3)."""
    convs = {1: nn.Conv1d, 2: SmallMapConv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-d average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return pools[dims](*args, **kwargs)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two axes when dims=3), then an optional 3x3 `conv`."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.dims = dims
        self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling (inner two axes when dims=3): strided 3x3 conv or average pooling, key `op`."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the number of channels")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (up/down).

    x: [B, channels, ...], emb: [B, emb_channels] -> [B, out_channels, ...].
    With `use_scale_shift_norm` the embedding gives a scale and a shift applied after the
    second norm; otherwise it is added before it. The last conv starts at zero.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            # resample between the activation and the conv of the first layer
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; ResBlocks also get the timestep embedding, SpatialTransformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The LDM UNet with timestep embedding and attention (CompVis keyword names and key layout).

    forward(x [B, in_channels, *spatial], timesteps [B], context [B, L, context_dim] | None,
    y [B] class ids | None) -> [B, out_channels, *spatial] (or codebook logits when n_embed is set).

    attention_resolutions: downsampling rates (1, 2, 4, ...) that get an attention layer.
    Head layout follows CompVis exactly, quirks included: with `legacy` (the default) and
    AttentionBlocks, `num_head_channels` is passed through as given; SpatialTransformers use
    d_head = ch // num_heads. `use_checkpoint` is accepted and ignored (no gradient
    checkpointing: every activation is kept, which per-example gradient hooks need anyway).
    `use_fp16` must be False: use autocast or a bf16 engine for mixed precision.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
    ):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of the conditioning)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer=False: nothing would use the context")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (both are -1)")
        if use_fp16:
            raise ValueError("use_fp16=True is not supported: keep fp32 weights and use autocast/bf16 instead")
        if not isinstance(num_res_blocks, int):
            raise TypeError(f"num_res_blocks must be an int, got {num_res_blocks!r}")
        if num_classes is not None and not isinstance(num_classes, int):
            raise TypeError(f"num_classes must be an int or None, got {num_classes!r}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.predict_codebook_ids = n_embed is not None

        def attention(ch: int, block_heads: int) -> nn.Module:
            """The attention layer at width ch. block_heads: AttentionBlock's num_heads argument."""
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                # CompVis does not pass `dropout` to the transformer: it has none
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim)
            return AttentionBlock(ch, num_heads=block_heads, num_head_channels=dim_head,
                                  use_new_attention_order=use_new_attention_order)

        def resblock(ch: int, out: int, **kwargs) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out, dims=dims,
                            use_scale_shift_norm=use_scale_shift_norm, **kwargs)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(
                    ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), attention(ch, num_heads), resblock(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(
                        ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # ch = model_channels * channel_mult[0]; CompVis passes model_channels to these convs, the same
        # width unless channel_mult[0] != 1, where its forward fails on the width mismatch
        self.out = nn.Sequential(
            GroupNorm32(32, ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(GroupNorm32(32, ch), conv_nd(dims, ch, n_embed, 1))

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class ids) if and only if the model was built with num_classes")
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape [{x.shape[0]}], got {tuple(timesteps.shape)}")
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [{x.shape[0]}], got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
