"""Attention for the LDM: the one attention kernel and the blocks built on it.

`dot_product_attention` is the only place where attention weights are computed; every block
(cross-attention in the SpatialTransformer, the UNet's AttentionBlock, the autoencoder's
single-head block) calls it. It uses xformers' memory-efficient kernel when xformers is
importable and the tensors live on CUDA, two plain matrix products for short sequences on the CPU
without autograd, and `torch.nn.functional.scaled_dot_product_attention` otherwise.

Module and parameter names follow the CompVis `ldm` code, so official checkpoints load with
`strict=True`. Every operation treats the examples of a batch independently (GroupNorm, LayerNorm,
per-example attention; no BatchNorm), and the learned projections are plain `nn.Linear` /
kernel-1 convolutions, so per-example gradient hooks see their inputs and output gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import small_maps

try:  # optional: only used on CUDA tensors
    import xformers.ops as _xformers_ops
except Exception:  # ImportError, or a broken build without CUDA kernels
    _xformers_ops = None


# Up to this many scores per head (Tq * Tk; 16 x 16 tokens: a 4x4 map), a CPU forward without
# autograd is ~4x faster as two matrix products than in `scaled_dot_product_attention`'s CPU kernel,
# whose tiling is made for long sequences (and whose backward is the faster one).
SMALL_ATTENTION_SCORES = 256


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v in plain matrix products (shapes as `dot_product_attention`)."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v, independently per example and head.

    q: [B, H, Tq, d], k and v: [B, H, Tk, d] -> [B, H, Tq, d].
    """
    if _xformers_ops is not None and q.is_cuda:
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # xformers takes [B, T, H, d]
        return _xformers_ops.memory_efficient_attention(q, k, v).transpose(1, 2)
    records_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    short = small_maps.enabled(q, k, v) and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION_SCORES
    # with autograd the fused kernel's backward wins in float32; in bfloat16 it is ~3.5x slower than
    # in float32 on the CPU, and the two products are faster
    if short and (not records_grad or q.dtype == torch.bfloat16):
        return attention_reference(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (as CompVis' GroupNorm32)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero (residual branches start as the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class CrossAttention(nn.Module):
    """Multi-head attention of a query sequence over a context sequence (itself if None).

    x: [B, T, query_dim], context: [B, L, context_dim] -> [B, T, query_dim].
    `to_q`, `to_k`, `to_v` (no bias) and `to_out.0` are `nn.Linear` applied to [B, T, d].
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, inner = t.shape
        return t.reshape(b, n, self.heads, inner // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = dot_product_attention(q, k, v)  # [B, H, T, d]
        b, heads, t, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, t, heads * d))


class GEGLU(nn.Module):
    """Gated GELU: Linear to 2*dim_out, then value * gelu(gate). Key: `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width: `net.0` (GEGLU), `net.1` (Dropout), `net.2` (Linear)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention (attn1), cross-attention (attn2), GEGLU (ff).

    x: [B, T, dim], context: [B, L, context_dim] or None (attn2 then attends over x) -> [B, T, dim].
    `checkpoint` is accepted for config compatibility and ignored (no gradient checkpointing).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        checkpoint: bool = True,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream and its LayerNorms stay float32 under bf16 autocast (as CompVis'
            # GroupNorm32): a bf16 LayerNorm sums its weight's gradient over every token in bf16
            x = x.float()
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned by cross-attention.

    x: [B, C, H, W], context: [B, L, context_dim] or None -> [B, C, H, W].
    GroupNorm (eps 1e-6) -> `proj_in` (1x1 Conv2d) -> `transformer_blocks` on [B, H*W, n_heads*d_head]
    -> `proj_out` (1x1 Conv2d, zero-initialised) -> residual add.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim)
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, inner)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.reshape(b, h, w, inner).permute(0, 3, 1, 2).contiguous()
        return self.proj_out(x) + x_in


class AttentionBlock(nn.Module):
    """Self-attention over the positions of an N-d feature map (the UNet's non-transformer attention).

    x: [B, C, *spatial] -> same shape. GroupNorm32 -> `qkv` (kernel-1 Conv1d, C -> 3C) on [B, C, T]
    -> attention -> `proj_out` (kernel-1 Conv1d, zero-initialised) -> residual add.
    Heads: `num_heads`, or C // num_head_channels when num_head_channels != -1.
    The qkv channels are laid out per head as [q, k, v] (legacy order) or as [all q, all k, all v]
    (`use_new_attention_order`), matching the two CompVis/OpenAI variants.
    `use_checkpoint` is accepted for config compatibility and ignored.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels != 0:
                raise ValueError(
                    f"AttentionBlock: channels={channels} is not divisible by num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads != 0:
            raise ValueError(f"AttentionBlock: channels={channels} cannot be split into num_heads={self.num_heads}")
        self.channels = channels
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def _split_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, 3*H*d, T] -> three [B, H, T, d] tensors."""
        b, width, t = qkv.shape
        heads = self.num_heads
        d = width // (3 * heads)
        if self.use_new_attention_order:
            q, k, v = qkv.reshape(b, 3, heads, d, t).unbind(1)
        else:
            q, k, v = qkv.reshape(b, heads, 3, d, t).unbind(2)
        return q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        t = math.prod(spatial)
        x = x.reshape(b, c, t)
        q, k, v = self._split_qkv(self.qkv(self.norm(x)))
        h = dot_product_attention(q, k, v)  # [B, H, T, d]
        h = h.transpose(-1, -2).reshape(b, c, t)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)
