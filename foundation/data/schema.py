"""The sample schema: which fields a sample has, how each is stored, and how to check one.

A sample is a dict `{"__key__": str, field: value, ...}` whose values are one of four kinds:

- ``npy``    numeric numpy array (or numpy scalar, stored as a 0-d array); member ``<key>.<field>.npy``
- ``scalar`` Python bool / int / float; member ``<key>.<field>.json`` holding one JSON number or bool
- ``str``    text; member ``<key>.<field>.txt`` (UTF-8)
- ``json``   dict / list / None (JSON metadata); member ``<key>.<field>.json``

`shape` entries may be ``None`` for dimensions that vary between samples (token sequences).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from foundation.errors import DataError

KINDS = ("npy", "scalar", "str", "json")
#: Extension our writer uses for each kind.
WRITE_EXT = {"npy": "npy", "scalar": "json", "str": "txt", "json": "json"}
#: Extensions our reader accepts for each kind (the webdataset conventions).
READ_EXTS = {
    "npy": ("npy",),
    "scalar": ("json", "jsn", "cls", "cls2", "index", "inx", "id"),
    "str": ("txt", "text"),
    "json": ("json", "jsn"),
}
#: numpy dtype kinds we store: bool, signed/unsigned integers, floats, complex. Never objects.
ARRAY_DTYPE_KINDS = "biufc"
SCALAR_DTYPES = ("bool", "int64", "float64")

#: Dots, slashes, whitespace, and control or invisible formatting characters (NUL, C1 controls,
#: zero-width and bidirectional overrides such as U+202E, which make a key display as another).
_KEY_FORBIDDEN = re.compile(r"[./\\\s\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff]")
_FIELD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_INT64 = (-(2**63), 2**63 - 1)


def check_key(key: Any) -> str:
    """A sample key usable as a tar member prefix (no dots, slashes or whitespace)."""
    if not isinstance(key, str) or not key:
        raise DataError(f"sample key must be a non-empty string, got {key!r}")
    bad = _KEY_FORBIDDEN.search(key)
    if bad:
        raise DataError(
            f"sample key {key!r} contains {bad.group()!r}: keys may not contain dots, slashes, "
            "whitespace or control/invisible characters (the tar member name is <key>.<field>.<ext>); "
            "replace them, e.g. with '_' or '-'"
        )
    return key


def check_field_name(name: Any) -> str:
    if not isinstance(name, str) or not _FIELD_RE.match(name):
        raise DataError(
            f"field name {name!r} is not allowed: use letters, digits, '_' and '-' (no dots), "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class FieldSpec:
    """How one field is stored and what every sample's value must look like."""

    kind: str
    dtype: str | None = None
    """numpy dtype name (`float32`, `int64`, `bool`, ...) for npy and scalar fields; None otherwise."""
    shape: tuple[int | None, ...] | None = None
    """npy: array shape, None for a dimension that varies; scalar: (); str/json: None."""
    unit: str | None = None
    description: str | None = None
    optional: bool = False
    """True if samples may omit the field."""

    @property
    def ext(self) -> str:
        return WRITE_EXT[self.kind]

    @property
    def variable(self) -> bool:
        """True if some dimension varies between samples (the default collate cannot stack it)."""
        return self.shape is not None and any(d is None for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.shape is not None:
            out["shape"] = list(self.shape)
        for name in ("unit", "description"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.optional:
            out["optional"] = True
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FieldSpec:
        if not isinstance(data, Mapping):
            raise DataError(f"{where}: expected a mapping with 'kind', got {data!r}")
        unknown = set(data) - {"kind", "dtype", "shape", "unit", "description", "optional"}
        if unknown:
            raise DataError(f"{where}: unknown keys {sorted(unknown)}")
        kind = data.get("kind")
        if kind not in KINDS:
            raise DataError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        dtype = data.get("dtype")
        shape = data.get("shape")
        if kind == "npy":
            dtype = _array_dtype_name(dtype, where)
            if not isinstance(shape, (list, tuple)) or not all(
                d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape
            ):
                raise DataError(
                    f"{where}: 'shape' must be a list of non-negative ints or null, got {shape!r}"
                )
            shape = tuple(shape)
        elif kind == "scalar":
            if dtype not in SCALAR_DTYPES:
                raise DataError(f"{where}: scalar 'dtype' must be one of {SCALAR_DTYPES}, got {dtype!r}")
            if shape not in (None, [], ()):
                raise DataError(f"{where}: a scalar has shape [], got {shape!r}")
            shape = ()
        else:
            if dtype is not None or shape is not None:
                raise DataError(f"{where}: {kind} fields have no dtype or shape")
        for name in ("unit", "description"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise DataError(f"{where}: {name!r} must be a string")
        optional = data.get("optional", False)
        if not isinstance(optional, bool):
            raise DataError(f"{where}: 'optional' must be true or false")
        return cls(kind, dtype, shape, data.get("unit"), data.get("description"), optional)

    # ------------------------------------------------------------------ checking values

    def check_array_meta(self, dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
        """None if an array of this dtype and shape fits the field, else what is wrong."""
        if dtype.name != self.dtype:
            return f"dtype {dtype.name}, schema says {self.dtype}"
        assert self.shape is not None
        if len(shape) != len(self.shape) or any(
            want is not None and want != got for want, got in zip(self.shape, shape, strict=True)
        ):
            return f"shape {list(shape)}, schema says {_shape_str(self.shape)}"
        return None

    def check_scalar(self, value: Any) -> str | None:
        if self.dtype == "bool":
            ok = isinstance(value, bool)
        elif self.dtype == "int64":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"value {value!r} is not a {self.dtype} scalar"


def _shape_str(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def _array_dtype_name(dtype: Any, where: str) -> str:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DataError(f"{where}: unknown dtype {dtype!r}") from None
    if dtype is None or dt.kind not in ARRAY_DTYPE_KINDS or dt.fields is not None:
        raise DataError(
            f"{where}: dtype {dtype!r} is not storable; arrays must be bool, integer, float or complex"
        )
    return dt.name


def describe_shape(spec: FieldSpec) -> str:
    return _shape_str(spec.shape) if spec.shape is not None else "-"


# ----------------------------------------------------------------------------- inference


def prepare_value(field: str, value: Any, key: str) -> tuple[FieldSpec, Any]:
    """(spec inferred from this one value, normalised value) for a value about to be written.

    Arrays come back C-contiguous and little-endian; numpy scalars become 0-d arrays.
    """
    where = f"sample {key!r} field {field!r}"
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        dt = value.dtype
        if dt.kind not in ARRAY_DTYPE_KINDS or dt.fields is not None:
            hint = " (object arrays would need pickle, which shards never use)" if dt.kind == "O" else ""
            raise DataError(
                f"{where}: arrays of dtype {dt} cannot be stored{hint}; use a numeric or bool array, "
                "a str field for text, or a JSON field for metadata"
            )
        if dt.byteorder == ">" or (dt.byteorder == "=" and not _LITTLE):
            value = value.astype(dt.newbyteorder("<"))
        if not value.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            value = value.copy(order="C")
        return FieldSpec("npy", value.dtype.name, tuple(value.shape)), value
    if isinstance(value, bool):
        return FieldSpec("scalar", "bool", ()), value
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise DataError(f"{where}: integer {value} does not fit in int64; store it as a string")
        return FieldSpec("scalar", "int64", ()), value
    if isinstance(value, float):
        return FieldSpec("scalar", "float64", ()), value
    if isinstance(value, str):
        return FieldSpec("str"), value
    if value is None or isinstance(value, (dict, list, tuple)):
        return FieldSpec("json"), value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise DataError(f"{where}: raw bytes are not a storable value; decode them into an array or a string")
    if _is_torch_tensor(value):
        raise DataError(f"{where}: got a torch tensor; pass `tensor.numpy()` (shards store numpy arrays)")
    raise DataError(
        f"{where}: values of type {type(value).__name__} cannot be stored; "
        "use numpy arrays, bool/int/float, str, or JSON-compatible dict/list"
    )


_LITTLE = np.little_endian


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "numpy")


def merge_spec(old: FieldSpec, new: FieldSpec, field: str, key: str) -> FieldSpec:
    """The spec covering both: array dimensions that differ become None. Kinds/dtypes must match."""
    where = f"sample {key!r} field {field!r}"
    if old.kind != new.kind:
        raise DataError(f"{where}: is a {new.kind} value but earlier samples have {old.kind} values")
    if old.kind == "npy":
        assert old.shape is not None and new.shape is not None
        if old.dtype != new.dtype:
            raise DataError(
                f"{where}: dtype {new.dtype} differs from earlier samples ({old.dtype}); "
                "convert with .astype() so the field has one dtype"
            )
        if len(old.shape) != len(new.shape):
            raise DataError(
                f"{where}: has {len(new.shape)} dimensions, earlier samples have {len(old.shape)} "
                f"({_shape_str(old.shape)})"
            )
        shape = tuple(a if a == b else None for a, b in zip(old.shape, new.shape, strict=True))
        return replace(old, shape=shape) if shape != old.shape else old
    if old.kind == "scalar" and old.dtype != new.dtype:
        if {old.dtype, new.dtype} == {"int64", "float64"}:
            return replace(old, dtype="float64")
        raise DataError(f"{where}: {new.dtype} scalar, earlier samples have {old.dtype}")
    return old


def check_value_against(spec: FieldSpec, value: Any, field: str, key: str) -> Any:
    """Check a value about to be written against a declared spec; returns the normalised value."""
    inferred, value = prepare_value(field, value, key)
    where = f"sample {key!r} field {field!r}"
    if spec.kind == "scalar" and inferred.kind == "scalar":
        problem = spec.check_scalar(value)
        if problem:
            raise DataError(f"{where}: {problem}")
        return float(value) if spec.dtype == "float64" else value
    if inferred.kind != spec.kind:
        raise DataError(f"{where}: is a {inferred.kind} value, the schema declares {spec.kind}")
    if spec.kind == "npy":
        problem = spec.check_array_meta(value.dtype, value.shape)
        if problem:
            raise DataError(f"{where}: {problem}")
    return value
