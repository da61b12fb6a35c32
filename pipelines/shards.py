"""`foundation shards info|verify|index|merge`: look inside, check, adopt or join shard sets."""

from __future__ import annotations

import argparse
import sys

from foundation.cli import Command, add_progress_argument, progress_enabled


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ----------------------------------------------------------------------------- info


def _add_location(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", help="Shard-set directory (holding manifest.json), or its URL (https://, s3://, gs://, hf://)."
    )
    parser.add_argument(
        "--cache-dir", help="Local cache for a URL's shards (default: $FOUNDATION_CACHE/shards or ~/.cache)."
    )
    parser.add_argument(
        "--cache-bytes", type=int, default=None, help="Bound on a URL's cached shards (default 16 GiB)."
    )


def _remote(args: argparse.Namespace):
    """The RemoteShardSet for a URL `dir`, else None."""
    from foundation.data.remote import DEFAULT_CACHE_BYTES, RemoteShardSet, is_url

    if not is_url(args.dir):
        return None
    return RemoteShardSet(args.dir, args.cache_dir, args.cache_bytes or DEFAULT_CACHE_BYTES)


def _add_info(parser: argparse.ArgumentParser) -> None:
    _add_location(parser)
    parser.add_argument("--json", action="store_true", help="Print the manifest as JSON instead.")


def _run_info(args: argparse.Namespace) -> int:
    import json

    from foundation.data import Manifest
    from foundation.data.schema import describe_shape
    from foundation.data.summary import format_table

    remote = _remote(args)
    manifest = remote.manifest if remote else Manifest.load(args.dir)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=1))
        return 0
    prov = manifest.provenance
    print(f"shard set  {remote.url if remote else manifest.path}")
    print(f"family     {manifest.family or '-'}")
    print(f"format     foundation-shards v{manifest.format_version}")
    if prov:
        print(f"created    {prov.get('created', '-')} by foundation {prov.get('package_version', '?')}")
        if prov.get("command"):
            print(f"command    {prov['command']}")
        if prov.get("seed") is not None:
            print(f"seed       {prov['seed']}")
        if prov.get("sources"):
            sources = prov["sources"]
            more = f" (+{len(sources) - 3} more)" if len(sources) > 3 else ""
            print(f"sources    {', '.join(sources[:3])}{more}")
    print()
    rows = [["split", "shards", "samples", "bytes", "samples/shard"]]
    for name, split in manifest.splits.items():
        per = f"{split.samples / len(split.shards):.0f}" if split.shards else "-"
        rows.append([name, str(len(split.shards)), str(split.samples), _human(split.bytes), per])
    print(format_table(rows))
    print()
    rows = [["field", "kind", "dtype", "shape", "unit", "description"]]
    for name, spec in manifest.schema.items():
        rows.append(
            [
                name + (" (optional)" if spec.optional else ""),
                spec.kind,
                spec.dtype or "-",
                describe_shape(spec),
                spec.unit or "-",
                spec.description or "",
            ]
        )
    print(format_table(rows))
    _print_field_summary(manifest)
    if manifest.stats:
        print(f"\nstats      {', '.join(manifest.stats)}")
    if manifest.extra:
        print(f"extra      {', '.join(manifest.extra)}")
    if manifest.files:
        print(f"files      {', '.join(f'{f.name} ({_human(f.bytes)})' for f in manifest.files.values())}")
    return 0


def _print_field_summary(manifest) -> None:
    """Per-field shares of finite / masked / zero elements and min/mean/max, all splits together,
    with a warning for each field the degenerate-data rules flag (docs/shards.md)."""
    from foundation.data.summary import (
        degenerate_reason,
        field_summary_rows,
        format_table,
        merged_field_stats,
    )

    stats = merged_field_stats(split.field_stats for split in manifest.splits.values())
    if not stats:
        return
    rows = field_summary_rows(stats)
    rows[0][0] = "field (all splits)"
    print()
    print(format_table(rows))
    for name, entry in stats.items():
        reason = degenerate_reason(entry, manifest.schema[name]) if name in manifest.schema else None
        if reason is not None:
            print(f"warning: field {name!r} {reason[1]}")


# ----------------------------------------------------------------------------- verify


