"""Raw feature values -> int64 ids and dense inputs, exactly as training reads them.

Training (:mod:`recps.worker.data`) and online ranking (:mod:`recps.serving`) both call
these, so a served request hashes to the same rows the model was trained on. Only numpy
and pyarrow.

**Ids.** Integer ids (any integer column) map to ``mix64(mix64(x) ^ salt(feature))``, a
bijection per feature: distinct raw ids of one feature never collide. A string value of
1..16 hex digits is read as that integer first (Criteo's categoricals are 8 hex digits), so
``"68fd1e64"`` in a TSV and ``0x68fd1e64`` in an int64 Parquet column give the same id;
case and leading zeros are therefore ignored. Any other string hashes its bytes (a domain
that is separate from the integers). Null and the empty string are "missing": one id per
feature. :func:`reference_hash` is the readable one-value version; the vectorized
:func:`hash_column` must agree with it.

**Dense values** become ``log1p(max(x, 0))`` as float32; null, NaN and inf -> 0
(:func:`dense_transform`).

Example:
    >>> import pyarrow as pa
    >>> ids = hash_column(pa.array(["68fd1e64", None]), "C1")
    >>> int(ids[0]) == reference_hash(0x68FD1E64, "C1"), int(ids[1]) == missing_id("C1")
    (True, True)
    >>> dense_transform(np.array([[0.0, np.e - 1, -3.0, np.nan]])).round(3).tolist()
    [[0.0, 1.0, 0.0, 0.0]]
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recps.embedding.errors import DtypeError
from recps.embedding.hashing import GOLDEN, mix64, stable_hash64

HASH_SCHEME = "recps-mix64-v1"  # recorded in exported models; bump if the scheme changes


def dense_transform(values: np.ndarray) -> np.ndarray:
    """``log1p(max(x, 0))`` as float32, non-finite values as 0: the reader's dense transform."""
    x = np.asarray(values, dtype=np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)


_U64 = np.uint64
_MISSING_TAG = _U64(stable_hash64("recps.data.missing"))
_BYTES_TAG = _U64(stable_hash64("recps.data.bytes"))
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i
_MASK64 = 0xFFFFFFFFFFFFFFFF
_LANE_HIGH = _U64(0xFF00FF00FF00FF00)
_BYTE = _U64(0xFF)
# Two ASCII bytes read as one little-endian uint16 -> their hex value (0..255), or 0x100.
_lo, _hi = np.meshgrid(np.arange(256), np.arange(256), indexing="xy")  # _lo = first char
_HEX_PAIR_LUT = (
    np.where(
        (_HEX_LUT[_lo] < 16) & (_HEX_LUT[_hi] < 16),
        (_HEX_LUT[_lo].astype(np.uint16) << 4) | _HEX_LUT[_hi],
        0x100,
    )
    .astype(np.uint16)
    .ravel()
)
del _lo, _hi


@functools.lru_cache(maxsize=65536)
def feature_salt(feature: str) -> np.uint64:
    """The per-feature salt: ``stable_hash64(feature)``.

    >>> int(feature_salt("C1")) == stable_hash64("C1")
    True
    """
    return _U64(stable_hash64(feature))


