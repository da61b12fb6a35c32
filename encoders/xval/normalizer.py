"""Per-field value normalisation into [-clip, clip] (xVal's embedding saturates like x/√(1+x²)).

Fitted on the training split and stored in the shard manifest, so training, evaluation and
generation all use the same map. Two kinds per field:

* `affine`:  z = (v - mean) / std
* `signlog`: u = sign(v)·log1p(|v| / c) with c the median |v|, then z = (u - mean_u) / std_u —
  for fields spanning many orders of magnitude.

`spread` (default 1) multiplies z: the normalised training values then have that standard
deviation (the stored `std` is the field's std divided by it).

Values outside [-clip, clip] after the map are clipped (never wrapped) and counted. Fields seen
fewer than `min_count` times in training share one global fit (field index 0, name `_`).
Everything is float64; the model sees float32 of the result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from encoders.xval.numbers import UNNAMED_FIELD

Kind = Literal["affine", "signlog"]


@dataclass(frozen=True)
class FieldMap:
    kind: Kind
    mean: float
    std: float
    log_scale: float = 1.0
    """`c` of the sign-log map (median |v| of the field), 1 for affine."""

    def forward(self, values: np.ndarray) -> np.ndarray:
        if self.kind == "signlog":
            values = np.sign(values) * np.log1p(np.abs(values) / self.log_scale)
        return (values - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        u = z * self.std + self.mean
        if self.kind == "signlog":
            return np.sign(u) * self.log_scale * np.expm1(np.abs(u))
        return u


def _fit_map(values: np.ndarray, kind: Kind, spread: float = 1.0) -> FieldMap:
    """The field's map, scaled so that its training values have standard deviation `spread`."""
    values = np.asarray(values, dtype=np.float64)
    log_scale = 1.0
    if kind == "signlog":
        magnitudes = np.abs(values)
        median = float(np.median(magnitudes)) if len(values) else 0.0
        # A median so small (subnormal) that the largest value divided by it overflows would
        # turn the fit into inf/NaN: such a field is scaled by 1 instead.
        with np.errstate(over="ignore"):
            usable = median > 0 and np.isfinite(median) and np.isfinite(magnitudes.max() / median)
        log_scale = median if usable else 1.0
        values = np.sign(values) * np.log1p(np.abs(values) / log_scale)
    mean = float(values.mean()) if len(values) else 0.0
    std = float(values.std()) if len(values) > 1 else 0.0
    if not std > 0 or not np.isfinite(std):
        std = 1.0  # a constant field: shift only
    return FieldMap(kind, mean, std / spread, log_scale)


class Normalizer:
    """Field name ↔ index and one `FieldMap` per index (index 0 = the global fit, name `_`)."""

    def __init__(self, fields: Sequence[str], maps: Sequence[FieldMap], clip: float = 5.0) -> None:
        if len(fields) != len(maps) or not fields or fields[0] != UNNAMED_FIELD:
            raise ValueError("fields and maps must have the same length, with the global '_' first")
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.fields = list(fields)
        self.maps = list(maps)
        self.clip = float(clip)
        self._index = {name: i for i, name in enumerate(self.fields)}

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        values: np.ndarray,
        fields: Sequence[str],
        *,
        kind: Kind = "affine",
        per_field: bool = True,
        min_count: int = 20,
        max_fields: int = 1024,
        clip: float = 5.0,
        spread: float = 1.0,
    ) -> Normalizer:
        """Fit on training values with their field names (equal length sequences); `spread` is
        the standard deviation of the normalised training values (1: z-scores)."""
        if not spread > 0:
            raise ValueError(f"spread must be > 0, got {spread}")
        values = np.asarray(values, dtype=np.float64)
        if len(values) != len(fields):
            raise ValueError(f"{len(values)} values but {len(fields)} field names")
        names = [UNNAMED_FIELD]
        maps = [_fit_map(values, kind, spread)]
        if per_field:
            counts = Counter(fields)
            keep = [
                name
                for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                if count >= min_count and name != UNNAMED_FIELD
            ][: max_fields - 1]
            field_array = np.asarray(fields, dtype=object)
            for name in sorted(keep):
                names.append(name)
                maps.append(_fit_map(values[field_array == name], kind, spread))
        return cls(names, maps, clip)

    # ------------------------------------------------------------------ use

    def field_ids(self, names: Iterable[str]) -> np.ndarray:
        """Indices of field names; names without their own fit map to the global fit (0)."""
        return np.asarray([self._index.get(name, 0) for name in names], dtype=np.int16)

    def transform(self, values: np.ndarray, field_ids: np.ndarray) -> tuple[np.ndarray, int]:
        """(normalised float64 values clipped to [-clip, clip], number of values clipped)."""
        out = self._per_field(values, field_ids, "forward")
        clipped = int(np.count_nonzero(np.abs(out) > self.clip))
        return np.clip(out, -self.clip, self.clip), clipped

    def inverse(self, z: np.ndarray, field_ids: np.ndarray) -> np.ndarray:
        """Values in the original units (float64)."""
        return self._per_field(z, field_ids, "inverse")

    def _per_field(self, values: np.ndarray, field_ids: np.ndarray, direction: str) -> np.ndarray:
        """Each value through its field's map, `direction` "forward" or "inverse" (float64)."""
        values = np.asarray(values, dtype=np.float64)
        field_ids = np.asarray(field_ids)
        out = np.empty_like(values)
        for fid in np.unique(field_ids):
            sel = field_ids == fid
            out[sel] = getattr(self.maps[int(fid)], direction)(values[sel])
        return out

    # ------------------------------------------------------------------ storage (manifest)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; field order is the index order (ids stored in shards refer to it)."""
        fields = [{"name": name, **asdict(m)} for name, m in zip(self.fields, self.maps, strict=True)]
        return {"clip": self.clip, "fields": fields}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalizer:
        entries = [dict(entry) for entry in data["fields"]]
        names = [entry.pop("name") for entry in entries]
        return cls(names, [FieldMap(**entry) for entry in entries], float(data.get("clip", 5.0)))