def _add_verify(parser: argparse.ArgumentParser) -> None:
    _add_location(parser)
    parser.add_argument(
        "--all", action="store_true", help="List every problem instead of stopping at the first."
    )
    parser.add_argument("--split", action="append", help="Only this split (repeatable).")


def _run_verify(args: argparse.Namespace) -> int:
    from foundation.data.remote import DamagedShardError
    from foundation.data.verify import VerifyReport, verify_shard_set

    remote = _remote(args)
    try:
        # A URL: every shard is fetched and checked (size, sha256) into the cache, then verified there.
        local = remote.fetch_all(args.split) if remote else args.dir
        report = verify_shard_set(local, splits=args.split, all_problems=args.all)
    except DamagedShardError as exc:
        report = VerifyReport()
        report.problems.append(str(exc))
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    if report.problems:
        more = "" if args.all else " (stopped at the first; --all lists every problem)"
        print(f"FAILED: {len(report.problems)} problem(s) in {args.dir}{more}", file=sys.stderr)
        return 1
    print(
        f"OK: {report.shards} shards, {report.samples} samples, {_human(report.bytes)} verified in {args.dir}"
    )
    return 0


# ----------------------------------------------------------------------------- index


def _add_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="Directory of .tar shards (e.g. written with webdataset).")
    parser.add_argument("--family", help="Model family the shards are for (recorded in the manifest).")
    parser.add_argument(
        "--split",
        action="append",
        metavar="NAME=GLOB",
        help="Shards of a split, e.g. train='shard-*.tar' (repeatable). Default: <split>-*.tar names.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing manifest.json.")


def _run_index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from foundation.data.index import index_shards
    from foundation.errors import DataError

    splits = None
    if args.split:
        splits = {}
        for item in args.split:
            name, sep, pattern = item.partition("=")
            if not sep:
                raise DataError(f"--split {item!r} must look like NAME=GLOB, e.g. train='shard-*.tar'")
            paths = sorted(Path(args.dir).glob(pattern))
            if not paths:
                raise DataError(f"--split {item!r}: no files match {pattern!r} in {args.dir}")
            splits[name] = [p.name for p in paths]
    manifest = index_shards(args.dir, splits=splits, family=args.family, overwrite=args.overwrite)
    summary = ", ".join(
        f"{name} {s.samples} samples in {len(s.shards)} shards" for name, s in manifest.splits.items()
    )
    print(f"wrote {manifest.path}/manifest.json: {summary}; fields {', '.join(manifest.schema)}")
    return 0


# ----------------------------------------------------------------------------- merge


def _add_merge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "parts", nargs="+", metavar="PART", help="Partial shard sets (e.g. one per SLURM array task)."
    )
    parser.add_argument("--out", required=True, help="Folder of the merged shard set.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
    parser.add_argument(
        "--copy", action="store_true", help="Copy shards even where a hard link would do (same file system)."
    )
    parser.add_argument(
        "--allow-degenerate",
        action="store_true",
        help="Merge even if a field of the merged set is degenerate (recorded in its provenance).",
    )
    add_progress_argument(parser)


def _run_merge(args: argparse.Namespace) -> int:
    from foundation.data.merge import merge_shard_sets

    manifest = merge_shard_sets(
        args.parts,
        args.out,
        overwrite=args.overwrite,
        link=not args.copy,
        allow_degenerate=args.allow_degenerate,
        progress=progress_enabled(args.progress),
    )
    summary = ", ".join(
        f"{name} {s.samples} samples in {len(s.shards)} shards" for name, s in manifest.splits.items()
    )
    print(f"merged {len(args.parts)} part(s) into {manifest.path}: {summary}")
    return 0


COMMANDS = [
    Command(
        ("shards", "info"), "Show a shard set's splits, sizes, schema and statistics.", _add_info, _run_info
    ),
    Command(
        ("shards", "verify"),
        "Check checksums, tar structure and every sample against the schema (exit 1 on a problem).",
        _add_verify,
        _run_verify,
    ),
    Command(
        ("shards", "index"),
        "Write a manifest.json for existing tar shards (e.g. written with webdataset).",
        _add_index,
        _run_index,
    ),
    Command(
        ("shards", "merge"),
        "Join partial shard sets (e.g. one per SLURM array task) into one; statistics combined exactly.",
        _add_merge,
        _run_merge,
    ),
]
