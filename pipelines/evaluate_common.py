"""Pieces shared by `foundation evaluate retrieval` and `foundation evaluate zero-shot`.

Train/test splits, metrics (R², redshift MAE / outlier fraction / NMAD), labelled inputs
(`LABEL=path`), Markdown tables and atomic JSON reports.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError

TRAIN_SPLITS = ("train",)
TEST_SPLITS = ("test", "valid", "val", "validation")
#: Photometric-redshift convention: an outlier has |Δz| / (1 + z) above this.
OUTLIER_THRESHOLD = 0.15
_REDSHIFT_NAMES = re.compile(r"^(z|redshift|z_hp|zspec|z_spec|photoz|photo_z)$", re.IGNORECASE)


def is_redshift(name: str) -> bool:
    """Targets that get redshift metrics (MAE, outlier fraction, NMAD) besides R²."""
    return bool(_REDSHIFT_NAMES.match(name))


# ----------------------------------------------------------------------------- inputs


def parse_labelled(items: Sequence[str], default_label: str = "model") -> list[tuple[str, Path]]:
    """`["astroclip=e.h5", "r.h5"]` -> [("astroclip", e.h5), ("r", r.h5)]; labels must be unique."""
    out: list[tuple[str, Path]] = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            path, label = item, (Path(item).stem if len(items) > 1 else default_label)
        if not label or not path:
            raise DataError(f"{item!r} is not of the form LABEL=PATH or PATH")
        out.append((label, Path(path)))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise DataError(f"labels must be unique, got {labels}; name inputs LABEL=PATH")
    return out


def parse_csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


# ----------------------------------------------------------------------------- splits


def _id_fraction(oid: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{oid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def train_test_rows(
    ids: np.ndarray, split: np.ndarray | None, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, test rows, how): the file's own splits when it records train and test rows,
    otherwise a deterministic hash of each object id (stable under reordering and appending)."""
    if split is not None:
        train = np.flatnonzero(np.isin(split, TRAIN_SPLITS))
        for name in TEST_SPLITS:
            test = np.flatnonzero(split == name)
            if len(train) and len(test):
                return (
                    train,
                    test,
                    f"recorded splits: train={len(train)} ({TRAIN_SPLITS[0]}), test={len(test)} ({name})",
                )
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    frac = np.asarray([_id_fraction(str(oid), seed) for oid in ids.tolist()])
    test = np.flatnonzero(frac < test_fraction)
    train = np.flatnonzero(frac >= test_fraction)
    return train, test, f"hash of object id (seed {seed}): train={len(train)}, test={len(test)}"


# ----------------------------------------------------------------------------- metrics


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (as sklearn; 0 for a constant truth)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) < 2:
        raise ValueError("r2_score needs two 1-D arrays of the same length >= 2")
    ss_res = float(np.sum((y_true - y_pred) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def regression_metrics(name: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """R² always; for redshift also MAE, outlier fraction (|Δz|/(1+z) > 0.15) and σ_NMAD."""
    out = {"r2": r2_score(y_true, y_pred), "n_test": int(len(y_true))}
    if is_redshift(name):
        dz = (np.asarray(y_pred) - np.asarray(y_true)) / (1.0 + np.asarray(y_true))
        out["mae"] = float(np.mean(np.abs(np.asarray(y_pred) - np.asarray(y_true))))
        out["outlier_fraction"] = float(np.mean(np.abs(dz) > OUTLIER_THRESHOLD))
        out["nmad"] = float(1.4826 * np.median(np.abs(dz - np.median(dz))))
    return out


# ----------------------------------------------------------------------------- reports


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if not np.isfinite(v) else f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