def hash_int_ids(values: np.ndarray, feature: str) -> np.ndarray:
    """Salted ids of integer values: ``mix64(mix64(x) ^ salt)`` as int64; bijective per feature.

    >>> a = hash_int_ids(np.array([0, 1, 1]), "C1")
    >>> a.dtype, bool(a[1] == a[2]), bool(a[0] == hash_int_ids(np.array([0]), "C2")[0])
    (dtype('int64'), True, False)
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise DtypeError("ids", values.dtype, "an integer dtype")
    x = values.astype(np.uint64) if values.dtype == np.uint64 else values.astype(np.int64)
    return _salted_ints(x.view(np.uint64), feature_salt(feature)).view(np.int64)


def hash_int_columns(values: np.ndarray, features: list[str]) -> np.ndarray:
    """:func:`hash_int_ids` of several integer columns at once: ``values[k]`` of
    ``features[k]``; one vectorized pass instead of one per feature.

    >>> v = np.array([[1, 2], [1, 2]])
    >>> out = hash_int_columns(v, ["C1", "C2"])
    >>> bool((out[0] == hash_int_ids(v[0], "C1")).all()), bool(out[0, 0] != out[1, 0])
    (True, True)
    """
    x = np.ascontiguousarray(values, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] != len(features):
        raise DtypeError("values", x.shape, f"a [{len(features)}, n] integer array")
    salts = np.array([feature_salt(f) for f in features], dtype=np.uint64)[:, None]
    return _salted_ints(x.view(np.uint64), salts).view(np.int64)


def missing_id(feature: str) -> int:
    """The id that null and empty values of ``feature`` map to."""
    return int(np.array(_missing(feature_salt(feature))).view(np.int64))


def reference_hash(value: int | str | bytes | None, feature: str) -> int:
    """Readable one-value reference of the id scheme; :func:`hash_column` must agree.

    >>> reference_hash("00ff", "C3") == reference_hash(255, "C3") == reference_hash("FF", "C3")
    True
    >>> reference_hash(None, "C3") == reference_hash("", "C3") == missing_id("C3")
    True
    """
    salt = int(feature_salt(feature))

    def mix(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        return z ^ (z >> 31)

    def signed(u: int) -> int:
        return u - (1 << 64) if u >= 1 << 63 else u

    if value is None or value in ("", b""):
        return signed(mix(salt ^ int(_MISSING_TAG)))
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        if len(value) <= 16 and all(c in b"0123456789abcdefABCDEF" for c in value):
            value = int(value, 16)
        else:
            acc = 0
            for k in range(0, len(value), 8):
                word = int.from_bytes(value[k : k + 8].ljust(8, b"\0"), "little")
                acc = (acc + mix(word + (k // 8 + 1) * int(GOLDEN) & _MASK64)) & _MASK64
            acc = mix(acc ^ (len(value) * int(GOLDEN) & _MASK64))
            return signed(mix(acc ^ salt ^ int(_BYTES_TAG)))
    return signed(mix(mix(int(value) & _MASK64) ^ salt))


def hash_column(array: pa.Array | pa.ChunkedArray, feature: str) -> np.ndarray:
    """int64 ids of one categorical column: integers, strings/binary or dictionary-encoded.

    >>> hash_column(pa.array(["68fd1e64", None]), "C1").tolist() == [
    ...     reference_hash(0x68FD1E64, "C1"), missing_id("C1")]
    True
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    salt = feature_salt(feature)
    t = array.type
    if pa.types.is_null(t):  # a column with no values at all
        return np.full(len(array), _missing(salt), dtype=np.uint64).view(np.int64)
    if pa.types.is_dictionary(t):
        codes = hash_column(array.dictionary, feature)
        out = codes[pc.fill_null(array.indices, 0).to_numpy(zero_copy_only=False)]
        if array.null_count:
            out[array.is_null().to_numpy(zero_copy_only=False)] = _missing(salt).view(np.int64)
        return out
    if pa.types.is_integer(t):
        x = pc.fill_null(array, 0).to_numpy(zero_copy_only=False)
        x = x.view(np.uint64) if x.dtype == np.uint64 else x.astype(np.int64).view(np.uint64)
        out = _salted_ints(x, salt)
        if array.null_count:
            out[array.is_null().to_numpy(zero_copy_only=False)] = _missing(salt)
        return out.view(np.int64)
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return _hash_strings(array, salt, np.int32).view(np.int64)
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return _hash_strings(array, salt, np.int64).view(np.int64)
    if str(t) in ("string_view", "binary_view"):  # pyarrow >= 16
        return hash_column(array.cast(pa.large_binary()), feature)
    raise DtypeError(f"categorical column {feature!r}", t, "an integer, string or binary type")


