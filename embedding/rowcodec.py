"""The fixed binary layout of a stored row, and of its RocksDB key.

Value (little-endian, packed): ``embedding[dim] (f32|f16) | opt_state[w] f32 |
updated_at f64 (unix seconds) | count i64 (updates applied)``.

Key: 8 bytes big-endian of ``id XOR 2**63``, so RocksDB's bytewise order is the
numeric order of the signed ids (sorted SST export for free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SIGN = np.uint64(1 << 63)


def encode_keys(ids: np.ndarray) -> list[bytes]:
    # Each 8-byte void item becomes one bytes object in C (no per-key Python slicing;
    # unlike "S8", void items keep trailing zero bytes).
    return (ids.view(np.uint64) ^ _SIGN).astype(">u8").view("V8").tolist()


def decode_keys(keys: list[bytes]) -> np.ndarray:
    raw = np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64)
    return (raw ^ _SIGN).view(np.int64)


@dataclass(frozen=True)
class RowCodec:
    dim: int
    emb_dtype: str  # "float32" | "float16"
    state_width: int

    @property
    def dtype(self) -> np.dtype:
        emb = "<f4" if self.emb_dtype == "float32" else "<f2"
        return np.dtype(
            [
                ("emb", emb, (self.dim,)),
                ("state", "<f4", (self.state_width,)),
                ("updated_at", "<f8"),
                ("count", "<i8"),
            ]
        )

    @property
    def record_bytes(self) -> int:
        return self.dtype.itemsize

    def pack(
        self, emb: np.ndarray, state: np.ndarray, updated_at: np.ndarray, count: np.ndarray
    ) -> list[bytes]:
        rec = np.empty(len(emb), dtype=self.dtype)
        rec["emb"] = emb
        rec["state"] = state
        rec["updated_at"] = updated_at
        rec["count"] = count
        return rec.view(np.dtype((np.void, self.record_bytes))).tolist()

    def unpack(self, values: list[bytes]) -> np.ndarray:
        """Decode values into a structured array with fields emb/state/updated_at/count."""
        if not values:
            return np.empty(0, dtype=self.dtype)
        return np.frombuffer(b"".join(values), dtype=self.dtype)
