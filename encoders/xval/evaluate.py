"""Number-prediction evaluation of a pretrained xVal (or baseline) checkpoint on a shard split.

Protocol: MLM models get every number of one field masked at once and predict them from the
rest of the sample (one pass per field); causal models predict each number from the text before
it (teacher forcing). Predictions are clipped to the normaliser's range and mapped back to the
original units; metrics compare them with the raw values stored in the shards.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.xval.collate import XValCollate
from encoders.xval.family import FAMILY_NAME, normalizer_from
from encoders.xval.inference import Predictions, predict_batch
from encoders.xval.tokenizer import TOKENIZER_FILE
from foundation.atomic import replacing, write_figure, write_json
from foundation.device import resolve_device
from foundation.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _training_manifest(checkpoint: Path, cfg: Any):
    """The manifest of the data the model was trained on (run snapshot first), or None."""
    from foundation.data import Manifest

    candidates = []
    if checkpoint.is_file():
        candidates.append(checkpoint.parent / "dataset")
    elif checkpoint.name.startswith("step-"):
        candidates.append(checkpoint.parent.parent / "dataset")
    else:
        candidates.append(checkpoint / "dataset")
    candidates.append(Path(cfg.data.path))
    for folder in candidates:
        if (folder / "manifest.json").is_file():
            return Manifest.load(folder)
    return None


def _check_compatible(train_manifest, data_manifest) -> None:
    if train_manifest is None:
        log.warning(
            "cannot find the training shard set's manifest; assuming the data uses the same tokenizer"
        )
        return
    mine = train_manifest.files.get(TOKENIZER_FILE)
    theirs = data_manifest.files.get(TOKENIZER_FILE)
    if mine is None or theirs is None or mine.sha256 != theirs.sha256:
        raise DataError(
            f"{data_manifest.path} was tokenised with a different tokenizer than the model's training data "
            f"({train_manifest.path}); prepare it with `foundation prepare xval ... --vocab-from "
            f"{_shards_path(train_manifest)}`"
        )
    if train_manifest.stats.get("normalizer") != data_manifest.stats.get("normalizer"):
        raise DataError(
            f"{data_manifest.path} has a different number normaliser than the model's training data; "
            f"prepare it with --vocab-from {_shards_path(train_manifest)}"
        )


def _shards_path(manifest) -> str:
    return str(manifest.path) if manifest.path is not None else "TRAINING_SHARDS"


def metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MSE, RMSE, MAE, R² over the finite predictions, and the unparseable share."""
    from sklearn.metrics import r2_score

    ok = np.isfinite(pred)
    n = int(len(true))
    out: dict[str, float] = {"n": n, "unparseable_fraction": float(1 - ok.mean()) if n else 0.0}
    t, p = true[ok], pred[ok]
    if len(t) == 0:
        return {**out, "mse": float("nan"), "rmse": float("nan"), "mae": float("nan"), "r2": float("nan")}
    err = p - t
    out["mse"] = float(np.mean(err**2))
    out["rmse"] = float(np.sqrt(out["mse"]))
    out["mae"] = float(np.mean(np.abs(err)))
    out["r2"] = float(r2_score(t, p)) if len(t) > 1 and np.ptp(t) > 0 else float("nan")
    return out


