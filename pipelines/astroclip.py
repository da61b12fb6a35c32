"""AstroCLIP jobs: `synth astroclip` (a built-in galaxy survey in Multimodal Universe HDF5 and
FITS) and `prepare astroclip` (images + spectra [+ catalogue] → cross-matched shards)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation.cli import Command, add_progress_argument, progress_enabled
from foundation.errors import DataError

log = logging.getLogger(__name__)

#: Targets looked for when --targets is not given: name -> candidate columns (catalogue, then spectra).
DEFAULT_TARGETS = {
    "redshift": ("Z_HP", "Z"),
    "stellar_mass": ("PROVABGS_LOGMSTAR_BF", "LOGMSTAR", "LOG_MSTAR"),
    "metallicity": ("Z_MW",),
    "age": ("TAGE_MW",),
    "sfr": ("AVG_SFR",),
}
TARGET_UNITS = {
    "redshift": "",
    "stellar_mass": "log10 Msun",
    "metallicity": "mass fraction",
    "age": "Gyr",
    "sfr": "Msun/yr",
    "ssfr": "log10 1/yr",
}
SPLITS = {"train": 0.8, "valid": 0.1, "test": 0.1}
#: Most pixels a --grid may give (DESI's spectra have 7781; each sample stores one float per pixel).
MAX_GRID_PIXELS = 1_000_000
#: Resamplers kept (one per distinct source wavelength grid); the oldest is dropped beyond that.
RESAMPLER_CACHE = 64


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


@dataclass
class TargetSpec:
    name: str
    column: str  # as given (case-insensitive lookup), or "log10(AVG_SFR)-PROVABGS_LOGMSTAR_BF" style for ssfr
    unit: str = ""


def parse_targets(text: str | None) -> list[TargetSpec] | None:
    """`COLUMN[:name],...` -> target specs; None = the defaults that are present."""
    if text is None:
        return None
    specs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        column, _, name = item.partition(":")
        name = name or column.lower()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise DataError(f"--targets: {name!r} is not a valid field name (letters, digits, _ and -)")
        specs.append(TargetSpec(name, column, TARGET_UNITS.get(name, "")))
    if not specs:
        raise DataError("--targets is empty; give COLUMN[:name] entries, e.g. Z:redshift")
    return specs


def parse_grid(text: str) -> tuple[float, float, float]:
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise DataError(f"--grid must be START:STOP:STEP in Å (e.g. 3600:9824:0.8), got {text!r}") from None
    if not (math.isfinite(start) and math.isfinite(stop) and step > 0 and stop > start):
        raise DataError(f"--grid {text!r}: need finite numbers with STOP > START and STEP > 0")
    pixels = math.floor((stop - start) / step + 1e-6) + 1  # as wavelength_grid counts them
    if not 2 <= pixels <= MAX_GRID_PIXELS:
        raise DataError(
            f"--grid {text!r} gives {pixels} pixel(s); it must give 2 to {MAX_GRID_PIXELS} (check STEP)"
        )
    return start, stop, step


def _parse_splits(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise DataError(f"--splits must look like train=0.8,valid=0.1,test=0.1, got {text!r}") from None
    return out


def _key(object_id: str, used: set[str]) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", object_id) or "object"
    unique, n = key, 1
    while unique in used:
        n += 1
        unique = f"{key}-{n}"
    used.add(unique)
    return unique


class _TargetResolver:
    """Target values for matched objects: catalogue columns first, then spectra, then images."""

    def __init__(self, sources: list[tuple[str, Any, Any]]):
        self.sources = sources  # (label, Rows, row index per matched object or -1)

    def lookup(self, column: str):
        import numpy as np

        for label, rows, index in self.sources:
            values = rows.column(column)
            if values is not None:
                out = np.full(len(index), np.nan)
                ok = index >= 0
                out[ok] = values[index[ok]].astype(np.float64)
                return out, label
        return None, None

    def columns(self) -> list[str]:
        return sorted({c for _, rows, _ in self.sources for c in rows.columns})

    def resolve(self, specs: list[TargetSpec] | None) -> dict[str, tuple[Any, str, str]]:
        """{name: (values (N,), source description, unit)}."""
        import numpy as np

        out: dict[str, tuple[Any, str, str]] = {}
        if specs is not None:
            for spec in specs:
                values, label = self.lookup(spec.column)
                if values is None:
                    raise DataError(
                        f"--targets: no column {spec.column!r} in the catalogue, spectra or images; "
                        "available: "
                        f"{', '.join(self.columns())}"
                    )
                out[spec.name] = (values, f"{label}:{spec.column}", spec.unit)
            return out
        for name, candidates in DEFAULT_TARGETS.items():
            for column in candidates:
                values, label = self.lookup(column)
                if values is not None:
                    out[name] = (values, f"{label}:{column}", TARGET_UNITS[name])
                    break
        if "sfr" in out and "stellar_mass" in out:
            sfr, mass = out["sfr"][0], out["stellar_mass"][0]
            with np.errstate(divide="ignore", invalid="ignore"):
                ssfr = np.where(sfr > 0, np.log10(np.where(sfr > 0, sfr, 1.0)) - mass, np.nan)
            out["ssfr"] = (ssfr, f"log10({out['sfr'][1]}) - {out['stellar_mass'][1]}", TARGET_UNITS["ssfr"])
        return out


def prepare(
    images: Any,
    spectra: Any,
    out: str,
    *,
    catalog: Any = None,
    bands: Sequence[str] = ("g", "r", "z"),
    cutout: int | None = None,
    grid: tuple[float, float, float] = (3600.0, 9824.0, 0.8),
    radius_arcsec: float = 1.0,
    targets: list[TargetSpec] | None = None,
    splits: dict[str, float] | None = None,
    samples_per_shard: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    allow_degenerate: bool = False,
    chunk: int = 256,
    progress: bool | None = False,
    image_mask_means: str | None = None,
    spectrum_mask_means: str | None = None,
    masked_pixels: str = "zero",
) -> dict[str, Any]:
    """Cross-match images with spectra (and a catalogue of targets) on the sky, resample spectra
    to `grid`, centre-crop images to `cutout`, and write an astroclip shard set. Returns a report.

    `image_mask_means` / `spectrum_mask_means` (clean|bad|bits) override what each file's mask is
    taken to mean; by default it comes from the file (see formats.image_mask_meaning). Objects whose
    image has a band without one good pixel, or whose spectrum has no good pixel on the grid, are
    skipped and counted (`report["skipped"]`). `masked_pixels` (zero|keep): what bad pixels hold in
    the shards, 0 or the survey's value (the released AstroCLIP saw the survey values)."""
    import numpy as np
    from tqdm import tqdm

    from encoders.astroclip.crossmatch import match_unique
    from encoders.astroclip.formats import CatalogSource, ImageSource, SpectrumSource
    from encoders.astroclip.resample import Resampler
    from encoders.astroclip.survey import wavelength_grid
    from foundation.data import ShardSetWriter

    if radius_arcsec <= 0:
        raise DataError(f"--match-radius must be positive, got {radius_arcsec}")
    image_src = ImageSource(images, bands, cutout, mask_means=image_mask_means, masked_pixels=masked_pixels)
    spec_src = SpectrumSource(spectra, mask_means=spectrum_mask_means)
    _check_grid_overlap(grid, spec_src.wavelength_range())
    match = match_unique(
        image_src.rows.ra, image_src.rows.dec, spec_src.rows.ra, spec_src.rows.dec, radius_arcsec
    )
    log.info("%s", match.summary("image", "spectrum"))
    if match.matched == 0:
        raise DataError(
            f'no image lies within {radius_arcsec}" of exactly one spectrum ({len(image_src.rows)} images, '
            f"{len(spec_src.rows)} spectra): check that both cover the same sky, or raise --match-radius"
        )
    report: dict[str, Any] = {
        "images": len(image_src.rows),
        "spectra": len(spec_src.rows),
        "match": match.to_dict(),
        "match_radius_arcsec": radius_arcsec,
    }
    sources = [("spectra", spec_src.rows, match.index_b), ("images", image_src.rows, match.index_a)]
    if catalog is not None:
        cat_src = CatalogSource(catalog)
        cat_match = match_unique(
            spec_src.rows.ra[match.index_b],
            spec_src.rows.dec[match.index_b],
            cat_src.rows.ra,
            cat_src.rows.dec,
            radius_arcsec,
        )
        log.info("%s", cat_match.summary("object", "catalogue"))
        cat_index = np.full(match.matched, -1)
        cat_index[cat_match.index_a] = cat_match.index_b
        sources.insert(0, ("catalog", cat_src.rows, cat_index))
        report["catalog"] = {"rows": len(cat_src.rows), "match": cat_match.to_dict()}
    resolved = _TargetResolver(sources).resolve(targets)
    if not resolved:
        log.warning(
            "no regression targets found (looked for %s); pass --targets COLUMN:name",
            ", ".join(c for cs in DEFAULT_TARGETS.values() for c in cs),
        )
    wavelength = wavelength_grid(*grid)
    splits = splits or dict(SPLITS)
    schema: dict[str, Any] = {
        "image": {
            "unit": "nanomaggy",
            "description": f"cutout, bands {','.join(image_src.bands)}, (bands, H, W), bad pixels: "
            + ("0" if masked_pixels == "zero" else "survey value"),
        },
        "image_ivar": {"unit": "nanomaggy^-2", "description": "inverse variance of image; 0 = bad pixel"},
        "spectrum": {
            "unit": "1e-17 erg/s/cm2/Angstrom",
            "description": "flux on extra.wavelength; bad pixels: "
            + ("0" if masked_pixels == "zero" else "survey value"),
        },
        "spectrum_ivar": {
            "unit": "1e+34 s2 cm4 Angstrom2/erg2",
            "description": "inverse variance of spectrum",
        },
        "spectrum_mask": {"description": "True = bad spectral pixel"},
        "meta": {"description": "object_id (spectrum), image_id, ra, dec (deg), separation_arcsec"},
    }
    for name, (_, source, unit) in resolved.items():
        schema[name] = {
            "kind": "scalar",
            "dtype": "float64",
            "unit": unit or None,
            "optional": True,
            "description": f"regression target from {source}",
        }
        if not unit:
            del schema[name]["unit"]
    extra = {
        "bands": list(image_src.bands),
        "pixel_scale_arcsec": image_src.pixel_scale,
        "mask_meanings": {"image": image_src.mask_meanings, "spectrum": spec_src.mask_meanings},
        "masked_pixels": masked_pixels,
        "image_size": image_src.size,
        "wavelength": {
            "start": float(wavelength[0]),
            "stop": float(wavelength[-1]),
            "step": float(grid[2]),
            "pixels": len(wavelength),
            "medium": "vacuum",
            "unit": "Angstrom",
        },
        "targets": {name: {"source": source, "unit": unit} for name, (_, source, unit) in resolved.items()},
        "match": report,
    }
    provenance = {
        "images": [str(p) for p in image_src.files[:50]],
        "spectra": [str(p) for p in spec_src.files[:50]],
        "catalog": str(catalog) if catalog is not None else None,
        "command": " ".join(sys.argv),
    }
    spec_stats: list[np.ndarray] = []
    log_scales: list[np.ndarray] = []
    sky: list[np.ndarray] = []
    resamplers: dict[bytes, Resampler] = {}
    used: set[str] = set()
    order = np.lexsort((spec_src.rows.row[match.index_b], spec_src.rows.file_index[match.index_b]))
    counts: dict[str, int] = {}
    skipped = {"image_band_without_good_pixels": 0, "spectrum_without_good_pixels": 0}
    missing_targets = {name: 0 for name in resolved}
    with ShardSetWriter(
        out,
        splits,
        samples_per_shard=samples_per_shard,
        family="astroclip",
        schema=schema,
        extra=extra,
        provenance=provenance,
        seed=seed,
        split_salt=str(seed),
        overwrite=overwrite,
        masks={"image": ("image_ivar", "weight")},
        hints=_DEGENERATE_HINTS,
        allow_degenerate=allow_degenerate,
    ) as writer:
        bar = tqdm(total=match.matched, desc="prepare astroclip", unit="object", disable=not progress)
        for start in range(0, match.matched, chunk):
            pick = order[start : start + chunk]
            img = image_src.read(match.index_a[pick])
            flux = np.empty((len(pick), len(wavelength)), np.float32)
            ivar = np.empty_like(flux)
            bad = np.empty(flux.shape, bool)
            for pos, batch in spec_src.read(match.index_b[pick]):
                for k, p in enumerate(pos):
                    lam = batch.wavelength[k]
                    key = lam.tobytes()
                    if key not in resamplers:
                        if len(resamplers) >= RESAMPLER_CACHE:  # SDSS: one grid per plate
                            resamplers.pop(next(iter(resamplers)))
                        resamplers[key] = Resampler(lam, wavelength, keep_masked=masked_pixels == "keep")
                    f, iv, m = resamplers[key](
                        batch.flux[k : k + 1], batch.ivar[k : k + 1], batch.mask[k : k + 1]
                    )
                    flux[p], ivar[p], bad[p] = f[0], iv[0], m[0]
            empty_image = img.mask.all(axis=(2, 3)).any(axis=1)
            empty_spectrum = bad.all(axis=1)
            skipped["image_band_without_good_pixels"] += int(empty_image.sum())
            skipped["spectrum_without_good_pixels"] += int((empty_spectrum & ~empty_image).sum())
            for k, i in enumerate(pick):
                if empty_image[k] or empty_spectrum[k]:
                    continue
                ia, ib = match.index_a[i], match.index_b[i]
                object_id = str(spec_src.rows.object_id[ib])
                sample: dict[str, Any] = {
                    "__key__": _key(object_id, used),
                    "image": img.image[k],
                    "image_ivar": img.ivar[k],
                    "spectrum": flux[k],
                    "spectrum_ivar": ivar[k],
                    "spectrum_mask": bad[k],
                    "meta": {
                        "object_id": object_id,
                        "image_id": str(image_src.rows.object_id[ia]),
                        "ra": float(spec_src.rows.ra[ib]),
                        "dec": float(spec_src.rows.dec[ib]),
                        "separation_arcsec": float(match.separation_arcsec[i]),
                    },
                }
                for name, (values, _, _) in resolved.items():
                    if np.isfinite(values[i]):
                        sample[name] = float(values[i])
                    else:
                        missing_targets[name] += 1
                image_file = str(image_src.files[image_src.rows.file_index[ia]])
                spectrum_file = str(spec_src.files[spec_src.rows.file_index[ib]])
                source = dict.fromkeys(("image", "image_ivar"), image_file)
                source.update(dict.fromkeys(("spectrum", "spectrum_ivar"), spectrum_file))
                split = writer.write(sample, source=source)
                counts[split] = counts.get(split, 0) + 1
                if split == "train":
                    spec_stats.append(_spectrum_stats(flux[k], bad[k]))
                    log_scales.append(np.log10(max(float(np.sqrt(np.mean(np.square(img.image[k])))), 1e-6)))
                    good = img.ivar[k] > 0
                    sky.append(
                        np.array(
                            [
                                np.median(1 / np.sqrt(img.ivar[k][b][good[b]])) if good[b].any() else np.nan
                                for b in range(len(bands))
                            ]
                        )
                    )
            bar.update(len(pick))
        bar.close()
        if not counts:
            raise DataError(
                f"every matched object was skipped ({skipped}): no image has good pixels in every band "
                f"of --bands {','.join(bands)}, or no spectrum has good pixels on --grid; check the masks "
                "(--image-mask-means, --spectrum-mask-means) and the inputs"
            )
        if not spec_stats:
            raise DataError(
                f"no object landed in the train split ({counts}); use more objects or other --splits"
            )
        spec_stats_arr = np.array(spec_stats)
        sky_arr = np.nanmedian(np.array(sky), axis=0)
        writer.stats.update(
            {
                "spectrum_stats_token": {
                    "mean": spec_stats_arr.mean(0).tolist(),
                    "std": spec_stats_arr.std(0).tolist(),
                    "features": ["asinh(mean flux)", "ln(std flux, floored at 0.2)"],
                },
                "image_log_scale": {"mean": float(np.mean(log_scales)), "std": float(np.std(log_scales))},
                "image_sky_sigma": sky_arr.tolist(),
                "image_scale_floor": float(np.median(sky_arr)),
            }
        )
    report.update(
        {
            "written": counts,
            "skipped": skipped,
            "targets": {k: v[1] for k, v in resolved.items()},
            "missing_targets": missing_targets,
            "out": str(out),
        }
    )
    return report


