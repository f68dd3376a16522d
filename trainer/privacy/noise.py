"""Randomness of DP-SGD: generators seeded from OS entropy, and a secure Gaussian.

Two sources of standard normal noise for the engine:

- the default: a torch generator seeded once from the OS entropy pool (fast; the seed never
  leaves the process and is never written to disk);
- ``secure``: every draw comes from the OS CSPRNG (``os.urandom``), turned into normals by
  Box-Muller in float64, and each coordinate is the sum of 4 such normals divided by 2 (again
  N(0, 1)), as Opacus' secure mode does against floating-point attacks on the Gaussian
  mechanism (Holohan & Braghin 2021): the low-order bits of the released value no longer follow
  the sparse float grid of a single sample. It costs 32 bytes of CSPRNG output and 8 Box-Muller
  transforms per coordinate per step (``bench/bench_secure_noise.py`` measures it).
"""
from __future__ import annotations

import math
import os
import secrets

import numpy as np
import torch
from torch import Tensor


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from the OS entropy pool."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _csprng_uniform(n: int) -> np.ndarray:
    """``n`` float64 uniforms in (0, 1) (53 random bits each, never 0) from the OS CSPRNG."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * 2.0**-53


def secure_standard_normal(shape: tuple[int, ...] | torch.Size) -> Tensor:
    """float32 N(0, 1) of ``shape``: CSPRNG uniforms, Box-Muller in float64, sum of 4 draws / 2."""
    n = math.prod(shape)
    draws = 4 * n
    pairs = (draws + 1) // 2
    u = _csprng_uniform(2 * pairs)
    radius = np.sqrt(-2.0 * np.log(u[:pairs]))
    angle = 2.0 * np.pi * u[pairs:]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:draws]
    return torch.from_numpy((z.reshape(4, n).sum(axis=0) / 2.0).astype(np.float32)).reshape(tuple(shape))
