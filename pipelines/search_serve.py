"""`foundation search serve INDEX [INDEX ...]`: browse cross-modal search in a web page on localhost.

The library is `foundation.search.serve` (the Flask app and what it queries); this module parses
the options, opens the files, prints where to point a browser and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress

from foundation.cli import Command, bounded_int
from foundation.errors import ConfigError


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "index",
        nargs="+",
        metavar="INDEX",
        help="Index directory from `foundation search build` (one per modality; a modality without "
        "one is searched exactly in memory where its vectors fit).",
    )
    parser.add_argument(
        "--embeddings", help="The embeddings file the indexes were built from (default: the one they record)."
    )
    parser.add_argument(
        "--data", help="Shard set with the objects' images and spectra (default: the one the export records)."
    )
    parser.add_argument(
        "--fields",
        metavar="MOD=FIELD,...",
        help="Sample field holding each modality's input (default: the field named like the modality).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument(
        "--port", type=bounded_int(0, 65535), default=8000, help="Port (default 8000; 0 picks a free one)."
    )


def _check_host(host: str) -> None:
    """Refuse to listen beyond this machine by accident: the page has no authentication."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"warning: listening on {host}: anyone who can reach it can browse the data (no login)")


def _run(args: argparse.Namespace) -> int:
    from foundation.data.raw_inputs import parse_field_map
    from foundation.search.serve import SearchBrowser, create_app, make_server, require_flask
    from foundation.signals import sigterm_as_interrupt

    require_flask()
    fields = parse_field_map(args.fields, []) if args.fields else None
    _check_host(args.host)
    browser = SearchBrowser(args.index, embeddings=args.embeddings, data=args.data, fields=fields)
    try:
        try:
            server = make_server(create_app(browser), args.host, args.port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pick another --port"
            ) from None
        searchable = ", ".join(f"{m} ({how})" for m, how in browser.index_notes.items())
        print(f"{browser.emb.rows} objects from {browser.emb.path}; searchable: {searchable}")
        if browser.samples is None:
            print("no shard set given or recorded: the page shows no images or spectra (pass --data)")
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"browse at http://{host}:{server.server_port}/  (Ctrl-C to stop)", flush=True)
        try:
            with sigterm_as_interrupt():  # `kill` stops it as Ctrl-C does
                server.serve_forever()  # werkzeug's server returns on Ctrl-C
        finally:
            server.server_close()
        print("stopped")
    finally:
        browser.close()
    return 0


COMMANDS = [
    Command(
        ("search", "serve"),
        "Browse cross-modal search results in a web page on localhost (JSON API included).",
        _add_arguments,
        _run,
    ),
]
