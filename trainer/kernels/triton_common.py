"""Small Triton helpers shared by the kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_f32(x, y, acc, UPCAST: tl.constexpr):
    """acc + x @ y, accumulated in float32.

    UPCAST: convert both operands to float32 and multiply in true float32 ("ieee": no
    TF32 rounding). Otherwise the operands keep their 16-bit dtype, whose products are
    exact in float32, and run on the tensor cores.
    """
    if UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc)
