"""Raw inputs of objects, by object id, straight from a shard set.

The raw-input baselines of `foundation evaluate zero-shot` (PCA of pixels / fluxes + k-NN, and a
supervised model) and the pictures of `foundation search query --plot` need the samples behind
embedding rows. Shards are read in place (mmap, `foundation.data.ShardReader`), every split,
keeping only the requested ids and fields. Which sample field is the raw input of a modality is
given as `modality=field` pairs; by default the field named like the modality, else the one
array field whose name contains it (e.g. `spectrum_flux` for `spectrum`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError


def parse_field_map(text: str | None, modalities: Sequence[str]) -> dict[str, str]:
    """`"image=image,spectrum=flux"` -> {modality: field}; missing modalities map to themselves."""
    mapping = {m: m for m in modalities}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        modality, sep, field = item.partition("=")
        if not sep or not modality or not field:
            raise DataError(f"--raw-fields item {item!r} is not of the form modality=field")
        mapping[modality.strip()] = field.strip()
    return mapping


def resolve_fields(mapping: dict[str, str], schema: dict[str, Any], where: str) -> dict[str, str]:
    """Check each field exists as an array field; fall back to the one array field containing the name."""
    out = {}
    arrays = [name for name, spec in schema.items() if spec.kind == "npy"]
    for modality, field in mapping.items():
        if field in arrays:
            out[modality] = field
            continue
        guesses = [name for name in arrays if field in name]
        if len(guesses) == 1:
            out[modality] = guesses[0]
            continue
        raise DataError(
            f"{where} has no array field {field!r} for modality {modality!r} (array fields: "
            f"{', '.join(arrays) or 'none'}); name it with --raw-fields {modality}=FIELD"
        )
    return out


def iter_samples(
    data: str | Path, fields: Sequence[str] | None = None
) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(split, key, sample) for every sample of every split, in manifest order."""
    from foundation.data import Manifest, ShardReader

    manifest = Manifest.load(data)
    for split, info in manifest.splits.items():
        for shard in info.shards:
            reader = ShardReader(
                manifest.path / shard.name,
                manifest.schema,
                expected_bytes=shard.bytes,
                expected_samples=shard.samples,
            )
            try:
                for i, key in enumerate(reader.keys):
                    yield split, key, reader.sample(i, fields)
            finally:
                reader.close()


def fetch_samples(
    data: str | Path, ids: Iterable[str], fields: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """{id: sample} for the given ids (DataError naming ids that are in no shard)."""
    wanted = set(map(str, ids))
    found: dict[str, dict[str, Any]] = {}
    for _, key, sample in iter_samples(data, fields):
        if key in wanted:
            found[key] = sample
            if len(found) == len(wanted):
                break
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"object ids not found in the shards of {data}: {', '.join(missing[:5])}")
    return found


def load_raw_inputs(data: str | Path, ids: Sequence[str], field_map: dict[str, str]) -> dict[str, np.ndarray]:
    """{modality: (N, F) float32}: each id's raw input field, flattened, in the order of `ids`."""
    from foundation.data import Manifest

    manifest = Manifest.load(data)
    fields = resolve_fields(field_map, manifest.schema, str(data))
    row_of = {str(oid): i for i, oid in enumerate(ids)}
    out: dict[str, np.ndarray] = {}
    seen = np.zeros(len(ids), dtype=bool)
    for _, key, sample in iter_samples(data, sorted(set(fields.values()))):
        row = row_of.get(key)
        if row is None:
            continue
        for modality, field in fields.items():
            value = np.asarray(sample[field], dtype=np.float32).reshape(-1)
            if modality not in out:
                out[modality] = np.zeros((len(ids), value.size), dtype=np.float32)
            if value.size != out[modality].shape[1]:
                raise DataError(
                    f"raw field {field!r} of {key!r} has {value.size} values, "
                    f"others have {out[modality].shape[1]}"
                )
            out[modality][row] = np.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
        seen[row] = True
    if not seen.all():
        missing = [str(ids[i]) for i in np.flatnonzero(~seen)[:5]]
        raise DataError(f"{int((~seen).sum())} objects are not in the shards of {data} (e.g. {missing})")
    return out
