"""Triton kernels: per-example squared gradient norms of a Linear layer over a sequence.

For example i with activations A_i [T, d_in] and output gradients G_i [T, d_out], the
weight gradient is G_i^T A_i [d_out, d_in]. Two ways to get its squared Frobenius norm
without writing any per-example gradient or Gram matrix to memory:

* instantiate: each program owns one (d_out, d_in) tile of one example, accumulates
  G_i^T A_i over T in registers and squares it there. Work ~ 2 T d_in d_out per example.
* ghost: ||G_i^T A_i||^2 = sum_{s,t} (A_s . A_t)(G_s . G_t). Each program owns one
  (s, t) tile of the T x T Gram matrices, with s <= t (the matrices are symmetric, so
  an off-diagonal tile counts twice). Work ~ T^2 (d_in + d_out) per example.

The bias gradient sum_t G_it is the weight of a constant input 1: instantiate adds the
squared column sums of G, ghost adds 1 to every entry of A A^T.

Each program writes one float32 partial sum; the host adds the partials of an example.
Dots accumulate in float32 (see ``dot_f32``), so the result matches the float32
computation on the same (rounded) inputs.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from trainer.kernels.backend import HALF_DTYPES, MAX_GRID_Y, num_sms, triton_interpreting
from trainer.kernels.triton_common import dot_f32
from trainer.kernels.tiling import block_for_length, cdiv, launch_options


# Sizes are runtime arguments, so one compiled kernel serves every shape; strides stay
# specialised (Triton's divisibility hints give aligned, vectorised loads).
@triton.jit(do_not_specialize=["T", "D_IN", "D_OUT", "n_tiles_in"])
def _instantiate_kernel(
    a_ptr, g_ptr, out_ptr,
    T, D_IN, D_OUT,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gd,
    n_tiles_in,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[i, tile] = ||tile of G_i^T A_i||^2 (+ ||sum_t G_it||^2 over the tile's rows, once)."""
    tile = tl.program_id(0)
    example = tl.program_id(1).to(tl.int64)
    tile_out = tile // n_tiles_in
    tile_in = tile % n_tiles_in
    offs_out = tile_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_in = tile_in * BLOCK_IN + tl.arange(0, BLOCK_IN)
    offs_t = tl.arange(0, BLOCK_T)
    g_cols = g_ptr + example * stride_gb + offs_out[:, None] * stride_gd  # G_i^T: [BLOCK_OUT, T]
    a_cols = a_ptr + example * stride_ab + offs_in[None, :] * stride_ad  # A_i: [T, BLOCK_IN]

    acc = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    # The bias sums are reduced over t after the loop, not inside it: a reduction inside the
    # loop whose result is used twice (squared) crashes Triton 3.6's thread-locality pass.
    bias_acc = tl.zeros((BLOCK_OUT, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        g_t = tl.load(g_cols + t[None, :] * stride_gt,
                      mask=(offs_out[:, None] < D_OUT) & (t[None, :] < T), other=0.0)
        a = tl.load(a_cols + t[:, None] * stride_at,
                    mask=(t[:, None] < T) & (offs_in[None, :] < D_IN), other=0.0)
        acc = dot_f32(g_t, a, acc, UPCAST)
        if HAS_BIAS:
            bias_acc += g_t.to(tl.float32)

    sq = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    if HAS_BIAS:
        if tile_in == 0:  # the bias rows of this d_out tile are counted by one program only
            bias = tl.sum(bias_acc, axis=1)
            sq += tl.sum(bias * bias, axis=0)
    tl.store(out_ptr + example * tl.num_programs(0) + tile, sq)


@triton.jit
def _gram_tile(x_ptr, rows_s, rows_t, T, D, stride_t, stride_d,
               UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """X[rows_s] X[rows_t]^T for one example's X [T, D]: float32 [BLOCK_T, BLOCK_T]."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        x_s = tl.load(x_ptr + rows_s[:, None] * stride_t + d[None, :] * stride_d,
                      mask=(rows_s[:, None] < T) & (d[None, :] < D), other=0.0)
        x_t = tl.load(x_ptr + d[:, None] * stride_d + rows_t[None, :] * stride_t,
                      mask=(d[:, None] < D) & (rows_t[None, :] < T), other=0.0)
        acc = dot_f32(x_s, x_t, acc, UPCAST)
    return acc


@triton.jit(do_not_specialize=["T", "D_IN", "D_OUT"])
def _ghost_kernel(
    a_ptr, g_ptr, pairs_ptr, out_ptr,
    T, D_IN, D_OUT,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gd,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[i, pair] = sum over the (s, t) tile of (A A^T + bias) * (G G^T), doubled off the diagonal."""
    pair = tl.program_id(0)
    example = tl.program_id(1).to(tl.int64)
    block_s = tl.load(pairs_ptr + 2 * pair)
    block_t = tl.load(pairs_ptr + 2 * pair + 1)
    rows_s = block_s * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_t = block_t * BLOCK_T + tl.arange(0, BLOCK_T)

    aa = _gram_tile(a_ptr + example * stride_ab, rows_s, rows_t, T, D_IN, stride_at, stride_ad,
                    UPCAST, BLOCK_T, BLOCK_D)
    gg = _gram_tile(g_ptr + example * stride_gb, rows_s, rows_t, T, D_OUT, stride_gt, stride_gd,
                    UPCAST, BLOCK_T, BLOCK_D)
    if HAS_BIAS:
        aa += 1.0  # padded rows have gg == 0, so the +1 there adds nothing
    total = tl.sum(tl.sum(aa * gg, axis=1), axis=0)
    total = tl.where(block_s == block_t, total, 2.0 * total)
    tl.store(out_ptr + example * tl.num_programs(0) + pair, total)


@functools.lru_cache(maxsize=64)
def _upper_block_pairs(n_blocks: int, device: torch.device) -> Tensor:
    """int32 [n_pairs, 2]: every (s, t) with s <= t < n_blocks."""
    return torch.triu_indices(n_blocks, n_blocks).t().contiguous().to(device=device, dtype=torch.int32)


def _needs_upcast(a: Tensor, g: Tensor) -> bool:
    """Dot in float32 unless both inputs share a 16-bit dtype that the tensor cores take.

    The interpreter computes 16-bit arithmetic wrongly, so it always upcasts after loading.
    """
    return triton_interpreting() or not (a.dtype == g.dtype and a.dtype in HALF_DTYPES)


def _check_batch(batch: int) -> None:
    if batch > MAX_GRID_Y:
        raise ValueError(f"at most {MAX_GRID_Y} examples per call, got {batch}: split the batch")


def instantiate_sqnorms(a: Tensor, g: Tensor, bias: bool, block_out: int | None = None,
                        block_in: int | None = None, block_t: int | None = None) -> Tensor:
    """||G_i^T A_i||_F^2 (+ ||sum_t G_it||^2) for A [B, T, d_in], G [B, T, d_out] -> [B] float32.

    Block sizes default to a fixed rule; tests pass small ones to cover many tiles.
    """
    B, T, d_in = a.shape
    d_out = g.shape[2]
    _check_batch(B)
    upcast = _needs_upcast(a, g)
    if block_out is None or block_in is None:
        wide = not upcast and B * cdiv(d_out, 128) * cdiv(d_in, 128) >= 2 * num_sms(a.device)
        block_out = block_in = 128 if wide else 64
    block_t = block_t or block_for_length(T, (32, 16) if block_out * block_in >= 128 * 128 else (64, 32, 16))
    n_tiles_in = cdiv(d_in, block_in)
    n_tiles = cdiv(d_out, block_out) * n_tiles_in
    partial = torch.empty((B, n_tiles), device=a.device, dtype=torch.float32)
    if B > 0:
        _instantiate_kernel[(n_tiles, B)](
            a, g, partial, T, d_in, d_out, *a.stride(), *g.stride(), n_tiles_in,
            HAS_BIAS=bias, UPCAST=upcast, BLOCK_OUT=block_out, BLOCK_IN=block_in, BLOCK_T=block_t,
            **launch_options(block_out * block_in + (block_out * block_t if bias else 0)),
        )
    return partial.sum(dim=1)


def ghost_sqnorms(a: Tensor, g: Tensor, bias: bool, block_t: int | None = None,
                  block_d: int | None = None) -> Tensor:
    """The same norms as :func:`instantiate_sqnorms`, through T x T Gram tiles."""
    B, T, d_in = a.shape
    d_out = g.shape[2]
    _check_batch(B)
    upcast = _needs_upcast(a, g)
    block_t = block_t or block_for_length(T)
    block_d = block_d or (32 if upcast else 64)
    pairs = _upper_block_pairs(cdiv(T, block_t), a.device)
    partial = torch.empty((B, pairs.shape[0]), device=a.device, dtype=torch.float32)
    if B > 0:
        _ghost_kernel[(pairs.shape[0], B)](
            a, g, pairs, partial, T, d_in, d_out, *a.stride(), *g.stride(),
            HAS_BIAS=bias, UPCAST=upcast, BLOCK_T=block_t, BLOCK_D=block_d,
            **launch_options(2 * block_t * block_t),  # A A^T and G G^T tiles
        )
    return partial.sum(dim=1)
