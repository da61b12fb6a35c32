"""Per-field summaries of a shard set and the rules that call a field degenerate.

A pipeline that silently destroys its input (a mask read with the opposite meaning zeroes every
pixel; a wrong column gives a constant) must not end with "wrote N samples". The writer keeps,
per numeric field and split, the streaming statistics below (`RunningStats`, stored in the
manifest's `splits.<split>.field_stats`); `degenerate_reason` judges them and
`format_field_summary` prints them. The rules are in docs/shards.md ("Field summary").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from foundation.data.schema import FieldSpec
from foundation.errors import DataError

#: A field whose (finite) elements are at least this share exactly zero is "all zeros".
ZERO_LIMIT = 0.99
#: A field whose elements are at least this share masked is "all masked".
MASKED_LIMIT = 0.99
#: A field whose elements are more than this share NaN/inf is "mostly non-finite".
NONFINITE_LIMIT = 0.5
#: Mask meanings: the companion marks bad elements (True = bad), good ones (True = good), or is
#: a weight such as an inverse variance (<= 0 or non-finite = bad).
MASK_MEANINGS = ("bad", "good", "weight")

_DEFAULT_CAUSES = {
    "nonfinite": "the source stores NaN/inf as fill values, or values overflowed while converting",
    "masked": "the mask is read with the opposite meaning (True = clean vs True = bad), or every "
    "element is flagged in the source",
    "zeros": "a mask read with the opposite meaning zeroed the data, the wrong column or data set was "
    "read, or the source holds no signal",
    "constant": "the wrong column or data set was read, or the source holds a fill value",
}


class DegenerateDataError(DataError):
    """A prepared field came out all zeros, all masked, constant or mostly non-finite."""


class RunningStats:
    """Streaming element statistics of one numeric field: finite count/mean/std/min/max (Chan et al.
    pairwise update), non-finite, zero and masked element counts."""

    __slots__ = ("count", "nonfinite", "zeros", "masked", "mean", "m2", "min", "max")

    def __init__(self) -> None:
        self.count = 0
        self.nonfinite = 0
        self.zeros = 0
        self.masked = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    @classmethod
    def of(cls, value: Any, mask: np.ndarray | None = None) -> RunningStats:
        """The statistics of one value; `mask` (bool, True = masked) has the value's shape."""
        out = cls()
        if isinstance(value, (int, float)) and mask is None:
            return out._of_number(float(value))
        a = np.asarray(value, dtype=np.float64).ravel()
        if mask is not None:
            out.masked = int(np.count_nonzero(mask))
        finite = np.isfinite(a)
        if not finite.all():
            out.nonfinite = int(a.size - np.count_nonzero(finite))
            a = a[finite]
        if a.size:
            out.count = int(a.size)
            out.zeros = int(a.size - np.count_nonzero(a))
            with np.errstate(over="ignore"):  # |x| > ~1e154: the variance is inf (null in JSON)
                out.mean = float(a.mean())
                out.m2 = float(np.square(a - out.mean).sum())
            out.min = float(a.min())
            out.max = float(a.max())
        return out

    def _of_number(self, value: float) -> RunningStats:
        """The same for one plain number, without numpy's per-call overhead."""
        if not math.isfinite(value):
            self.nonfinite = 1
        else:
            self.count, self.zeros = 1, int(value == 0)
            self.mean = self.min = self.max = value
        return self

    def update(self, value: Any, mask: np.ndarray | None = None) -> None:
        self.merge(RunningStats.of(value, mask))

    def merge(self, other: RunningStats) -> None:
        self.nonfinite += other.nonfinite
        self.masked += other.masked
        self.zeros += other.zeros
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": self.count,
            "nonfinite": self.nonfinite,
            "zeros": self.zeros,
            "masked": self.masked,
        }
        if self.count:
            out.update(mean=self.mean, std=(self.m2 / self.count) ** 0.5, min=self.min, max=self.max)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunningStats:
        """Back from a manifest entry (older manifests lack zeros/masked: read as 0)."""
        out = cls()
        out.count = _count(data, "count")
        out.nonfinite = _count(data, "nonfinite")
        out.zeros = _count(data, "zeros")
        out.masked = _count(data, "masked")
        if out.count:
            out.mean = _number(data, "mean", float("nan"))
            out.m2 = _number(data, "std", float("nan")) ** 2 * out.count
            out.min = _number(data, "min", float("nan"))
            out.max = _number(data, "max", float("nan"))
        return out


