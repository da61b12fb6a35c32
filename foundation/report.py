"""Rendering of result tables (`foundation.results`) into one Markdown and one HTML page per family.

`collect` finds every `*.table.json` under the folders it is given and checks each file fully
(types, figure names) before anything is rendered; a damaged file does not stop the others: it is
listed at the top of every page, and `write_report` renders the rest. `write_report` builds the
whole report folder under a temporary name beside its target and renames it into place, so a
reader sees the old report or the new one, never half of one.

Layout of a report folder:

    index.html            links to the family pages; the sources scanned; damaged files
    <family>.md           the family's tables, figures linked, notes, provenance
    <family>.html         the same, self-contained (inline CSS, no script), figures embedded
    figures/<table>/...   the PNGs the tables list, copied
    report.json           what was rendered from where (and what was skipped); marks the folder
                          as a report, so that `--overwrite` never replaces anything else

Each table is drawn in its paper's layout: one row per model or baseline, one column per property,
system or task. Rows that are the paper's published numbers are marked as the paper's, on the
paper's data. The best value of each column is set in bold, compared only among rows of the same
source (ours with ours, the paper's with the paper's), since numbers on different data do not rank
against each other; a value that is missing or not finite is shown as "–".
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from foundation import atomic
from foundation.errors import DataError
from foundation.lock import FolderLock
from foundation.results import TABLE_SUFFIX, ResultTable, find_tables, read_table

REPORT_FORMAT = "foundation.report/1"
MANIFEST = "report.json"
MISSING = "–"
#: A table file larger than this is not one an evaluation wrote; it is refused, not parsed.
MAX_TABLE_BYTES = 16 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Page names a family may not take (they are the report's own files).
RESERVED_NAMES = frozenset({"index", "report", "figures"})
FAMILY_TITLES = {
    "astroclip": "AstroCLIP (Parker et al.)",
    "mpp": "Multiple Physics Pretraining (McCabe et al.)",
    "xval": "xVal (Golkar et al.)",
}
PAPER_NOTE = "Rows marked paper are the paper's published numbers, measured on the paper's data, not here."


# ----------------------------------------------------------------------------- collecting


@dataclass
class Figure:
    """A PNG a table lists: where it is, and where the report keeps its copy (relative path)."""

    name: str
    source: Path
    copy: str


@dataclass
class FoundTable:
    """A table read from `path`; `key` is unique within the report (figure folder, HTML anchor)."""

    path: Path
    table: ResultTable
    key: str
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Problem:
    """A table file (or one of its figures) that could not be used, and why."""

    path: Path
    message: str


@dataclass
class Collection:
    sources: list[Path]
    tables: list[FoundTable]
    problems: list[Problem]

    def families(self) -> dict[str, list[FoundTable]]:
        """Tables by family, families sorted, tables in the order found."""
        out: dict[str, list[FoundTable]] = {}
        for found in sorted(self.tables, key=lambda f: f.table.family):
            out.setdefault(found.table.family, []).append(found)
        return out


def collect(sources: Sequence[str | Path]) -> Collection:
    """Every result table under `sources` (folders, searched recursively, or table files).

    A source that does not exist is an error (a typo must not give an empty report); a table file
    that cannot be read or is malformed becomes a `Problem` and the others are still used."""
    paths: list[Path] = []
    for source in map(Path, sources):
        if not source.exists():
            raise DataError(f"{source} does not exist; give run folders, evaluation folders or table files")
        if source.is_file() and not source.name.endswith(TABLE_SUFFIX):
            raise DataError(f"{source} is not a result table (*{TABLE_SUFFIX}) nor a folder")
        paths += find_tables(source)
    tables: list[FoundTable] = []
    problems: list[Problem] = []
    keys: set[str] = set()
    for path in _unique(paths):
        try:
            table = _load(path)
        except DataError as exc:
            problems.append(Problem(path, str(exc)))
            continue
        key = _unique_name(_safe_name(f"{table.family}-{table.name}"), keys)
        found = FoundTable(path, table, key)
        found.figures = _figures(found, problems)
        tables.append(found)
    return Collection([Path(s) for s in sources], tables, problems)


def _unique(paths: list[Path]) -> list[Path]:
    """Each file once, however many of the sources contain it."""
    seen: set[Path] = set()
    out = []
    for path in paths:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def _load(path: Path) -> ResultTable:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read result table ({exc})") from exc
    if size > MAX_TABLE_BYTES:
        raise DataError(f"{path}: {size} bytes is too large for a result table (at most {MAX_TABLE_BYTES})")
    table = read_table(path)
    check_table(table, str(path))
    return table


def check_table(table: ResultTable, where: str) -> None:
    """Every field of the type the renderer needs (the JSON reader checks only the shape)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DataError(f"{where}: malformed result table ({what}); rewrite it with foundation.results")

    need(isinstance(table.family, str) and bool(table.family.strip()), "family must be a non-empty string")
    need(isinstance(table.name, str) and bool(table.name.strip()), "name must be a non-empty string")
    need(isinstance(table.title, str), "title must be a string")
    need(isinstance(table.metric, str), "metric must be a string")
    need(_strings(table.columns), "columns must be a list of strings")
    need(table.higher_is_better in (True, False, None), "higher_is_better must be true, false or null")
    need(_strings(table.notes), "notes must be a list of strings")
    need(_strings(table.figures), "figures must be a list of file names")
    need(isinstance(table.provenance, dict), "provenance must be an object")
    for row in table.rows:
        need(isinstance(row.label, str), f"row label {row.label!r} must be a string")
        for value in row.values:
            ok = value is None or isinstance(value, str | int | float) and not isinstance(value, bool)
            need(ok, f"row {row.label!r}: value {value!r} is not a number, a string or null")


