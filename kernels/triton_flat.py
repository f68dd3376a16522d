"""Triton kernels: clip, sum and noise flat per-example gradients [B, P].

For parameters outside Linear layers the engine holds per-example gradients as rows of
one [B, P] matrix. Two passes over it:

1. squared norms: programs (chunk, example) each sum the squares of one column chunk
   of one row into a float32 partial; the host adds the partials and takes the root.
2. clipped sum: each program owns BLOCK_P columns, walks the B rows adding
   c_i * row_i with c_i = min(1, C / (n_i + 1e-6)) computed from the norms, adds
   noise_std * N(0, 1) (Philox keyed by ``seed``, counter = column index) and stores.

Every coordinate is written by one program, so it gets exactly one noise draw.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.backend import MAX_GRID_Y, num_sms
from kernels.tiling import cdiv

MAX_COLUMNS = 2**31 - 1  # column indices and Philox counters are int32


# Sizes are runtime arguments, so one compiled kernel serves every shape; strides stay
# specialised (Triton's divisibility hints give aligned, vectorised loads).
@triton.jit(do_not_specialize=["P", "cols_per_program"])
def _row_sqnorm_kernel(x_ptr, out_ptr, P, stride_b, stride_p, cols_per_program, BLOCK_P: tl.constexpr):
    """out[i, chunk] = sum of x[i, p]^2 over the chunk's columns, in float32."""
    chunk = tl.program_id(0)
    example = tl.program_id(1).to(tl.int64)
    start = chunk * cols_per_program
    end = tl.minimum(start + cols_per_program, P)
    row = x_ptr + example * stride_b
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        x = tl.load(row + cols * stride_p, mask=cols < end, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(out_ptr + example * tl.num_programs(0) + chunk, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["B", "P", "seed"])
def _clip_sum_kernel(x_ptr, norms_ptr, out_ptr, B, P, stride_b, stride_p, max_norm, seed, noise_std,
                     ADD_NOISE: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[p] = sum_i min(1, C / (n_i + 1e-6)) x[i, p] + noise_std * N(0, 1), float32."""
    cols = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = cols < P
    ptrs = x_ptr + cols * stride_p
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for i in range(0, B):
        norm = tl.load(norms_ptr + i)
        factor = tl.minimum(max_norm / (norm + 1e-6), 1.0)
        acc += factor * tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += stride_b
    if ADD_NOISE:
        acc += noise_std * tl.randn(seed, cols)
    tl.store(out_ptr + cols, acc, mask=mask)


def clip_sum_noise(x: Tensor, max_grad_norm: float, noise_std: float, seed: int,
                   block_p: int | None = None, chunks: int | None = None) -> tuple[Tensor, Tensor]:
    """(sum_i c_i x_i + noise [P], norms [B]) for x [B, P]; both float32.

    ``chunks`` (column chunks per row in the norm pass) and ``block_p`` default to fixed
    rules; tests force them to cover several programs per row.
    """
    B, P = x.shape
    if P > MAX_COLUMNS:
        raise ValueError(f"per_example_grads has {P} columns; at most {MAX_COLUMNS} per call")
    if B > MAX_GRID_Y:
        raise ValueError(f"at most {MAX_GRID_Y} examples per call, got {B}: split the batch")
    block_p = block_p or (1024 if x.device.type == "cuda" else 4096)
    if chunks is None:
        # enough programs to fill the GPU in the norm pass; one per row elsewhere
        chunks = cdiv(4 * num_sms(x.device), max(B, 1)) if x.device.type == "cuda" else 1
    chunks = max(1, min(chunks, cdiv(P, block_p)))
    cols_per_program = cdiv(cdiv(P, chunks), block_p) * block_p

    partial = torch.empty((B, chunks), device=x.device, dtype=torch.float32)
    if B > 0:
        _row_sqnorm_kernel[(chunks, B)](x, partial, P, *x.stride(), cols_per_program, BLOCK_P=block_p)
    norms = partial.sum(dim=1).sqrt()

    out = torch.empty((P,), device=x.device, dtype=torch.float32)
    if P > 0:
        _clip_sum_kernel[(cdiv(P, block_p),)](
            x, norms, out, B, P, *x.stride(), float(max_grad_norm), seed, float(noise_std),
            ADD_NOISE=noise_std > 0, BLOCK_P=block_p,
        )
    return out, norms