def _salted_ints(x: np.ndarray, salt: np.uint64) -> np.ndarray:
    z = mix64(x)
    z ^= salt
    return mix64(z)


def _missing(salt: np.uint64) -> np.uint64:
    return mix64(np.array([salt ^ _MISSING_TAG]))[0]


def _hash_strings(array: pa.Array, salt: np.uint64, offset_dtype: type) -> np.ndarray:
    n = len(array)
    bufs = array.buffers()
    width = np.dtype(offset_dtype).itemsize
    offsets = np.frombuffer(bufs[1], offset_dtype, count=n + 1, offset=array.offset * width)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    if len(data) == 0:
        data = np.zeros(1, np.uint8)  # every value is empty or null; keeps np.take in bounds
    starts = offsets[:-1].astype(np.int64)
    ends = offsets[1:].astype(np.int64)
    lengths = ends - starts
    out = np.full(n, _missing(salt), dtype=np.uint64)
    present = lengths > 0
    if array.null_count:
        present &= array.is_valid().to_numpy(zero_copy_only=False)

    is_hex = np.zeros(n, dtype=bool)
    if np.all((lengths == 0) | (lengths == 8)):
        # Criteo's case: 8 hex digits or empty, so the 8-byte values lie back to back.
        rows8 = np.flatnonzero(lengths == 8)
        base = int(offsets[0])
        # Each pair of hex digits -> one byte via a 64 Ki-entry table (0x100 marks non-hex).
        pairs = data[base : base + 8 * len(rows8)].view("<u2")
        t = np.take(_HEX_PAIR_LUT, pairs).view("<u8")  # 4 byte values in 16-bit lanes
        ok = ((t & _LANE_HIGH) == 0) & present[rows8]
        values = (t & _BYTE) << _U64(24) | (t >> _U64(16) & _BYTE) << _U64(16)
        values |= (t >> _U64(32) & _BYTE) << _U64(8) | t >> _U64(48) & _BYTE
        out[rows8[ok]] = _salted_ints(values[ok], salt)
        is_hex[rows8[ok]] = True
        short = np.zeros(0, dtype=np.int64)
    else:
        short = np.flatnonzero(present & (lengths <= 16))
    if len(short):
        # 1..16 hex digits, right-aligned into 16 nibbles, packed into 8 big-endian bytes.
        cols = np.arange(16, dtype=np.int64)
        used = cols[None, :] >= (16 - lengths[short])[:, None]
        raw = _HEX_LUT[np.take(data, ends[short][:, None] - 16 + cols[None, :], mode="clip")]
        ok = ~np.any(used & (raw == 255), axis=1)
        nib = np.where(used, raw, 0).astype(np.uint8)
        packed = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2])
        values = packed.view(">u8").ravel().astype(np.uint64)
        rows = short[ok]
        out[rows] = _salted_ints(values[ok], salt)
        is_hex[rows] = True

    # Generic path: sum of position-keyed mixes of the 8-byte little-endian words.
    rows = np.flatnonzero(present & ~is_hex)
    if len(rows):
        lens = lengths[rows]
        nwords = (lens + 7) // 8
        first = np.concatenate(([0], np.cumsum(nwords)[:-1]))
        word_row = np.repeat(np.arange(len(rows)), nwords)
        k = np.arange(int(nwords.sum()), dtype=np.int64) - first[word_row]
        pos = (starts[rows][word_row] + 8 * k)[:, None] + np.arange(8)
        inside = (8 * k)[:, None] + np.arange(8) < lens[word_row][:, None]
        words = np.where(inside, np.take(data, pos, mode="clip"), 0).astype(np.uint8)
        words = np.ascontiguousarray(words).view("<u8").ravel().astype(np.uint64)
        with np.errstate(over="ignore"):
            acc = np.add.reduceat(mix64(words + (k.astype(np.uint64) + _U64(1)) * GOLDEN), first)
            acc = mix64(acc ^ (lens.astype(np.uint64) * GOLDEN))
        out[rows] = mix64(acc ^ salt ^ _BYTES_TAG)
    return out
