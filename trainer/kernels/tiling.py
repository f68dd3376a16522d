"""Block sizes for the kernels (fixed rules: no autotuning, which the interpreter lacks)."""
from __future__ import annotations


def cdiv(n: int, d: int) -> int:
    return -(-n // d)


def block_for_length(n: int, choices: tuple[int, ...] = (64, 32, 16)) -> int:
    """The largest block (from ``choices``, descending) whose padding of a length-n loop
    wastes at most 1/8 of the work; the smallest one when none does (e.g. n = 1).

    Blocks stay >= 16 because tl.dot needs every dimension >= 16 on GPUs.
    """
    for block in choices:
        if cdiv(n, block) * block - n <= n / 8:
            return block
    return choices[-1]


def launch_options(accumulators: int) -> dict[str, int]:
    """num_warps for a program holding ``accumulators`` float32 values in registers.

    Eight warps from 8192 values on: with four, such programs use all 255 registers per
    thread and spill (checked with ptxas for sm_90).
    """
    return {"num_warps": 8 if accumulators >= 8192 else 4}
