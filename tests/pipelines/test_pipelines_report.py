"""`foundation report`: result tables rendered as Markdown and HTML pages, written atomically."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from foundation.cli import main
from foundation.errors import DataError
from foundation.report import (
    PNG_SIGNATURE,
    FoundTable,
    best_cells,
    collect,
    format_value,
    markdown_table,
    render_html,
    render_markdown,
    write_report,
)
from foundation.results import ResultRow, ResultTable, write_table

PNG = PNG_SIGNATURE + b"\x00\x00\x00\rIHDR-not-really-an-image"


def _table(**overrides) -> ResultTable:
    fields = dict(
        family="astroclip",
        name="zero-shot",
        title="Zero-shot R²",
        columns=["redshift", "log M*"],
        rows=[
            ResultRow("k-NN (ours)", [0.91, None]),
            ResultRow("MLP", [0.88, 0.7]),
            ResultRow("AstroCLIP", [0.79, 0.74], source="paper"),
        ],
        metric="R²",
        higher_is_better=True,
        notes=["paper rows: DESI"],
        figures=[],
        provenance={
            "command": "foundation evaluate zero-shot --k 64",
            "config_hash": "abc123",
            "data": "demo",
        },
    )
    fields.update(overrides)
    return ResultTable(**fields)


def _found(table: ResultTable, tmp_path) -> FoundTable:
    return FoundTable(tmp_path / f"{table.name}.table.json", table, f"{table.family}-{table.name}")


def test_markdown_table_is_exact(tmp_path):
    text = markdown_table(_found(_table(), tmp_path))
    assert text == (
        "| | redshift | log M\\* |\n"
        "|---|---|---|\n"
        "| k-NN (ours) | **0.910** | – |\n"
        "| MLP | 0.880 | 0.700 |\n"
        "| AstroCLIP *(paper)* | 0.790 | 0.740 |"
    )


def test_best_per_column_follows_the_direction_and_the_source():
    rows = [
        ResultRow("a", [1.0, 5.0, None]),
        ResultRow("b", [2.0, 5.0, 3.0]),
        ResultRow("p1", [0.5, 9.0, 1.0], source="paper"),
        ResultRow("p2", [0.4, 8.0, 2.0], source="paper"),
    ]
    higher = _table(columns=["x", "y", "z"], rows=rows, higher_is_better=True)
    lower = _table(columns=["x", "y", "z"], rows=rows, higher_is_better=False)
    unknown = _table(columns=["x", "y", "z"], rows=rows, higher_is_better=None)
    # Column z has one of our numbers only: nothing to compare it with, so it is not marked.
    assert best_cells(higher) == {(1, 0), (0, 1), (1, 1), (2, 0), (2, 1), (3, 2)}
    assert best_cells(lower) == {(0, 0), (0, 1), (1, 1), (3, 0), (3, 1), (2, 2)}
    assert best_cells(unknown) == set()


def test_missing_and_non_finite_values_are_a_dash():
    assert format_value(None) == "–"
    assert format_value(float("nan")) == "–"
    assert format_value(float("inf")) == "–"
    assert (format_value(3), format_value(0.25), format_value(1.59e-3), format_value("141×")) == (
        "3",
        "0.250",
        "1.59e-03",
        "141×",
    )


def test_html_escapes_labels_and_is_self_contained(tmp_path):
    hostile = "<script>alert(1)</script>"
    table = _table(
        title=hostile,
        columns=[hostile, "b"],
        rows=[ResultRow(hostile, [1.0, 2.0]), ResultRow('x" onload="y', [0.5, 3.0])],
        notes=[hostile],
        provenance={"command": hostile},
    )
    page = render_html("astroclip", [_found(table, tmp_path)])
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x&quot; onload=&quot;y" in page
    assert "<style>" in page and "http" not in page
    markdown = render_markdown("astroclip", [_found(table, tmp_path)])
    # Raw HTML passes through Markdown, except inside code spans (provenance), which show it as text.
    outside_code = re.sub(r"`[^`]*`", "", markdown)
    assert "<script" not in outside_code and "| &lt;script&gt;alert(1)&lt;/script&gt; |" in markdown


def test_markdown_shows_notes_provenance_and_paper_marking(tmp_path):
    text = render_markdown("astroclip", [_found(_table(), tmp_path)])
    assert text.startswith("# AstroCLIP (Parker et al.)\n")
    assert "## Zero-shot R²" in text
    assert "- paper rows: DESI" in text
    assert "- command: `foundation evaluate zero-shot --k 64`" in text
    assert "- config\\_hash" not in text and "- config_hash: `abc123`" in text
    assert "- data: `demo`" in text
    assert "published numbers, measured on the paper's data" in text


def _write_run(folder, table=None, figure=b""):
    """A run folder with an evaluation subfolder holding one table (and its figure)."""
    evaluation = folder / "reports" / "zero-shot"
    table = table or _table(figures=["scatter.png"] if figure else [])
    write_table(evaluation, table)
    if figure:
        (evaluation / "scatter.png").write_bytes(figure)
    return evaluation


def test_report_writes_pages_figures_and_index(tmp_path):
    _write_run(tmp_path / "run", figure=PNG)
    write_table(tmp_path / "run" / "mpp", _table(family="mpp", name="rollout", title="Rollout", figures=[]))
    manifest = write_report(collect([tmp_path / "run"]), tmp_path / "report")
    out = tmp_path / "report"
    names = {p.name for p in out.iterdir()}
    assert {"astroclip.md", "astroclip.html", "mpp.md", "mpp.html", "index.html", "report.json"} <= names
    copy = out / "figures" / "astroclip-zero-shot" / "scatter.png"
    assert copy.read_bytes() == PNG
    assert "![scatter.png](figures/astroclip-zero-shot/scatter.png)" in (out / "astroclip.md").read_text()
    assert '<img src="figures/astroclip-zero-shot/scatter.png"' in (out / "astroclip.html").read_text()
    index = (out / "index.html").read_text()
    assert 'href="astroclip.html"' in index and 'href="mpp.html"' in index
    assert "abc123" in (out / "astroclip.html").read_text()
    assert manifest["problems"] == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary, no lock left


def test_report_verb_end_to_end_and_refuses_to_overwrite(tmp_path, capsys):
    _write_run(tmp_path / "run")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "report ->" in capsys.readouterr().out
    before = (out / "astroclip.md").read_text()
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "astroclip.md").read_text() == before
    assert main(["report", str(tmp_path / "run"), "--out", str(out), "--overwrite"]) == 0


def test_overwrite_never_replaces_a_folder_that_is_not_a_report(tmp_path):
    _write_run(tmp_path / "run")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a report folder"):
        write_report(collect([tmp_path / "run"]), precious, overwrite=True)
    assert (precious / "data.txt").read_text() == "keep me"


def test_a_damaged_table_is_listed_and_the_rest_rendered(tmp_path, capsys):
    evaluation = _write_run(tmp_path / "run")
    (evaluation / "broken.table.json").write_text("{not json")
    wrong_type = _table(name="typed").to_json()
    wrong_type["rows"][0]["values"][0] = {"a": 1}
    (evaluation / "typed.table.json").write_text(json.dumps(wrong_type))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "broken.table.json" in err and "typed.table.json" in err
    page = (out / "astroclip.md").read_text()
    assert page.index("broken.table.json") < page.index("## Zero-shot R²")
    assert "broken.table.json" in (out / "index.html").read_text()
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert not (tmp_path / "strict").exists()


def test_figures_outside_the_table_folder_or_not_png_are_refused(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    evaluation = _write_run(tmp_path / "run", _table(figures=["../../../secret.png", "fake.png", "gone.png"]))
    (evaluation / "fake.png").write_text("not an image")
    collection = collect([tmp_path / "run"])
    assert collection.tables[0].figures == []
    messages = " ".join(p.message for p in collection.problems)
    assert (
        "inside the table's folder" in messages and "not a PNG" in messages and "does not exist" in messages
    )
    write_report(collection, tmp_path / "report")
    assert not (tmp_path / "report" / "figures").exists()


def test_a_missing_source_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        collect([tmp_path / "nowhere"])


def test_same_table_name_from_two_runs_gets_two_sections(tmp_path):
    _write_run(tmp_path / "a", figure=PNG)
    _write_run(tmp_path / "b", figure=PNG)
    collection = collect([tmp_path / "a", tmp_path / "b", tmp_path / "a"])
    assert [f.key for f in collection.tables] == ["astroclip-zero-shot", "astroclip-zero-shot-2"]
    write_report(collection, tmp_path / "report")
    assert (tmp_path / "report" / "figures" / "astroclip-zero-shot-2" / "scatter.png").is_file()


def test_report_command_in_a_subprocess(tmp_path):
    _write_run(tmp_path / "run")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "foundation.cli",
            "report",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r" / "astroclip.html").is_file()


def test_a_report_being_written_is_locked(tmp_path, capsys):
    from foundation.lock import FolderLock

    _write_run(tmp_path / "run")
    with FolderLock(tmp_path / "report", "another report"):
        assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 2
    assert "another report" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_provenance_with_backticks_stays_one_code_span(tmp_path):
    table = _table(provenance={"command": "echo `date`", "data": {"shards": "s", "n": 3}})
    text = render_markdown("astroclip", [_found(table, tmp_path)])
    assert "- command: `` echo `date` ``" in text
    assert '- data: `{"n": 3, "shards": "s"}`' in text
