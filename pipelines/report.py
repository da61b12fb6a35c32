"""`foundation report RUN_OR_EVAL_DIRS... --out REPORT`: the papers' result tables as Markdown and HTML.

Finds every `*.table.json` under the folders given (run folders, evaluation output folders,
searched recursively; table files may be named directly) and writes one Markdown and one HTML page
per family, the figures the tables list and an `index.html` (`foundation.report`). A damaged table
file is listed at the top of every page and on stderr, and the rest is rendered; `--strict` makes
it an error instead (nothing is written).
"""

from __future__ import annotations

import argparse
import sys

from foundation.cli import Command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="RUN_OR_EVAL_DIR",
        help="Folders to search for *.table.json (recursively), or table files.",
    )
    parser.add_argument("--out", required=True, help="The report folder to write (e.g. report/).")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an earlier report at --out (and nothing else)."
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="Refuse to write a report when a table file (or a figure it lists) is damaged.",
    )


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from foundation.errors import DataError
    from foundation.report import collect, write_report

    collection = collect(args.sources)
    for problem in collection.problems:
        print(f"warning: {problem.path}: {problem.message}", file=sys.stderr)
    if args.strict and collection.problems:
        raise DataError(
            f"{len(collection.problems)} damaged table file(s), the first {collection.problems[0].path}; "
            "fix or remove them, or drop --strict to render the rest"
        )
    if not collection.tables:
        print(f"warning: no result tables (*.table.json) under {', '.join(args.sources)}", file=sys.stderr)
    write_report(collection, Path(args.out), overwrite=args.overwrite)
    families = ", ".join(f"{family} {len(tables)}" for family, tables in collection.families().items())
    print(f"{len(collection.tables)} tables{' (' + families + ')' if families else ''}")
    print(f"report -> {Path(args.out) / 'index.html'}")
    return 0


COMMANDS = [
    Command(
        ("report",),
        "Render the papers' result tables found under run / evaluation folders as Markdown and HTML.",
        _add_arguments,
        _run,
    )
]
