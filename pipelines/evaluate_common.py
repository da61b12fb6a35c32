"""Pieces shared by `foundation evaluate retrieval` and `foundation evaluate zero-shot`.

Labelled inputs (`LABEL=path`), comma-separated options, Markdown tables and the JSON encoding
of reports. The metrics and splits are `encoders.astroclip.evaluate`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError

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


def add_embeddings_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--embeddings [LABEL=]FILE` option (read with `parse_labelled`)."""
    parser.add_argument("--embeddings", action="append", required=True, metavar="[LABEL=]FILE", help=help)


def parse_csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


# ----------------------------------------------------------------------------- reports


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if not np.isfinite(v) else f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def json_default(value: Any) -> Any:
    """`json.dumps(default=)` for the numpy values and paths a report may hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------- paper tables


def command_line(verb: str, args: argparse.Namespace) -> str:
    """The command that produced a table, rebuilt from its parsed options (for provenance)."""
    import shlex

    words = ["foundation", verb]
    # The CLI's sub-command choices ("verb", "evaluate", ...) are already the words of `verb`.
    choices = {"verbose", "command", "verb", *verb.split()}
    for name, value in vars(args).items():
        if name.startswith("_") or name in choices or value in (None, False, []):
            continue
        flag = "--" + name.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for item in values:
            words += [flag] if item is True else [flag, shlex.quote(str(item))]
    return " ".join(words)


def table_provenance(command: str, inputs: Sequence[tuple[str, Path]], raw_data: Any) -> dict[str, Any]:
    """A paper table's provenance: the command, the first input's config hash, and the config
    hash and data recorded in each embeddings file (by label), each file opened once."""
    from foundation.embeddings import open_embeddings

    embeddings: dict[str, Any] = {}
    for label, path in inputs:
        with open_embeddings(path) as emb:
            embeddings[label] = {
                "path": str(path),
                "config_hash": emb.recorded("config_hash"),
                "data": emb.recorded("data"),
            }
    return {
        "command": command,
        "config_hash": embeddings[inputs[0][0]]["config_hash"],
        "data": {"embeddings": embeddings, "raw": raw_data},
    }


def raw_arrays(data: str | Path, ids: Sequence[str], fields: dict[str, str]) -> dict[str, np.ndarray]:
    """{modality: array} of each id's raw input in its stored shape ((N, bands, H, W) images,
    (N, L) spectra), from the shard set `data`; `fields` maps modality -> sample field."""
    from foundation.data import Manifest
    from foundation.data.raw_inputs import load_raw_inputs, resolve_fields

    manifest = Manifest.load(data)
    resolved = resolve_fields(fields, manifest.schema, str(data))
    flat = load_raw_inputs(data, ids, resolved)
    out = {}
    for modality, x in flat.items():
        shape = manifest.schema[resolved[modality]].shape
        if shape and all(isinstance(d, int) for d in shape) and int(np.prod(shape)) == x.shape[1]:
            x = x.reshape(len(x), *shape)
        out[modality] = x
    return out


def wavelength_grid(data: str | Path, pixels: int) -> np.ndarray:
    """The spectra's wavelength grid recorded by `prepare astroclip` (pixel index if none)."""
    from foundation.data import Manifest

    grid = Manifest.load(data).extra.get("wavelength") or {}
    if {"start", "step"} <= set(grid):
        return float(grid["start"]) + float(grid["step"]) * np.arange(pixels)
    return np.arange(pixels, dtype=np.float64)
