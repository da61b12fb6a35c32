"""Result tables: one JSON file per table, the contract between `evaluate` verbs and `report`.

An evaluation that reproduces a table of a paper writes it as `<name>.table.json` into its output
folder; `foundation report` finds every such file under the folders it is given and renders them
beside their figures. A row is either ours (measured by the command in `provenance`) or the
paper's (its published number, on the paper's data), and says which, so a reader never mistakes
one for the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from foundation import atomic
from foundation.errors import DataError

TABLE_SUFFIX = ".table.json"
TABLE_FORMAT = "foundation.result_table/1"
Source = Literal["ours", "paper"]
Value = float | int | str | None


@dataclass
class ResultRow:
    """One row: a label (a model, a protocol, a baseline), one value per column, and whose it is."""

    label: str
    values: list[Value]
    source: Source = "ours"


@dataclass
class ResultTable:
    """A table in a paper's layout: columns are the paper's (properties, systems, tasks).

    `higher_is_better` tells the renderer which way to mark the best value of each column;
    `figures` are PNG files beside the table file (names relative to it); `provenance` holds the
    command, the config hash and the data that produced the `ours` rows.
    """

    family: str
    name: str
    title: str
    columns: list[str]
    rows: list[ResultRow]
    metric: str = ""
    higher_is_better: bool | None = None
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row.values) != len(self.columns):
                raise ValueError(
                    f"table {self.name!r}: row {row.label!r} has {len(row.values)} values for "
                    f"{len(self.columns)} columns"
                )
            if row.source not in ("ours", "paper"):
                raise ValueError(f"table {self.name!r}: row {row.label!r} has source {row.source!r}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = TABLE_FORMAT
        for row in data["rows"]:
            row["values"] = [_json_value(v) for v in row["values"]]
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "table") -> ResultTable:
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise DataError(f'{where}: not a result table (no "format": {TABLE_FORMAT!r})')
        try:
            rows = [ResultRow(**row) for row in data["rows"]]
            fields = {k: v for k, v in data.items() if k not in ("format", "rows")}
            return cls(rows=rows, **fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed result table ({exc})") from exc


def _json_value(value: Value) -> Value:
    """NaN and inf are not JSON: a value that could not be measured is stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_table(folder: str | Path, table: ResultTable) -> Path:
    """Write `table` as `<folder>/<name>.table.json` (atomically); returns the path."""
    path = Path(folder) / f"{table.name}{TABLE_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_json(path, table.to_json(), indent=2, allow_nan=False)


def read_table(path: str | Path) -> ResultTable:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read result table ({exc})") from exc
    return ResultTable.from_json(data, where=str(path))


def find_tables(folder: str | Path) -> list[Path]:
    """Every result table under `folder`, in sorted path order (a file path is taken as is)."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return sorted(folder.rglob(f"*{TABLE_SUFFIX}"))