def _number(data: Mapping[str, Any], key: str, default: float) -> float:
    """A statistic as a float; `default` where it is missing or null (JSON has no inf/NaN)."""
    value = data.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _count(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def wants_stats(spec: FieldSpec) -> bool:
    """Numeric fields (int, unsigned, float) get statistics; bool masks, text and JSON do not."""
    return spec.dtype is not None and np.dtype(spec.dtype).kind in "iuf"


def mask_of(companion: Any, meaning: str) -> np.ndarray:
    """The bool 'masked' array a companion field gives under `meaning` (see MASK_MEANINGS)."""
    a = np.asarray(companion)
    if meaning == "bad":
        return a.astype(bool)
    if meaning == "good":
        return ~a.astype(bool)
    with np.errstate(invalid="ignore"):
        return ~(np.asarray(a, dtype=np.float64) > 0)


def merged_field_stats(splits: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per-field statistics over several splits' `field_stats` (exact merge), keeping `mask`."""
    merged: dict[str, RunningStats] = {}
    masks: dict[str, Any] = {}
    for field_stats in splits:
        for name, data in field_stats.items():
            if not isinstance(data, Mapping):
                continue
            merged.setdefault(name, RunningStats()).merge(RunningStats.from_dict(data))
            if data.get("mask") is not None:
                masks[name] = data["mask"]
    out = {}
    for name in sorted(merged):
        out[name] = merged[name].to_dict()
        if name in masks:
            out[name]["mask"] = masks[name]
    return out


def fractions(stats: Mapping[str, Any]) -> dict[str, float | None]:
    """finite and masked as shares of all elements, zeros as a share of the finite ones."""
    count, nonfinite = _count(stats, "count"), _count(stats, "nonfinite")
    elements = count + nonfinite
    return {
        "finite": count / elements if elements else None,
        "masked": _count(stats, "masked") / elements if elements else None,
        "zero": _count(stats, "zeros") / count if count else None,
    }


def degenerate_reason(stats: Mapping[str, Any], spec: FieldSpec) -> tuple[str, str] | None:
    """(kind, description) if the field is degenerate, else None.

    Only floating-point fields are judged: integer fields are ids, codes or counts, for which one
    repeated value is ordinary. One number per sample (a scalar, or an array of shape () or (1,))
    is judged for non-finite and masked values only, since a parameter with one value across a
    data set is legitimate.
    """
    if spec.dtype is None or np.dtype(spec.dtype).kind != "f":
        return None
    share = fractions(stats)
    if share["finite"] is None:
        return None
    if 1.0 - share["finite"] > NONFINITE_LIMIT:
        return "nonfinite", f"is {100 * (1 - share['finite']):.3g}% NaN/inf"
    if share["masked"] is not None and share["masked"] >= MASKED_LIMIT:
        what = "all masked" if share["masked"] == 1 else f"{100 * share['masked']:.4g}% masked"
        return "masked", f"is {what} (by {stats.get('mask', 'its mask')})"
    if _one_number_per_sample(spec):
        return None
    if share["zero"] is not None and share["zero"] >= ZERO_LIMIT:
        what = "all zeros" if share["zero"] == 1 else f"{100 * share['zero']:.4g}% zeros"
        return "zeros", f"is {what}"
    low, high = _number(stats, "min", float("nan")), _number(stats, "max", float("nan"))
    if _count(stats, "count") >= 2 and low == high:
        return "constant", f"is constant ({low:.6g} everywhere)"
    return None


def _one_number_per_sample(spec: FieldSpec) -> bool:
    if spec.kind != "npy":
        return True
    shape = spec.shape or ()
    return all(d is not None for d in shape) and int(np.prod(shape, dtype=np.int64)) <= 1


def default_cause(kind: str) -> str:
    return _DEFAULT_CAUSES[kind]


def _percent(value: float | None) -> str:
    if value is None:
        return "-"
    if value in (0.0, 1.0):
        return f"{100 * value:.0f}%"
    return f"{100 * value:.3g}%"


def field_summary_rows(field_stats: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Table rows (with a header) for `field_stats`: finite/masked/zero shares and min/mean/max."""
    rows = [["field", "elements", "finite", "masked", "zero", "min", "mean", "max"]]
    for name, s in field_stats.items():
        share = fractions(s)
        count = _count(s, "count")
        numbers = [f"{_number(s, k, float('nan')):.4g}" if count else "-" for k in ("min", "mean", "max")]
        rows.append(
            [
                name,
                str(count + _count(s, "nonfinite")),
                _percent(share["finite"]),
                _percent(share["masked"]) if s.get("mask") else "-",
                _percent(share["zero"]),
                *numbers,
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_field_summary(manifest: Any) -> str:
    """The per-field summary a `prepare` prints at its end: all splits together."""
    stats = merged_field_stats(split.field_stats for split in manifest.splits.values())
    if not stats:
        return "field summary: no numeric fields"
    text = "field summary (all splits):\n" + format_table(field_summary_rows(stats))
    allowed = manifest.provenance.get("degenerate_fields") if manifest.provenance else None
    if isinstance(allowed, Mapping) and allowed:
        text += "\nwritten with --allow-degenerate: " + "; ".join(f"{k} {v}" for k, v in allowed.items())
    return text