def _strings(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(i, str) for i in items)


def _figures(found: FoundTable, problems: list[Problem]) -> list[Figure]:
    """The table's figures that exist beside it and are PNGs; each other one becomes a `Problem`.

    A figure name is a path relative to the table's folder and must stay inside it (a table file
    must not make the report copy files from elsewhere)."""
    folder = found.path.parent.resolve()
    names: set[str] = set()
    out = []
    for name in found.table.figures:
        source = (folder / name).resolve()
        if Path(name).is_absolute() or not source.is_relative_to(folder):
            why = "is not a path inside the table's folder"
        elif not source.is_file():
            why = "does not exist"
        elif not _is_png(source):
            why = "is not a PNG file"
        else:
            copy = _unique_name(_safe_name(Path(name).as_posix().replace("/", "_")), names)
            out.append(Figure(name, source, f"figures/{found.key}/{copy}"))
            continue
        problems.append(Problem(found.path, f"figure {name!r} {why}; the table is shown without it"))
    return out


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def _safe_name(text: str) -> str:
    """A file name made of letters, digits, '.', '_' and '-' only, not starting with a dot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip(".-") or "table"


def _unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`... if taken (case-insensitively: some file systems fold case)."""
    candidate, number = name, 1
    while candidate.lower() in taken or candidate.lower() in RESERVED_NAMES:
        number += 1
        candidate = f"{name}-{number}"
    taken.add(candidate.lower())
    return candidate


# ----------------------------------------------------------------------------- cells


def format_value(value: Any) -> str:
    """A cell's text: integers as they are, floats with three decimals (scientific notation when
    very small or large), strings as they are, missing or non-finite values as "–"."""
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return MISSING
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.2e}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.3f}"
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def best_cells(table: ResultTable) -> set[tuple[int, int]]:
    """(row, column) of the best value of each column among the rows of each source; ties all
    count. Nothing is marked where the table does not say which direction is better or where a
    source has fewer than two numbers in a column."""
    if table.higher_is_better is None:
        return set()
    pick = max if table.higher_is_better else min
    best = set()
    for column in range(len(table.columns)):
        for source in ("ours", "paper"):
            cells = [
                (i, v)
                for i, row in enumerate(table.rows)
                if row.source == source and (v := _number(row.values[column])) is not None
            ]
            if len(cells) < 2:
                continue
            top = pick(v for _, v in cells)
            best |= {(i, column) for i, v in cells if v == top}
    return best


def family_title(family: str) -> str:
    return FAMILY_TITLES.get(family, family)


def _metric_line(table: ResultTable) -> str:
    direction = {True: "higher is better", False: "lower is better", None: ""}[table.higher_is_better]
    parts = [p for p in (table.metric, direction) if p]
    return "; ".join(parts)


def _provenance_items(found: FoundTable) -> list[tuple[str, str]]:
    """(key, text) pairs: the table file, then command, config hash and data, then the rest."""
    prov = found.table.provenance
    order = ["command", "config_hash", "data"] + sorted(
        k for k in prov if k not in ("command", "config_hash", "data")
    )
    items = [("table file", str(found.path))]
    for key in order:
        if key in prov:
            value = prov[key]
            items.append((key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)))
    return items


