"""`foundation evaluate baselines`: the supervised baselines of the AstroCLIP property table, trained
on a shard set before (or beside) any pretraining.

The baselines (an image CNN, a spectrum conv+attention model, a photometry MLP) read only the raw
inputs and the catalogue, so they need no embeddings: this command trains them on the shards' recorded
train split and writes their test predictions to one JSON file, which `foundation evaluate zero-shot
--paper-table --baselines-from FILE` puts into the table after checking that its embeddings have the
same train and test objects. `foundation demo` runs it beside the alignment and the exports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from foundation.atomic import write_json
from foundation.cli import Command
from foundation.errors import DataError


def train_baselines(
    data: str | Path, out: Path, fields: dict[str, str], *, seed: int, test_fraction: float
) -> Path:
    """Train the three baselines on `data` and write their rows to `out` (a JSON file)."""
    from encoders.astroclip.evaluate import (
        baseline_property_rows,
        baselines_document,
        labelled_rows,
        paper_property_names,
        shard_objects,
    )
    from foundation.data import Manifest
    from foundation.export import default_targets
    from pipelines.evaluate_common import raw_arrays

    names = paper_property_names(default_targets(Manifest.load(data)))
    if not names:
        raise DataError(f"{data} carries none of the AstroCLIP paper's properties; nothing to regress")
    objects = shard_objects(data, names, test_fraction=test_fraction, seed=seed)
    train_rows, test_rows, y = labelled_rows(objects.targets, objects.train_rows, objects.test_rows)
    print(f"baselines: {', '.join(names)}; {len(train_rows)} train / {len(test_rows)} test objects")
    raw = raw_arrays(data, objects.ids.tolist(), fields)
    rows = baseline_property_rows(raw, y, names, train_rows, test_rows, seed=seed)
    for r in rows:
        scores = " ".join(f"{n}={v:.3f}" for n, v in r["r2"].items())
        print(f"  {r['modality']:<10} {r['method']:<44} {scores}  ({r['seconds']:.1f} s)")
    document = baselines_document(names, objects.ids[train_rows], objects.ids[test_rows], rows, seed)
    write_json(out, document)
    return out


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw-data", required=True, help="Shard set with the raw images and spectra.")
    parser.add_argument(
        "--raw-fields",
        help="modality=field pairs naming each modality's raw input (default: the field named like it).",
    )
    parser.add_argument(
        "--out", required=True, help="JSON file for the baselines' rows (e.g. baselines.json)."
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="Held-out fraction when no split is recorded."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split (if hashed) and the training.")


def _run(args: argparse.Namespace) -> int:
    from foundation.data.raw_inputs import parse_field_map

    if not 0.0 < args.test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    fields = parse_field_map(args.raw_fields, ["image", "spectrum"])
    out = train_baselines(
        args.raw_data, Path(args.out), fields, seed=args.seed, test_fraction=args.test_fraction
    )
    print(f"baselines -> {out}")
    return 0


COMMANDS = [
    Command(
        ("evaluate", "baselines"),
        "Train the AstroCLIP property table's supervised baselines on a shard set (no embeddings needed).",
        _add_arguments,
        _run,
    )
]
