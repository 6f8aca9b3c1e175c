"""Stable 64-bit hashing, vectorized over numpy arrays.

Everything that must agree across processes and machines (row initialization, slot
routing, admission sketches) hashes through here; Python's ``hash()`` is salted per
process and is never used for those.
"""

from __future__ import annotations

import hashlib

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)


def as_u64(ids: np.ndarray) -> np.ndarray:
    """View int64 ids as uint64 without copying (two's complement bits)."""
    return ids.view(np.uint64) if ids.dtype == np.int64 else ids.astype(np.int64).view(np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective, well-mixed uint64 -> uint64 map. Returns a new array."""
    if np.ndim(x) == 0:  # scalar arithmetic warns on wrap-around; array arithmetic never
        with np.errstate(over="ignore"):
            return mix64(np.asarray(x).reshape(1))[0]
    # (No errstate on the array path: entering it costs ~3 us, as much as the hashing of
    # a small batch, and uint64 array multiplies wrap silently.)
    z = x ^ (x >> _S30)
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def fast_hash(x: np.ndarray) -> np.ndarray:
    """Cheap hash for hash-table probing: fold the high word in, then Fibonacci-multiply.

    Callers take the *top* bits of the result, which depend on every input bit.
    """
    if np.ndim(x) == 0:
        with np.errstate(over="ignore"):
            return fast_hash(np.asarray(x).reshape(1))[0]
    z = x ^ (x >> _S32)
    z *= GOLDEN
    return z


def stable_hash64(text: str) -> int:
    """A process-independent 64-bit hash of a string (for table names, feature salts)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def seed_key(*parts: int | str) -> np.uint64:
    """Combine names and integers into one uint64 seed, stably."""
    return np.uint64(stable_hash64("\x1f".join(str(p) for p in parts)))