def _check_grid_overlap(grid: tuple[float, float, float], data_range: tuple[float, float]) -> None:
    """Refuse a model grid that misses the spectra's wavelengths (every spectrum would be empty)."""
    start, stop, _ = grid
    low, high = data_range
    if stop <= low or start >= high:
        raise DataError(
            f"--grid {start:g}:{stop:g} Å does not overlap the spectra's wavelengths "
            f"({low:.1f}–{high:.1f} Å); choose a grid inside that range"
        )


_DEGENERATE_HINTS = {
    "image": "the image mask may mean the opposite of what it was read as (MMU legacysurvey and hsc: "
    "True = clean pixel; set --image-mask-means), or the cutouts lie outside the images",
    "image_ivar": "the image mask may mean the opposite of what it was read as (set "
    "--image-mask-means), or the files carry no inverse variance",
    "spectrum": "the spectrum mask may mean the opposite of what it was read as (MMU desi and sdss: "
    "True = bad pixel; set --spectrum-mask-means), or --grid barely overlaps the spectra",
    "spectrum_ivar": "the spectrum mask may mean the opposite of what it was read as (set "
    "--spectrum-mask-means), or --grid barely overlaps the spectra",
}


def _spectrum_stats(flux, bad, std_floor: float = 0.2):
    """The statistics token's raw features, as SpecFormer computes them (asinh mean, ln std)."""
    import numpy as np

    good = ~bad
    values = flux[good] if good.any() else np.zeros(1)
    return np.array([np.arcsinh(values.mean()), np.log(max(values.std(), std_floor))])


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
    parser.add_argument(
        "--splits", default="train=0.8,valid=0.1,test=0.1", help="Split fractions by key hash."
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="Salts the split hash.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing shard set at --out.")
    parser.add_argument(
        "--allow-degenerate",
        action="store_true",
        help="Write fields that come out all zeros, all masked or constant (docs/shards.md).",
    )
    add_progress_argument(parser)


def _prepare_run(args: argparse.Namespace) -> int:
    from foundation.data import Manifest
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
        splits=_parse_splits(args.splits),
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        overwrite=args.overwrite,
        allow_degenerate=args.allow_degenerate,
        progress=progress_enabled(args.progress),
        image_mask_means=args.image_mask_means,
        spectrum_mask_means=args.spectrum_mask_means,
        masked_pixels=args.masked_pixels,
    )
    print(format_field_summary(Manifest.load(args.out)))
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
