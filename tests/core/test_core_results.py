"""Result tables: the JSON contract between the evaluate verbs and `foundation report`."""

from __future__ import annotations

import json
import math

import pytest

from foundation.errors import DataError
from foundation.results import ResultRow, ResultTable, find_tables, read_table, write_table


def _table() -> ResultTable:
    return ResultTable(
        family="astroclip",
        name="zero-shot",
        title="Zero-shot R²",
        columns=["z", "log M*"],
        rows=[ResultRow("ours k-NN", [0.9, math.nan]), ResultRow("AstroCLIP", [0.99, 0.8], source="paper")],
        metric="R²",
        higher_is_better=True,
        provenance={"command": "foundation evaluate zero-shot ..."},
    )


def test_a_table_round_trips_with_unmeasured_values_as_null(tmp_path):
    path = write_table(tmp_path / "out", _table())
    assert path.name == "zero-shot.table.json"
    assert json.loads(path.read_text())["rows"][0]["values"] == [0.9, None]
    back = read_table(path)
    assert back.rows[1].source == "paper" and back.rows[0].values == [0.9, None]
    assert find_tables(tmp_path) == [path]


def test_rows_must_match_the_columns_and_name_their_source():
    with pytest.raises(ValueError, match="2 columns"):
        ResultTable("x", "t", "T", ["a", "b"], [ResultRow("r", [1.0])])
    with pytest.raises(ValueError, match="source"):
        ResultTable("x", "t", "T", ["a"], [ResultRow("r", [1.0], source="theirs")])  # type: ignore[arg-type]


def test_a_file_that_is_not_a_table_is_refused_with_its_path(tmp_path):
    bad = tmp_path / "x.table.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(DataError, match="not a result table"):
        read_table(bad)
    bad.write_text("{")
    with pytest.raises(DataError, match="x.table.json"):
        read_table(bad)
