"""Member bytes <-> values. `.npy` headers are parsed once per distinct header and cached, and
array data is viewed in place with `np.frombuffer` (np.load's per-call cost dominates small
samples: the 4 KiB rows of benchmarks/RESULTS.md). Nothing here ever unpickles.
"""

from __future__ import annotations

import ast
import io
import json
import math
from typing import Any

import numpy as np

from foundation.data.schema import ARRAY_DTYPE_KINDS, FieldSpec
from foundation.errors import DataError

NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 10000
"""Longest `.npy` header parsed (numpy's own default limit): the header is a Python literal."""
MAX_NPY_DIMS = 64
"""Most dimensions an array may have (numpy's limit)."""


def encode(spec: FieldSpec, value: Any) -> bytes:
    """The member payload for a value already checked against `spec` (see schema.prepare_value)."""
    if spec.kind == "npy":
        stream = io.BytesIO()
        np.lib.format.write_array(stream, value, version=(1, 0), allow_pickle=False)
        return stream.getvalue()
    if spec.kind == "str":
        return value.encode("utf-8")
    # scalar and json
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"value {str(value)[:80]!r} is not JSON-serialisable ({exc}); store arrays as separate npy fields"
        ) from None


class NpyHeader:
    """Parsed `.npy` header: dtype, shape, order and where the data starts (relative to the member)."""

    __slots__ = ("dtype", "shape", "fortran", "data_offset", "nbytes", "native")

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, data_offset: int):
        self.dtype = dtype
        self.shape = shape
        self.fortran = fortran
        self.data_offset = data_offset
        self.nbytes = math.prod(shape) * dtype.itemsize  # exact (Python ints): checked against the member
        self.native = dtype.isnative or dtype.itemsize == 1


_HEADER_CACHE: dict[bytes, NpyHeader] = {}
_HEADER_CACHE_MAX = 4096


def _parse_npy_header(raw: bytes, data_offset: int) -> NpyHeader:
    """The header dict, checked field by field before anything is sized from it."""
    try:
        text = raw.decode("latin1")
        meta = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("unreadable .npy header") from None
    if not isinstance(meta, dict) or set(meta) != {"descr", "fortran_order", "shape"}:
        raise ValueError("malformed .npy header (needs exactly descr, fortran_order and shape)")
    descr, fortran, shape = meta["descr"], meta["fortran_order"], meta["shape"]
    if not isinstance(descr, str):
        raise ValueError(f"structured .npy dtype {descr!r} is not supported")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"unknown .npy dtype {descr[:40]!r}") from None
    if dtype.kind not in ARRAY_DTYPE_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype:
        raise ValueError(f".npy dtype {descr[:40]!r} is not numeric (object arrays need pickle; refused)")
    if not isinstance(fortran, bool):
        raise ValueError(f".npy fortran_order {fortran!r} is not True or False")
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_NPY_DIMS
        or not all(type(d) is int and 0 <= d < 2**63 for d in shape)
    ):
        raise ValueError(
            f".npy shape {str(shape)[:80]} is not a tuple of at most {MAX_NPY_DIMS} non-negative int64 sizes"
        )
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2**63:  # numpy's limit, even at size 0
        raise ValueError(f".npy shape {str(shape)[:80]} is too large for any array")
    return NpyHeader(dtype, shape, fortran, data_offset)


def npy_header(buf, offset: int, size: int) -> NpyHeader:
    """Header of the `.npy` member at buf[offset:offset+size]; ValueError if it is not sane."""
    if size < 10 or buf[offset : offset + 6] != NPY_MAGIC:
        raise ValueError("not a .npy file (bad magic)")
    major = buf[offset + 6]
    if major == 1:
        start = offset + 10
        hlen = int.from_bytes(buf[offset + 8 : offset + 10], "little")
    elif major in (2, 3):
        start = offset + 12
        hlen = int.from_bytes(buf[offset + 8 : offset + 12], "little")
    else:
        raise ValueError(f"unsupported .npy version {major}")
    if hlen > MAX_NPY_HEADER:
        raise ValueError(f".npy header of {hlen} bytes (more than {MAX_NPY_HEADER})")
    if start + hlen > offset + size:
        raise ValueError(".npy header runs past the member")
    raw = buf[offset : start + hlen]
    raw = raw if isinstance(raw, bytes) else bytes(raw)
    header = _HEADER_CACHE.get(raw)
    if header is None:
        header = _parse_npy_header(raw[start - offset :], start + hlen - offset)
        if len(_HEADER_CACHE) >= _HEADER_CACHE_MAX:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[raw] = header
    if header.data_offset + header.nbytes != size:
        raise ValueError(
            f".npy header announces {header.nbytes} data bytes but the member holds "
            f"{size - header.data_offset}"
        )
    return header


def npy_view(buf, offset: int, header: NpyHeader) -> np.ndarray:
    """The array, viewing `buf` in place when possible (read-only), in native byte order."""
    count = header.nbytes // header.dtype.itemsize if header.dtype.itemsize else 0
    flat = np.frombuffer(buf, dtype=header.dtype, count=count, offset=offset + header.data_offset)
    if header.fortran:
        array = flat.reshape(header.shape[::-1]).transpose()
    else:
        array = flat.reshape(header.shape)
    if not header.native:
        array = array.astype(header.dtype.newbyteorder("="))
    return array


def npy_from_data(data, header: NpyHeader) -> np.ndarray:
    """The array over `data` (just the array bytes), in native byte order."""
    return npy_view(data, -header.data_offset, header)


def decode_text(data: bytes) -> str:
    return data.decode("utf-8")


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def decode_scalar(data: bytes, ext: str) -> Any:
    if ext in ("json", "jsn"):
        return json.loads(data)
    return int(data)
