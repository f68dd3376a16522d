"""Triton kernel: the clipped weight gradient of a Linear layer in one GEMM.

    grad_W = sum_i c_i G_i^T A_i      [d_out, d_in], float32
    grad_b = sum_i c_i sum_t G_it     [d_out]

Each program owns one (d_out, d_in) tile and reduces over the B*T rows. The clip factor
c_i is folded in one of two ways, both exact up to float32 accumulation:

* per example (16-bit inputs, T >= 16): the tile of G_i^T A_i is accumulated with
  tensor-core dots on the stored dtype, then added to the total times c_i. The extra
  multiply-add per tile element is 1/T of the dot work.
* folded (float32 or mixed inputs, or short sequences): rows of G are scaled by their
  example's c_i in float32 before a float32 dot.

When there are too few tiles to fill the GPU, the rows are split across programs
(split-K) that add their partial tiles atomically into a zeroed float32 output.

No noise here: the DP engine adds it once per coordinate per logical step, after the last
micro-batch (``bench/bench_dp_step.py`` measures what that costs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from trainer.kernels.backend import HALF_DTYPES, num_sms, triton_interpreting
from trainer.kernels.triton_common import dot_f32
from trainer.kernels.tiling import block_for_length, cdiv, launch_options

# Sizes are runtime arguments, so one compiled kernel serves every shape; strides stay
# specialised (Triton's divisibility hints give aligned, vectorised loads).
@triton.jit(do_not_specialize=["B", "T", "D_IN", "D_OUT", "per_split"])
def _clipped_grad_kernel(
    a_ptr, g_ptr, c_ptr, w_ptr, b_ptr,
    B, T, D_IN, D_OUT,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gd,
    per_split,
    HAS_BIAS: tl.constexpr, PER_EXAMPLE: tl.constexpr,
    ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (d_out, d_in) tile of sum_i c_i G_i^T A_i over this program's share of the rows.

    per_split: examples per split when PER_EXAMPLE, else flattened rows (a multiple of BLOCK_K).
    """
    pid_out = tl.program_id(0)
    pid_in = tl.program_id(1)
    split = tl.program_id(2)
    offs_out = pid_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_in = pid_in * BLOCK_IN + tl.arange(0, BLOCK_IN)
    offs_k = tl.arange(0, BLOCK_K)
    mask_out = offs_out < D_OUT
    mask_in = offs_in < D_IN

    acc = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    if PER_EXAMPLE:
        first = split * per_split
        last = tl.minimum(first + per_split, B)
        g_cols = g_ptr + first.to(tl.int64) * stride_gb + offs_out[:, None] * stride_gd
        a_cols = a_ptr + first.to(tl.int64) * stride_ab + offs_in[None, :] * stride_ad
        for i in range(first, last):
            example_acc = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
            example_bias = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
            for t0 in range(0, T, BLOCK_K):
                t = t0 + offs_k
                g_t = tl.load(g_cols + t[None, :] * stride_gt, mask=mask_out[:, None] & (t[None, :] < T), other=0.0)
                a = tl.load(a_cols + t[:, None] * stride_at, mask=(t[:, None] < T) & mask_in[None, :], other=0.0)
                example_acc = dot_f32(g_t, a, example_acc, UPCAST)
                if HAS_BIAS:
                    example_bias += tl.sum(g_t.to(tl.float32), axis=1)
            c = tl.load(c_ptr + i)
            acc += c * example_acc
            bias_acc += c * example_bias
            g_cols += stride_gb
            a_cols += stride_ab
    else:
        first = split * per_split
        last = tl.minimum(first + per_split, B * T)
        for r0 in range(first, last, BLOCK_K):
            rows = r0 + offs_k
            mask_rows = rows < last
            example = (rows // T).to(tl.int64)
            t = rows % T
            g_t = tl.load(g_ptr + example[None, :] * stride_gb + t[None, :] * stride_gt + offs_out[:, None] * stride_gd,
                          mask=mask_out[:, None] & mask_rows[None, :], other=0.0)
            a = tl.load(a_ptr + example[:, None] * stride_ab + t[:, None] * stride_at + offs_in[None, :] * stride_ad,
                        mask=mask_rows[:, None] & mask_in[None, :], other=0.0)
            c = tl.load(c_ptr + example, mask=mask_rows, other=0.0)
            g_t = g_t.to(tl.float32) * c[None, :]
            acc = dot_f32(g_t, a, acc, True)
            if HAS_BIAS:
                bias_acc += tl.sum(g_t, axis=1)

    w_ptrs = w_ptr + offs_out[:, None] * D_IN + offs_in[None, :]
    mask_w = mask_out[:, None] & mask_in[None, :]
    if ATOMIC:
        tl.atomic_add(w_ptrs, acc, mask=mask_w)
    else:
        tl.store(w_ptrs, acc, mask=mask_w)
    if HAS_BIAS:
        if pid_in == 0:  # every d_in tile computed the bias rows; one of them writes
            if ATOMIC:
                tl.atomic_add(b_ptr + offs_out, bias_acc, mask=mask_out)
            else:
                tl.store(b_ptr + offs_out, bias_acc, mask=mask_out)


def clipped_grad(
    a: Tensor, g: Tensor, clip_factors: Tensor, bias: bool,
    per_example: bool | None = None, splits: int | None = None,
    block_out: int | None = None, block_in: int | None = None, block_k: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """sum_i c_i G_i^T A_i (+ bias) for A [B, T, d_in], G [B, T, d_out]; float32 outputs.

    ``per_example``, ``splits`` and the block sizes default to fixed rules; tests force them
    to cover both ways of folding c_i and the split-K path.
    """
    B, T, d_in = a.shape
    d_out = g.shape[2]
    half_inputs = a.dtype == g.dtype and a.dtype in HALF_DTYPES
    upcast = triton_interpreting() or not half_inputs
    if per_example is None:
        per_example = half_inputs and T >= 16
    if block_out is None or block_in is None:
        # float32 dots, and per-example mode's two float32 tiles (the example's and the total),
        # need registers: keep their tiles small
        block_out, block_in = (128, 64) if per_example and not upcast else (64, 64)
    block_k = block_k or (block_for_length(T, (32, 16)) if per_example else 32)

    n_tiles = cdiv(d_out, block_out) * cdiv(d_in, block_in)
    work_items = B if per_example else cdiv(B * T, block_k)
    if splits is None:
        splits = 1 if a.device.type != "cuda" else cdiv(2 * num_sms(a.device), n_tiles)
    splits = max(1, min(splits, work_items))
    per_split = cdiv(work_items, splits)
    if not per_example:
        per_split *= block_k  # the kernel counts rows
    atomic = splits > 1

    c = clip_factors.to(device=a.device, dtype=torch.float32).contiguous()
    alloc = torch.zeros if atomic else torch.empty
    grad_w = alloc((d_out, d_in), device=a.device, dtype=torch.float32)
    grad_b = alloc((d_out,), device=a.device, dtype=torch.float32) if bias else grad_w  # dummy pointer when no bias
    grid = (cdiv(d_out, block_out), cdiv(d_in, block_in), splits)
    _clipped_grad_kernel[grid](
        a, g, c, grad_w, grad_b, B, T, d_in, d_out, *a.stride(), *g.stride(),
        per_split,
        HAS_BIAS=bias, PER_EXAMPLE=per_example, ATOMIC=atomic, UPCAST=upcast,
        BLOCK_OUT=block_out, BLOCK_IN=block_in, BLOCK_K=block_k,
        **launch_options(2 * block_out * block_in),  # the total and the example's tile (or fp32 operands)
    )
    return grad_w, (grad_b if bias else None)