def plot_predictions(path: Path, by_field: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(by_field)[:12]
    cols = min(4, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        true, pred = by_field[name]
        ok = np.isfinite(pred)
        ax.scatter(true[ok], pred[ok], s=4, alpha=0.5)
        if ok.any():
            lo = float(min(true[ok].min(), pred[ok].min()))
            hi = float(max(true[ok].max(), pred[ok].max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{name} (n={len(true)})", fontsize=9)
        ax.set_xlabel("true", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_figure(path, fig, dpi=110)


def _json_safe(value: Any) -> Any:
    """NaN/inf (a metric without data) as null, so report.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class _Collected:
    """Every evaluated number of a split, in stored order, in original units."""

    n_samples: int
    truncated: int
    sample_keys: np.ndarray
    field: np.ndarray
    true: np.ndarray
    pred: np.ndarray
    is_number: np.ndarray


def _field_ids(normalizer: Any, fields: list[str] | None) -> list[int] | None:
    if fields is None:
        return None
    unknown = [f for f in fields if f not in normalizer.fields]
    if unknown:
        raise DataError(
            f"unknown field(s) {unknown}; fields with their own normaliser: {', '.join(normalizer.fields)}"
        )
    return [normalizer.fields.index(f) for f in fields]


def _predict_split(
    model: Any,
    dataset: Any,
    normalizer: Any,
    field_ids: list[int] | None,
    device: Any,
    max_batches: int | None,
) -> _Collected | None:
    """Predict every number of the split batch by batch, then map the predictions back to
    original units (a prediction outside the normaliser's range is clipped to it first); None
    when the split holds no number."""
    n_samples = truncated = 0
    parts: list[Predictions] = []
    key_of: list[np.ndarray] = []
    torch.manual_seed(0)
    for b, batch in enumerate(dataset):
        if max_batches is not None and b >= max_batches:
            break
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        pred = predict_batch(model, batch, field_ids)
        keys = np.asarray(batch["__key__"], dtype=object)
        key_of.append(keys[pred.sample] if len(pred.sample) else np.zeros(0, object))
        n_samples += len(keys)
        truncated += int(batch["n_truncated"])
        parts.append(pred)
    if not parts or sum(len(p.true) for p in parts) == 0:
        return None
    field = np.concatenate([p.field for p in parts])
    pred_norm = np.concatenate([p.pred_norm for p in parts])
    pred = np.full_like(pred_norm, np.nan)
    ok = np.isfinite(pred_norm)
    pred[ok] = normalizer.inverse(np.clip(pred_norm[ok], -normalizer.clip, normalizer.clip), field[ok])
    return _Collected(
        n_samples,
        truncated,
        np.concatenate(key_of),
        field,
        np.concatenate([p.true for p in parts]),
        pred,
        np.concatenate([p.is_number for p in parts]),
    )


def _metrics_by_field(c: _Collected, names: list[str], xval: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-field metrics, overall metrics); xVal models also report how often the token head
    did not predict a number where one stood."""
    per_field: dict[str, Any] = {}
    for fid in np.unique(c.field):
        sel = c.field == fid
        entry = metrics(c.true[sel], c.pred[sel])
        if xval:
            entry["token_head_not_num_fraction"] = float(1 - c.is_number[sel].mean())
        per_field[names[int(fid)]] = entry
    overall = metrics(c.true, c.pred)
    if xval:
        overall["token_head_not_num_fraction"] = float(1 - c.is_number.mean())
    return per_field, overall


def _write_predictions(path: Path, c: _Collected, names: list[str]) -> None:
    with replacing(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "field", "true", "predicted", "is_number"])
        for key, fid, true, pred, is_number in zip(
            c.sample_keys, c.field, c.true, c.pred, c.is_number, strict=True
        ):
            writer.writerow([key, names[int(fid)], repr(float(true)), repr(float(pred)), int(is_number)])


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    fields: list[str] | None = None,
    batch_size: int = 64,
    max_batches: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Write report.json, predictions.csv and predicted_vs_true.png into `out`; return the report."""
    from foundation.data import Manifest, ShardDataset
    from foundation.train import load_pretrained

    checkpoint = Path(checkpoint)
    device = resolve_device(device)
    model, cfg, family = load_pretrained(checkpoint, map_location=device)
    if family.name != FAMILY_NAME:
        raise ConfigError(f"{checkpoint} is a {family.name!r} model, not an xval one")
    manifest = Manifest.load(data)
    _check_compatible(_training_manifest(checkpoint, cfg), manifest)
    normalizer = normalizer_from(manifest)
    field_ids = _field_ids(normalizer, fields)
    collate = XValCollate(normalizer, model.encoding, model.text_vocab_size, cfg.model.max_len, pack=False)
    dataset = ShardDataset.in_order(data, split, batch_size, collate)
    collected = _predict_split(model, dataset, normalizer, field_ids, device, max_batches)
    if collected is None:
        raise DataError(f"split {split!r} of {data} has no numbers to evaluate")
    if collected.truncated:
        log.warning(
            "%d sample(s) are longer than model.max_len=%d; the numbers past the cut are not evaluated",
            collected.truncated,
            cfg.model.max_len,
        )
    names = list(normalizer.fields)
    per_field, overall = _metrics_by_field(collected, names, model.encoding.is_xval)
    report = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "family": FAMILY_NAME,
        "encoding": cfg.model.encoding,
        "mode": cfg.model.mode,
        "protocol": "mask each field in turn" if cfg.model.mode == "mlm" else "teacher-forced next token",
        "n_samples": collected.n_samples,
        "n_numbers": int(len(collected.true)),
        "n_truncated_samples": collected.truncated,
        "units": "original (de-normalised)",
        "fields": per_field,
        "overall": overall,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", collected, names)
    plot_data = {
        names[int(fid)]: (collected.true[collected.field == fid], collected.pred[collected.field == fid])
        for fid in np.unique(collected.field)
    }
    plot_predictions(
        out / "predicted_vs_true.png", plot_data, f"{cfg.model.encoding} ({cfg.model.mode}) on {split}"
    )
    write_json(out / "report.json", _json_safe(report), indent=2, allow_nan=False)
    return report