# ----------------------------------------------------------------------------- Markdown


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def md_escape(text: str) -> str:
    """Text that Markdown shows as it is: punctuation that would format is backslash-escaped and
    `<`, `>`, `&` are entities (Markdown passes raw HTML through); newlines become spaces."""
    text = html.escape(" ".join(str(text).splitlines()), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_code(text: str) -> str:
    """`text` as an inline code span, whatever backticks it holds."""
    text = " ".join(str(text).splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or longest else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_table(found: FoundTable) -> str:
    """The table in Markdown: paper rows labelled "(paper)", best values in bold, "–" for gaps."""
    table = found.table
    best = best_cells(table)
    lines = [
        "| | " + " | ".join(map(md_escape, table.columns)) + " |",
        "|" + "|".join("---" for _ in range(len(table.columns) + 1)) + "|",
    ]
    for i, row in enumerate(table.rows):
        label = md_escape(row.label) + (" *(paper)*" if row.source == "paper" else "")
        cells = []
        for j, value in enumerate(row.values):
            text = md_escape(format_value(value))
            cells.append(f"**{text}**" if (i, j) in best else text)
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def _md_problems(problems: Sequence[Problem]) -> list[str]:
    if not problems:
        return []
    lines = ["**Damaged table files (not shown, or shown without the figure named):**", ""]
    lines += [f"- {md_code(str(p.path))}: {md_escape(p.message)}" for p in problems]
    return [*lines, ""]


def _md_section(found: FoundTable) -> list[str]:
    table = found.table
    lines = [f"## {md_escape(table.title or table.name)}", ""]
    metric = _metric_line(table)
    if metric:
        lines += [
            f"Metric: {md_escape(metric)}. Bold: the best value of each column among our rows "
            "and among the paper's rows."
            if table.higher_is_better is not None
            else f"Metric: {md_escape(metric)}.",
            "",
        ]
    lines += [markdown_table(found), ""]
    if any(row.source == "paper" for row in table.rows):
        lines += [md_escape(PAPER_NOTE.replace("marked paper", "marked (paper)")), ""]
    if table.notes:
        lines += [f"- {md_escape(note)}" for note in table.notes] + [""]
    for figure in found.figures:
        lines += [f"![{md_escape(figure.name)}]({quote(figure.copy)})", ""]
    lines += ["Provenance:", ""]
    lines += [f"- {key}: {md_code(value)}" for key, value in _provenance_items(found)]
    return [*lines, ""]


def render_markdown(family: str, tables: Sequence[FoundTable], problems: Sequence[Problem] = ()) -> str:
    """The Markdown page of one family."""
    lines = [f"# {md_escape(family_title(family))}", ""]
    lines += _md_problems(problems)
    for found in tables:
        lines += _md_section(found)
    return "\n".join(lines).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- HTML


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 70em;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
nav { margin-bottom: 1.5em; } nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #c8c8c8; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eef1f5; }
tr.paper td { background: #f7f3e8; font-style: italic; }
td.best { font-weight: bold; }
.badge { font-size: 0.75em; font-style: normal; border: 1px solid #a08a4a; border-radius: 0.3em;
         padding: 0 0.3em; margin-left: 0.4em; color: #6b5a22; }
.metric, .legend { color: #555; }
.problems { border: 1px solid #d08a8a; background: #fdf0f0; padding: 0.5em 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
dl.provenance { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; font-size: 0.9em; }
dl.provenance dt { color: #555; } dl.provenance dd { margin: 0; }
code { background: #f3f3f3; padding: 0 0.2em; word-break: break-all; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_table(found: FoundTable) -> str:
    """The table in HTML: paper rows with a "paper" badge, best values in bold, "–" for gaps."""
    table = found.table
    best = best_cells(table)
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = []
    for i, row in enumerate(table.rows):
        paper = row.source == "paper"
        label = _e(row.label) + ('<span class="badge">paper</span>' if paper else "")
        cells = "".join(
            f'<td class="best">{_e(format_value(v))}</td>'
            if (i, j) in best
            else f"<td>{_e(format_value(v))}</td>"
            for j, v in enumerate(row.values)
        )
        row_class = ' class="paper"' if paper else ""
        body.append(f"<tr{row_class}><td>{label}</td>{cells}</tr>")
    return (
        f"<table>\n<thead><tr><th></th>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>"
    )


def _html_problems(problems: Sequence[Problem]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li><code>{_e(p.path)}</code>: {_e(p.message)}</li>" for p in problems)
    return (
        '<div class="problems"><strong>Damaged table files (not shown, or shown without the figure '
        f"named):</strong><ul>{items}</ul></div>"
    )


def _html_section(found: FoundTable) -> str:
    table = found.table
    parts = [f'<section id="{_e(found.key)}">', f"<h2>{_e(table.title or table.name)}</h2>"]
    metric = _metric_line(table)
    if metric:
        legend = (
            " Bold: the best value of each column among our rows and among the paper's rows."
            if (table.higher_is_better is not None)
            else ""
        )
        parts.append(f'<p class="metric">Metric: {_e(metric)}.{_e(legend)}</p>')
    parts.append(html_table(found))
    if any(row.source == "paper" for row in table.rows):
        parts.append(f'<p class="legend">{_e(PAPER_NOTE)}</p>')
    if table.notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in table.notes) + "</ul>")
    for figure in found.figures:
        src = _e(quote(figure.copy))
        parts.append(
            f'<figure><a href="{src}"><img src="{src}" alt="{_e(figure.name)}"></a>'
            f"<figcaption>{_e(figure.name)}</figcaption></figure>"
        )
    items = "".join(f"<dt>{_e(k)}</dt><dd><code>{_e(v)}</code></dd>" for k, v in _provenance_items(found))
    parts += ["<h3>Provenance</h3>", f'<dl class="provenance">{items}</dl>', "</section>"]
    return "\n".join(parts)


def _page(title: str, nav: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def _nav(pages: dict[str, str]) -> str:
    links = ['<a href="index.html">index</a>']
    links += [
        f'<a href="{_e(quote(page))}.html">{_e(family_title(family))}</a>' for family, page in pages.items()
    ]
    return " ".join(links)


def render_html(
    family: str,
    tables: Sequence[FoundTable],
    problems: Sequence[Problem] = (),
    pages: dict[str, str] | None = None,
) -> str:
    """The HTML page of one family; `pages` (family -> page name) makes the navigation bar."""
    body = [f"<h1>{_e(family_title(family))}</h1>", _html_problems(problems)]
    toc = "".join(f'<li><a href="#{_e(f.key)}">{_e(f.table.title or f.table.name)}</a></li>' for f in tables)
    body.append(f"<ul>{toc}</ul>")
    body += [_html_section(found) for found in tables]
    return _page(family_title(family), _nav(pages or {}), "\n".join(b for b in body if b))


def render_index(collection: Collection, pages: dict[str, str]) -> str:
    """index.html: one link per family page, the sources scanned and any damaged files."""
    families = collection.families()
    items = "".join(
        f'<li><a href="{_e(quote(page))}.html">{_e(family_title(family))}</a> '
        f"({len(families[family])} table{'s' if len(families[family]) != 1 else ''}; "
        f'<a href="{_e(quote(page))}.md">Markdown</a>)</li>'
        for family, page in pages.items()
    )
    found = f"<ul>{items}</ul>" if items else "<p>No result tables were found.</p>"
    sources = "".join(f"<li><code>{_e(s)}</code></li>" for s in collection.sources)
    body = [
        "<h1>Results</h1>",
        _html_problems(collection.problems),
        found,
        f"<h2>Sources scanned</h2><ul>{sources}</ul>",
    ]
    return _page("Results", _nav(pages), "\n".join(b for b in body if b))


# ----------------------------------------------------------------------------- the report folder


def page_names(collection: Collection) -> dict[str, str]:
    """family -> the file stem of its pages (a safe, unique name)."""
    taken: set[str] = set()
    return {family: _unique_name(_safe_name(family), taken) for family in collection.families()}


def build_report(collection: Collection, folder: Path) -> dict[str, Any]:
    """Write every page, figure and the manifest into the (new, empty) `folder`; returns the manifest."""
    pages = page_names(collection)
    families = collection.families()
    for family, page in pages.items():
        tables = families[family]
        (folder / f"{page}.md").write_text(
            render_markdown(family, tables, collection.problems), encoding="utf-8"
        )
        html_text = render_html(family, tables, collection.problems, pages)
        (folder / f"{page}.html").write_text(html_text, encoding="utf-8")
        for found in tables:
            for figure in found.figures:
                target = folder / figure.copy
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(figure.source, target)
    (folder / "index.html").write_text(render_index(collection, pages), encoding="utf-8")
    manifest = {
        "format": REPORT_FORMAT,
        "sources": [str(s) for s in collection.sources],
        "pages": {family: [f"{page}.md", f"{page}.html"] for family, page in pages.items()},
        "tables": [
            {
                "family": f.table.family,
                "name": f.table.name,
                "file": str(f.path),
                "figures": [g.copy for g in f.figures],
            }
            for f in collection.tables
        ],
        "problems": [{"file": str(p.path), "message": p.message} for p in collection.problems],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def is_report_folder(folder: Path) -> bool:
    """Whether `folder` was written by `write_report` (and may therefore be replaced)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{out} is not a folder; --overwrite replaces only an earlier report folder")
    if any(out.iterdir()) and not is_report_folder(out):
        raise DataError(
            f"{out} is not a report folder (no {MANIFEST} of format {REPORT_FORMAT}); "
            "--overwrite replaces only an earlier report, so choose another --out"
        )


def write_report(collection: Collection, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Render `collection` into the folder `out` atomically (built beside it, then renamed), holding
    the folder's lock; an existing `out` is refused unless `overwrite` and it is an earlier report."""
    out = Path(out)
    with FolderLock(out, "foundation report"):
        _check_target(out, overwrite)
        tmp = atomic.temporary_name(out)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            manifest = build_report(collection, tmp)
            if out.exists():
                os.rename(out, old)
            try:
                atomic.publish(tmp, out, overwrite=False)
            except BaseException:
                if old.exists() and not out.exists():
                    os.rename(old, out)
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return manifest
