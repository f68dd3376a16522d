"""Seeds for the Gaussian noise of DP-SGD.

The noise must be fresh at every logical step and differ between parameter shards
(the same noise on two shards, or on two ranks, mis-noises the update). A run keeps
one secret base seed and derives the seed of each (step, shard) from it; without a
base seed every call draws a fresh seed from OS entropy.
"""
from __future__ import annotations

import hashlib
import secrets

SEED_BITS = 63  # Philox takes a 64-bit key; 63 bits keep it a non-negative int64 kernel argument


def fresh_seed() -> int:
    """A seed from OS entropy (the default when the caller gives none)."""
    return secrets.randbits(SEED_BITS)


def derive_seed(base_seed: int, *stream: int) -> int:
    """Seed of one noise stream, e.g. ``derive_seed(run_seed, step, shard)``.

    A keyed hash, so streams that differ in any component are unrelated, and the
    base seed cannot be read back from a derived one.
    """
    if not 0 <= base_seed < 2**256:
        raise ValueError(f"base_seed must be in [0, 2**256), got {base_seed}")
    if any(not 0 <= part < 2**64 for part in stream):
        raise ValueError(f"stream components must be in [0, 2**64), got {stream}")
    message = b"".join(int(part).to_bytes(8, "little") for part in stream)
    key = int(base_seed).to_bytes(32, "little")
    digest = hashlib.blake2b(message, key=key, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def check_seed(seed: int | None) -> int:
    """``seed`` as a valid Philox key, or a fresh one from OS entropy when None."""
    if seed is None:
        return fresh_seed()
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**SEED_BITS:
        raise ValueError(f"seed must be in [0, 2**{SEED_BITS}), got {seed}")
    return seed
