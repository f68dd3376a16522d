"""Randomness of DP-SGD: generators seeded from OS entropy, and a secure Gaussian.

Two sources of standard normal noise for the engine:

- the default: a torch generator whose whole state comes from the OS entropy pool (fast; the
  state never leaves the process and is never written to disk). Not ``manual_seed`` from a random
  number on a CPU: torch's CPU generator (mt19937) keeps 32 bits of a seed, and 2^32 candidate
  noise streams can be searched in hours, which would take the noise back off a released gradient;
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


# torch's CPU generator state (aten CPUGeneratorImplState): the_initial_seed u64, left i32, seeded i32,
# next u64, state[624] u64 (32-bit words), normal_x/y/rho f64, normal_is_valid i32 (+4), then a cached
# float normal f32 and its valid flag (+3)
_MT_WORDS, _MT_STATE_BYTES = 624, 5056
_INITIAL_SEED, _LEFT, _SEEDED, _NEXT = slice(0, 8), slice(8, 12), slice(12, 16), slice(16, 24)
_WORDS = slice(24, 24 + 8 * _MT_WORDS)
_NORMAL_VALID, _FLOAT_NORMAL_VALID = slice(5040, 5044), 5052


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` whose state comes from the OS entropy pool: on a CPU all of
    mt19937's state (19,937 bits; ``manual_seed`` would keep 32 bits of any seed), on CUDA a 64-bit
    Philox seed (what that generator has). ``initial_seed()`` is random too and says nothing of the
    state: nothing can be derived from it. Raises RuntimeError when this torch's CPU generator state
    does not have the layout written here (never falls back to a weaker seed)."""
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type != "cpu":
        return generator.manual_seed(secrets.randbits(64))
    state = generator.get_state().numpy().copy()
    if state.size != _MT_STATE_BYTES:
        raise RuntimeError(f"torch {torch.__version__}: the CPU generator state has {state.size} bytes, not "
                           f"{_MT_STATE_BYTES}: cannot fill it from OS entropy")
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype=np.uint32).astype(np.uint64)
    state[_WORDS] = words.view(np.uint8)
    state[_INITIAL_SEED] = np.frombuffer(os.urandom(8), dtype=np.uint8)
    state[_LEFT] = np.array([1], dtype=np.int32).view(np.uint8)  # twist the new words before the first draw
    state[_SEEDED] = np.array([1], dtype=np.int32).view(np.uint8)
    state[_NEXT] = 0
    state[_NORMAL_VALID] = 0  # no normal cached from the old state
    state[_FLOAT_NORMAL_VALID] = 0
    generator.set_state(torch.from_numpy(state))
    if not np.array_equal(generator.get_state().numpy()[_WORDS], state[_WORDS]):
        raise RuntimeError(f"torch {torch.__version__}: the CPU generator did not take the state from OS entropy")
    return generator


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
