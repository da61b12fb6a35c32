"""AstroCLIP jobs: `synth astroclip` (a built-in galaxy survey in Multimodal Universe HDF5 and
FITS) and `prepare astroclip` (images + spectra [+ catalogue] → cross-matched shards).

The work is done by `encoders.astroclip.survey` and `encoders.astroclip.prepare`; this module
parses the options and prints the reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from foundation.cli import (
    Command,
    add_progress_argument,
    add_shard_output_arguments,
    add_workers_argument,
    part_option,
    progress_enabled,
)
from foundation.errors import DataError

# ----------------------------------------------------------------------------- synth


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="Output root (legacysurvey/, desi/, provabgs/ [, fits/])."
    )
    parser.add_argument("--n", type=int, default=2000, help="Galaxies with both an image and a spectrum.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the population and the noise.")
    parser.add_argument("--image-size", type=int, default=64, help='Cutout size, pixels (0.262"/pixel).')
    parser.add_argument(
        "--wave-step",
        type=float,
        default=0.8,
        help="Spectral pixel width, Å, on 3600-9824 Å (DESI: 0.8; coarser = smaller files).",
    )
    parser.add_argument(
        "--format",
        choices=("hdf5", "fits", "both"),
        default="hdf5",
        help="Multimodal Universe HDF5 trees, FITS cutouts/tables, or both.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty --out.")
    add_progress_argument(parser)


def _synth_run(args: argparse.Namespace) -> int:
    from encoders.astroclip.survey import synthesize

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DataError(
            f"{out} exists and is not empty; refusing to write into it "
            "(pass --overwrite or choose another --out)"
        )
    if args.n < 1:
        raise DataError(f"--n must be at least 1, got {args.n}")
    if args.image_size < 16:
        raise DataError(f"--image-size must be at least 16 pixels, got {args.image_size}")
    if not 0.1 <= args.wave_step <= 50:
        raise DataError(f"--wave-step must be between 0.1 and 50 Å, got {args.wave_step}")
    formats = ("hdf5", "fits") if args.format == "both" else (args.format,)
    summary = synthesize(
        str(out),
        args.n,
        seed=args.seed,
        image_size=args.image_size,
        wave_step=args.wave_step,
        formats=formats,
        progress=progress_enabled(args.progress),
    )
    print(json.dumps(summary, indent=2))
    print(
        f"next: foundation prepare astroclip --images {summary['images']} --spectra {summary['spectra']} "
        f"--catalog {summary['catalog']} --out SHARDS"
    )
    return 0


# ----------------------------------------------------------------------------- prepare


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        required=True,
        help="MMU HDF5 tree / files and/or FITS cutouts (files or directories, comma-separated).",
    )
    parser.add_argument("--spectra", required=True, help="MMU HDF5 tree / files and/or FITS spectrum tables.")
    parser.add_argument("--catalog", help="Catalogue of targets (MMU HDF5 tree or FITS table), sky-matched.")
    parser.add_argument("--out", required=True, help="Shard set directory to write.")
    parser.add_argument("--bands", default="g,r,z", help="Image bands to keep, in order (default g,r,z).")
    parser.add_argument("--cutout", type=int, help="Centre-crop images to this many pixels (default: keep).")
    parser.add_argument(
        "--image-mask-means",
        choices=("clean", "bad", "bits"),
        help="What image masks hold: clean (True = good pixel, MMU legacysurvey/hsc), bad (True = bad "
        "pixel) or bits (bit flags, nonzero = bad). Default: decided per file, an error where unknown.",
    )
    parser.add_argument(
        "--spectrum-mask-means",
        choices=("clean", "bad", "bits"),
        help="What spectrum masks hold (as --image-mask-means; MMU desi/sdss: bad).",
    )
    parser.add_argument(
        "--masked-pixels",
        choices=("zero", "keep"),
        default="zero",
        help="What bad pixels hold in the shards: zero (default) or keep (the survey's values, as the "
        "released AstroCLIP saw them: use with a converted model). The masks are stored either way.",
    )
    parser.add_argument(
        "--grid",
        default="3600:9824:0.8",
        help="Model wavelength grid START:STOP:STEP in Å; spectra are resampled onto it.",
    )
    parser.add_argument(
        "--match-radius", type=float, default=1.0, help="Sky match radius, arcsec (default 1)."
    )
    parser.add_argument(
        "--targets",
        help="Regression targets COLUMN[:name],... (default: redshift, stellar "
        "mass, metallicity, age, SFR, sSFR where found).",
    )
    add_shard_output_arguments(
        parser,
        split_default="train=0.8,valid=0.1,test=0.1",
        split_help="Split fractions by key hash.",
        samples_per_shard=1000,
        seed_help="Salts the split hash.",
    )
    add_workers_argument(parser)
    parser.add_argument(
        "--part",
        type=part_option,
        default=None,
        metavar="I/N",
        help="Prepare only part I of N of the sky (nested nside-16 HEALPix pixels cut into N runs; "
        "pairs whose image lies in them, matched with the neighbouring pixels too), for "
        "`foundation shards merge` to join (default: the whole sky).",
    )
    add_progress_argument(parser)


def _prepare_run(args: argparse.Namespace) -> int:
    from encoders.astroclip.prepare import parse_grid, parse_targets, prepare
    from foundation.data.remote import load_manifest
    from foundation.data.summary import format_field_summary

    bands = [b.strip() for b in args.bands.split(",") if b.strip()]
    report = prepare(
        args.images,
        args.spectra,
        args.out,
        catalog=args.catalog,
        bands=bands,
        cutout=args.cutout,
        grid=parse_grid(args.grid),
        radius_arcsec=args.match_radius,
        targets=parse_targets(args.targets),
        splits=args.split_fractions,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        allow_degenerate=args.allow_degenerate,
        progress=progress_enabled(args.progress),
        image_mask_means=args.image_mask_means,
        spectrum_mask_means=args.spectrum_mask_means,
        masked_pixels=args.masked_pixels,
        part=args.part,
    )
    print(format_field_summary(load_manifest(args.out)))
    m = report["match"]
    print(
        f"matched {m['matched']} objects ({report['images']} images, {report['spectra']} spectra); "
        f"ambiguous: {m['ambiguous_a']} images / {m['ambiguous_b']} spectra; without counterpart: "
        f"{m['unmatched_a']} images / {m['unmatched_b']} spectra"
    )
    if "catalog" in report:
        c = report["catalog"]["match"]
        print(
            f"catalogue: {c['matched']} objects joined, {c['ambiguous_a'] + c['ambiguous_b']} ambiguous, "
            f"{c['unmatched_a']} without a catalogue row"
        )
    print(
        f"targets: {json.dumps(report['targets'])}; missing values: {json.dumps(report['missing_targets'])}"
    )
    if any(report["skipped"].values()):
        print(f"skipped (no good pixels): {json.dumps(report['skipped'])}")
    print(f"wrote {json.dumps(report['written'])} samples to {report['out']}")
    return 0


COMMANDS = [
    Command(
        ("synth", "astroclip"),
        "Write a built-in galaxy survey (images, spectra, catalogue) in MMU HDF5 / FITS.",
        _synth_arguments,
        _synth_run,
    ),
    Command(
        ("prepare", "astroclip"),
        "Cross-match galaxy images and spectra on the sky and write astroclip shards.",
        _prepare_arguments,
        _prepare_run,
    ),
]
