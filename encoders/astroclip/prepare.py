"""Native survey files -> an astroclip shard set: galaxy images and spectra paired on the sky.

`prepare` reads cutouts and spectra (Multimodal Universe HDF5 trees or FITS, see `formats`),
keeps the images that lie within the match radius of exactly one spectrum, joins a catalogue of
regression targets the same way, resamples every spectrum onto the model's wavelength grid and
writes the pairs with `foundation.data.ShardSetWriter`, together with the training-split
statistics the towers normalise with. `shuffle_pairs` writes the shuffled-pair control: a copy of
a shard set whose spectra are permuted among the training objects.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from encoders.astroclip.crossmatch import match_unique_auto
from encoders.astroclip.formats import CatalogSource, ImageSource, Rows, SpectrumSource, find_files
from encoders.astroclip.partition import PART_FILES, SkyPart, train_summary
from encoders.astroclip.resample import Resampler
from encoders.astroclip.survey import wavelength_grid
from foundation.data import Manifest, ShardSetWriter
from foundation.errors import ConfigError, DataError

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


# ----------------------------------------------------------------------------- options


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
    """`START:STOP:STEP` in Å -> the model's wavelength grid, refused if it is empty or unbounded."""
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


# ----------------------------------------------------------------------------- prepare


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
    chunk: int = 32,
    workers: int = 1,
    progress: bool | None = False,
    image_mask_means: str | None = None,
    spectrum_mask_means: str | None = None,
    masked_pixels: str = "zero",
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Cross-match images with spectra (and a catalogue of targets) on the sky, resample spectra
    to `grid`, centre-crop images to `cutout`, and write an astroclip shard set. Returns a report.

    `image_mask_means` / `spectrum_mask_means` (clean|bad|bits) override what each file's mask is
    taken to mean; by default it comes from the file (see formats.image_mask_meaning). Objects whose
    image has a band without one good pixel, or whose spectrum has no good pixel on the grid, are
    skipped and counted (`report["skipped"]`). `masked_pixels` (zero|keep): what bad pixels hold in
    the shards, 0 or the survey's value (the released AstroCLIP saw the survey values). `workers`
    processes read and resample chunks of `chunk` objects (an MMU object is ~1 MB in flight, so
    memory is about 2 x workers x chunk MB); the shards are the same for any number.

    `part=(I, N)` prepares part I of N of the sky (`encoders.astroclip.partition`): the pairs
    whose image lies in its HEALPix pixels, matched with its neighbouring pixels too; the N parts'
    `foundation shards merge` (`partition.merge_stats`) is the set one run writes."""
    if radius_arcsec <= 0:
        raise DataError(f"--match-radius must be positive, got {radius_arcsec}")

    def open_images(files: Any) -> ImageSource:
        return ImageSource(files, bands, cutout, mask_means=image_mask_means, masked_pixels=masked_pixels)

    sky, catalog_spec = None, catalog
    if part is not None:
        sky, images, spectra, catalog = _part_inputs(
            part, images, spectra, catalog, radius_arcsec, open_images
        )
    image_src = open_images(images)
    spec_src = SpectrumSource(spectra, mask_means=spectrum_mask_means)
    cat_src = CatalogSource(catalog) if catalog is not None else None
    if sky is not None:
        for src in (image_src, spec_src, cat_src):
            if src is not None:
                src.rows = _subset_rows(src.rows, sky.reads(src.rows.ra, src.rows.dec))
    _check_grid_overlap(grid, spec_src.wavelength_range())
    match, report, sources, separations = _match_all(image_src, spec_src, cat_src, radius_arcsec, sky)
    resolved = _resolve_targets(sources, targets)
    wavelength = wavelength_grid(*grid)
    with (
        tempfile.TemporaryDirectory(prefix="astroclip-part-") as scratch,
        ShardSetWriter(
            out,
            splits or dict(SPLITS),
            samples_per_shard=samples_per_shard,
            family="astroclip",
            schema=_schema(image_src, resolved, masked_pixels),
            extra=_extra(image_src, spec_src, masked_pixels, wavelength, grid[2], resolved, report),
            provenance=_provenance(image_src, spec_src, catalog_spec, sky),
            seed=seed,
            split_salt=str(seed),
            overwrite=overwrite,
            masks={"image": ("image_ivar", "weight")},
            hints=_DEGENERATE_HINTS,
            allow_degenerate=allow_degenerate,
        ) as writer,
    ):
        pairs = _PairWriter(writer, image_src, spec_src, match, resolved)
        pairs.write_all(
            _ChunkReader(image_src, spec_src, _Resamplers(wavelength, masked_pixels)),
            chunk,
            workers,
            progress,
        )
        pairs.check_written(bands, whole=sky is None)
        features = pairs.train_stats.arrays()
        if len(features["image_log_scale"]):
            writer.stats.update(train_summary(features))
        if sky is not None:
            _add_part_files(writer, features, separations, scratch)
    report.update(
        {
            "written": pairs.counts,
            "skipped": pairs.skipped,
            "targets": {k: v[1] for k, v in resolved.items()},
            "missing_targets": pairs.missing_targets,
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


def _match_all(
    image_src: ImageSource,
    spec_src: SpectrumSource,
    cat_src: CatalogSource | None,
    radius_arcsec: float,
    sky: SkyPart | None,
) -> tuple[Any, dict[str, Any], list[tuple[str, Any, Any]], dict[str, np.ndarray]]:
    """(the pairs to write, the match report, the target sources aligned with the pairs, the
    separations of the pairs and of their catalogue matches). With a part of the sky, everything
    read is matched together and the pairs and counts are those of the rows the part owns."""
    match = _match_images_to_spectra(image_src, spec_src, radius_arcsec)
    sides = _Sides(image_src.rows, spec_src.rows, sky)
    report: dict[str, Any] = {
        "images": sides.count(image_src.rows),
        "spectra": sides.count(spec_src.rows),
        "match_radius_arcsec": radius_arcsec,
    }
    if cat_src is not None:
        cat_index, cat_result = _join_catalog(cat_src, spec_src, match, radius_arcsec)
    pair_owned = sides.pairs(match)
    if sky is not None:
        own_pairs = match.owned(sides.owns(image_src.rows), sides.owns(spec_src.rows))
        if own_pairs.matched == 0:
            raise DataError(
                f"--part {sky.index}/{sky.count}: no matched image lies in this part's HEALPix pixels "
                f"[{sky.first}, {sky.stop}) ({match.matched} pairs around them); use fewer parts"
            )
        match = own_pairs
    report["match"] = match.to_dict()
    sources = [("spectra", spec_src.rows, match.index_b), ("images", image_src.rows, match.index_a)]
    separations = {"match": match.separation_arcsec}
    if cat_src is not None:
        if sky is not None:
            cat_result = cat_result.owned(pair_owned, sides.owns(cat_src.rows))
        report["catalog"] = {"rows": sides.count(cat_src.rows), "match": cat_result.to_dict()}
        sources.insert(0, ("catalog", cat_src.rows, cat_index[pair_owned]))
        separations["catalog"] = cat_result.separation_arcsec
    return match, report, sources, separations


def _match_images_to_spectra(image_src: ImageSource, spec_src: SpectrumSource, radius_arcsec: float) -> Any:
    """The unique image-spectrum pairs on the sky; refused when there is none."""
    match = match_unique_auto(
        image_src.rows.ra, image_src.rows.dec, spec_src.rows.ra, spec_src.rows.dec, radius_arcsec
    )
    log.info("%s", match.summary("image", "spectrum"))
    if match.matched == 0:
        raise DataError(
            f'no image lies within {radius_arcsec}" of exactly one spectrum ({len(image_src.rows)} images, '
            f"{len(spec_src.rows)} spectra): check that both cover the same sky, or raise --match-radius"
        )
    return match


def _join_catalog(
    cat_src: CatalogSource, spec_src: SpectrumSource, match: Any, radius_arcsec: float
) -> tuple[np.ndarray, Any]:
    """(catalogue row of each matched object or -1, the match) for a catalogue of targets matched
    on the sky to the spectra of the matched pairs."""
    cat_match = match_unique_auto(
        spec_src.rows.ra[match.index_b],
        spec_src.rows.dec[match.index_b],
        cat_src.rows.ra,
        cat_src.rows.dec,
        radius_arcsec,
    )
    log.info("%s", cat_match.summary("object", "catalogue"))
    cat_index = np.full(match.matched, -1)
    cat_index[cat_match.index_a] = cat_match.index_b
    return cat_index, cat_match


# ----------------------------------------------------------------------------- sky parts


def _part_inputs(
    part: tuple[int, int], images: Any, spectra: Any, catalog: Any, radius_arcsec: float, open_images: Any
) -> tuple[SkyPart, list[Path], list[Path], list[Path] | None]:
    """This part of the sky, and the input files it reads (its pixels and their ring)."""
    from encoders.astroclip import partition

    partition.check_radius(radius_arcsec)
    image_files = find_files(images, "--images")

    def positions(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        rows = open_images(files).rows
        return rows.ra, rows.dec

    sky = partition.sky_part(*part, partition.image_pixels(image_files, positions))
    picked = []
    for spec, what in ((image_files, "--images"), (spectra, "--spectra"), (catalog, "--catalog")):
        if spec is None:
            picked.append(None)
            continue
        found = find_files(spec, what)
        files = [f for f in found if sky.wants_file(f)]
        if not files and what == "--catalog":
            files = found[:1]  # its columns (the targets) as in one run; its rows lie elsewhere
        if not files:
            raise DataError(
                f"--part {sky.index}/{sky.count}: no {what} file lies in this part's HEALPix pixels "
                f"[{sky.first}, {sky.stop}) or next to them; use fewer parts"
            )
        picked.append(files)
    return sky, *picked


def _subset_rows(rows: Rows, keep: np.ndarray) -> Rows:
    return Rows(
        object_id=rows.object_id[keep],
        ra=rows.ra[keep],
        dec=rows.dec[keep],
        file_index=rows.file_index[keep],
        row=rows.row[keep],
        columns={name: values[keep] for name, values in rows.columns.items()},
    )


@dataclass
class _Sides:
    """Which rows this run owns: all of them, or those in its part of the sky."""

    images: Rows
    spectra: Rows
    sky: SkyPart | None

    def owns(self, rows: Rows) -> np.ndarray:
        if self.sky is None:
            return np.ones(len(rows), dtype=bool)
        return self.sky.owns(rows.ra, rows.dec)

    def count(self, rows: Rows) -> int:
        return int(self.owns(rows).sum())

    def pairs(self, match: Any) -> np.ndarray:
        """Which pairs of `match` are this run's: those whose image it owns."""
        return self.owns(self.images)[match.index_a]


def _add_part_files(
    writer: ShardSetWriter, features: dict[str, np.ndarray], separations: dict[str, np.ndarray], scratch: str
) -> None:
    """What `merge_stats` needs beyond counts: each training object's features (the statistics
    include medians) and each pair's separation (the reports' medians), as .npy files."""
    for name, values in {**features, **separations}.items():
        path = Path(scratch) / PART_FILES[name]
        with open(path, "wb") as handle:
            np.save(handle, np.ascontiguousarray(values), allow_pickle=False)
        writer.add_file(path, PART_FILES[name], "per-part values for `foundation shards merge`")


class _TargetResolver:
    """Target values for matched objects: catalogue columns first, then spectra, then images."""

    def __init__(self, sources: list[tuple[str, Any, Any]]):
        self.sources = sources  # (label, Rows, row index per matched object or -1)

    def lookup(self, column: str):
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


def _resolve_targets(
    sources: list[tuple[str, Any, Any]], targets: list[TargetSpec] | None
) -> dict[str, tuple[Any, str, str]]:
    """The regression targets of the matched objects; a warning when none is found."""
    resolved = _TargetResolver(sources).resolve(targets)
    if not resolved:
        log.warning(
            "no regression targets found (looked for %s); pass --targets COLUMN:name",
            ", ".join(c for cs in DEFAULT_TARGETS.values() for c in cs),
        )
    return resolved


# ----------------------------------------------------------------------------- manifest


def _schema(
    image_src: ImageSource, resolved: dict[str, tuple[Any, str, str]], masked_pixels: str
) -> dict[str, Any]:
    """The fields of every sample, with units; targets are optional scalars."""
    bad_pixels = "0" if masked_pixels == "zero" else "survey value"
    schema: dict[str, Any] = {
        "image": {
            "unit": "nanomaggy",
            "description": f"cutout, bands {','.join(image_src.bands)}, (bands, H, W), bad pixels: "
            + bad_pixels,
        },
        "image_ivar": {"unit": "nanomaggy^-2", "description": "inverse variance of image; 0 = bad pixel"},
        "spectrum": {
            "unit": "1e-17 erg/s/cm2/Angstrom",
            "description": "flux on extra.wavelength; bad pixels: " + bad_pixels,
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
    return schema


def _extra(
    image_src: ImageSource,
    spec_src: SpectrumSource,
    masked_pixels: str,
    wavelength: np.ndarray,
    step: float,
    resolved: dict[str, tuple[Any, str, str]],
    report: dict[str, Any],
) -> dict[str, Any]:
    """What the model needs to read the shards (bands, pixel scale, wavelength grid, mask meanings)."""
    return {
        "bands": list(image_src.bands),
        "pixel_scale_arcsec": image_src.pixel_scale,
        "mask_meanings": {"image": image_src.mask_meanings, "spectrum": spec_src.mask_meanings},
        "masked_pixels": masked_pixels,
        "image_size": image_src.size,
        "wavelength": {
            "start": float(wavelength[0]),
            "stop": float(wavelength[-1]),
            "step": float(step),
            "pixels": len(wavelength),
            "medium": "vacuum",
            "unit": "Angstrom",
        },
        "targets": {name: {"source": source, "unit": unit} for name, (_, source, unit) in resolved.items()},
        "match": report,
    }


def _provenance(
    image_src: ImageSource, spec_src: SpectrumSource, catalog: Any, sky: SkyPart | None
) -> dict[str, Any]:
    out = {
        "images": [str(p) for p in image_src.files[:50]],
        "spectra": [str(p) for p in spec_src.files[:50]],
        "catalog": str(catalog) if catalog is not None else None,
        "command": " ".join(sys.argv),
    }
    if sky is not None:
        out["part"] = sky.provenance()
    return out


# ----------------------------------------------------------------------------- pairs


def _key(object_id: str, used: set[str]) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", object_id) or "object"
    unique, n = key, 1
    while unique in used:
        n += 1
        unique = f"{key}-{n}"
    used.add(unique)
    return unique


def _spectrum_stats(flux, bad, std_floor: float = 0.2):
    """The statistics token's raw features, as SpecFormer computes them (asinh mean, ln std)."""
    good = ~bad
    values = flux[good] if good.any() else np.zeros(1)
    return np.array([np.arcsinh(values.mean()), np.log(max(values.std(), std_floor))])


@dataclass
class _ObjectFeatures:
    """What the training statistics take from one object: its spectrum's token features, image
    scale and sky noise per band."""

    spectrum: np.ndarray
    image_log_scale: float
    sky: np.ndarray


def _object_features(
    image: np.ndarray, ivar: np.ndarray, flux: np.ndarray, bad: np.ndarray
) -> _ObjectFeatures:
    sigma = [np.median(1 / np.sqrt(band[band > 0])) if (band > 0).any() else np.nan for band in ivar]
    return _ObjectFeatures(
        _spectrum_stats(flux, bad),
        np.log10(max(float(np.sqrt(np.mean(np.square(image)))), 1e-6)),
        np.array(sigma),
    )


class _TrainStats:
    """The training objects' features, in the order written, kept in blocks of float arrays (a
    few tens of bytes an object) for the statistics the towers normalise with."""

    BLOCK = 4096

    def __init__(self) -> None:
        self.count = 0
        self._pending: list[_ObjectFeatures] = []
        self._blocks: dict[str, list[np.ndarray]] = {"spectrum": [], "image_log_scale": [], "sky": []}

    def add(self, features: _ObjectFeatures) -> None:
        """One training object's features, in the order the objects are written."""
        self._pending.append(features)
        self.count += 1
        if len(self._pending) >= self.BLOCK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._blocks["spectrum"].append(np.array([f.spectrum for f in self._pending]))
            self._blocks["image_log_scale"].append(np.array([f.image_log_scale for f in self._pending]))
            self._blocks["sky"].append(np.array([f.sky for f in self._pending]))
            self._pending = []

    def arrays(self) -> dict[str, np.ndarray]:
        """{spectrum (n, 2), image_log_scale (n,), sky (n, bands)} of every training object."""
        self._flush()
        return {
            name: np.concatenate(blocks) if blocks else np.zeros((0, 2) if name == "spectrum" else 0)
            for name, blocks in self._blocks.items()
        }


class _Resamplers:
    """One `Resampler` per source wavelength grid, the oldest dropped beyond RESAMPLER_CACHE
    (SDSS has one grid per plate). With `masked_pixels="keep"` masked pixels keep their values."""

    def __init__(self, wavelength: np.ndarray, masked_pixels: str):
        self.wavelength = wavelength
        self.keep_masked = masked_pixels == "keep"
        self.cache: dict[bytes, Resampler] = {}

    def __call__(self, lam: np.ndarray) -> Resampler:
        key = lam.tobytes()
        if key not in self.cache:
            if len(self.cache) >= RESAMPLER_CACHE:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = Resampler(lam, self.wavelength, keep_masked=self.keep_masked)
        return self.cache[key]


@dataclass
class _Chunk:
    """A chunk of matched pairs as read, cropped and resampled (arrays in the chunk's order)."""

    image: np.ndarray
    image_ivar: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    bad: np.ndarray
    empty_image: np.ndarray  # an image band without one good pixel
    empty_spectrum: np.ndarray  # no good spectral pixel on the grid
    features: list[_ObjectFeatures | None]  # None for objects that are skipped


@dataclass
class _ChunkReader:
    """What a worker needs to read chunks of pairs: the sources (file lists and row tables) and the
    resamplers (each worker keeps its own cache)."""

    image_src: ImageSource
    spec_src: SpectrumSource
    resamplers: _Resamplers


def _read_chunk(reader: _ChunkReader, rows: tuple[np.ndarray, np.ndarray]) -> _Chunk:
    """Read the images `rows[0]` and spectra `rows[1]` (one pair per position) and resample the
    spectra onto the model grid (runs in a worker)."""
    image_rows, spectrum_rows = rows
    img = reader.image_src.read(image_rows)
    flux, ivar, bad = _resample(reader, spectrum_rows)
    empty_image = img.mask.all(axis=(2, 3)).any(axis=1)
    empty_spectrum = bad.all(axis=1)
    features = [
        None
        if empty_image[k] or empty_spectrum[k]
        else _object_features(img.image[k], img.ivar[k], flux[k], bad[k])
        for k in range(len(image_rows))
    ]
    return _Chunk(img.image, img.ivar, flux, ivar, bad, empty_image, empty_spectrum, features)


def _resample(reader: _ChunkReader, spectra: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flux, ivar, bad) of the given spectra on the model grid, in the order given."""
    pixels = len(reader.resamplers.wavelength)
    flux = np.empty((len(spectra), pixels), np.float32)
    ivar = np.empty_like(flux)
    bad = np.empty(flux.shape, bool)
    for pos, batch in reader.spec_src.read(spectra):
        for k, p in enumerate(pos):
            resample = reader.resamplers(batch.wavelength[k])
            f, iv, m = resample(batch.flux[k : k + 1], batch.ivar[k : k + 1], batch.mask[k : k + 1])
            flux[p], ivar[p], bad[p] = f[0], iv[0], m[0]
    return flux, ivar, bad


class _PairWriter:
    """Writes the chunks of matched pairs as samples, in order, counting what it writes, skips and
    misses, and the training split's statistics."""

    def __init__(
        self,
        writer: ShardSetWriter,
        image_src: ImageSource,
        spec_src: SpectrumSource,
        match: Any,
        resolved: dict[str, tuple[Any, str, str]],
    ):
        self.writer, self.image_src, self.spec_src = writer, image_src, spec_src
        self.match, self.resolved = match, resolved
        self.used_keys: set[str] = set()
        self.counts: dict[str, int] = {}
        self.skipped = {"image_band_without_good_pixels": 0, "spectrum_without_good_pixels": 0}
        self.missing_targets = {name: 0 for name in resolved}
        self.train_stats = _TrainStats()

    def write_all(self, reader: _ChunkReader, chunk: int, workers: int, progress: bool | None) -> None:
        """Every matched pair, in the spectra's file order (each spectrum file is read once per
        chunk); `workers` processes read the chunks, this one writes them in that order."""
        from foundation.data.parallel import ordered_map

        rows = self.spec_src.rows
        order = np.lexsort((rows.row[self.match.index_b], rows.file_index[self.match.index_b]))
        picks = [order[start : start + chunk] for start in range(0, self.match.matched, chunk)]
        units = ((self.match.index_a[pick], self.match.index_b[pick]) for pick in picks)
        bar = tqdm(total=self.match.matched, desc="prepare astroclip", unit="object", disable=not progress)
        for pick, read in zip(picks, ordered_map(_read_chunk, units, workers, context=reader), strict=True):
            self._write_chunk(pick, read)
            bar.update(len(pick))
        bar.close()

    def _write_chunk(self, pick: np.ndarray, read: _Chunk) -> None:
        self.skipped["image_band_without_good_pixels"] += int(read.empty_image.sum())
        self.skipped["spectrum_without_good_pixels"] += int((read.empty_spectrum & ~read.empty_image).sum())
        for k, i in enumerate(pick):
            if read.empty_image[k] or read.empty_spectrum[k]:
                continue
            sample = self._sample(
                i, read.image[k], read.image_ivar[k], read.flux[k], read.ivar[k], read.bad[k]
            )
            split = self.writer.write(sample, source=self._source(i))
            self.counts[split] = self.counts.get(split, 0) + 1
            if split == "train":
                self.train_stats.add(read.features[k])

    def _sample(self, i: int, image, image_ivar, flux, ivar, bad) -> dict[str, Any]:
        """Matched pair `i` as a sample: arrays, where it came from, and the targets it has."""
        ia, ib = self.match.index_a[i], self.match.index_b[i]
        spectra = self.spec_src.rows
        object_id = str(spectra.object_id[ib])
        sample: dict[str, Any] = {
            "__key__": _key(object_id, self.used_keys),
            "image": image,
            "image_ivar": image_ivar,
            "spectrum": flux,
            "spectrum_ivar": ivar,
            "spectrum_mask": bad,
            "meta": {
                "object_id": object_id,
                "image_id": str(self.image_src.rows.object_id[ia]),
                "ra": float(spectra.ra[ib]),
                "dec": float(spectra.dec[ib]),
                "separation_arcsec": float(self.match.separation_arcsec[i]),
            },
        }
        for name, (values, _, _) in self.resolved.items():
            if np.isfinite(values[i]):
                sample[name] = float(values[i])
            else:
                self.missing_targets[name] += 1
        return sample

    def _source(self, i: int) -> dict[str, str]:
        """The native file of each array field of matched pair `i`."""
        ia, ib = self.match.index_a[i], self.match.index_b[i]
        image_file = str(self.image_src.files[self.image_src.rows.file_index[ia]])
        spectrum_file = str(self.spec_src.files[self.spec_src.rows.file_index[ib]])
        source = dict.fromkeys(("image", "image_ivar"), image_file)
        source.update(dict.fromkeys(("spectrum", "spectrum_ivar"), spectrum_file))
        return source

    def check_written(self, bands: Sequence[str], whole: bool = True) -> None:
        """Refuse a shard set without samples, or (`whole`: not a part of the sky, whose training
        objects the merge pools) without a training split to take statistics from."""
        if not self.counts:
            raise DataError(
                f"every matched object was skipped ({self.skipped}): no image has good pixels in every band "
                f"of --bands {','.join(bands)}, or no spectrum has good pixels on --grid; check the masks "
                "(--image-mask-means, --spectrum-mask-means) and the inputs"
            )
        if whole and not self.train_stats.count:
            raise DataError(
                f"no object landed in the train split ({self.counts}); use more objects or other "
                "--split-fractions"
            )


# ----------------------------------------------------------------------------- controls


def shuffle_pairs(src: Path, dst: Path, *, seed: int = 0, split: str = "train") -> None:
    """Copy a shard set, permuting the spectrum-side fields among the objects of `split`.

    Images, targets and keys stay together; each image is paired with another object's spectrum
    (a derangement-like random permutation), the other splits are copied unchanged.
    """
    from foundation.data.raw_inputs import iter_samples

    manifest = Manifest.load(src)
    spectrum_fields = [f for f in manifest.schema if f.startswith("spectrum")]
    if not spectrum_fields:
        raise ConfigError(f"{src} has no spectrum fields to shuffle (fields: {', '.join(manifest.schema)})")
    samples = list(iter_samples(src))
    train_rows = [i for i, (s, _, _) in enumerate(samples) if s == split]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train_rows))
    position = {row: j for j, row in enumerate(train_rows)}
    schema = {name: spec.to_dict() for name, spec in manifest.schema.items()}
    with ShardSetWriter(
        dst,
        {name: 1.0 / len(manifest.splits) for name in manifest.splits},
        samples_per_shard=max(s.samples for info in manifest.splits.values() for s in info.shards),
        family=manifest.family,
        schema=schema,
        stats=manifest.stats,
        extra=dict(manifest.extra, shuffled_pairs={"split": split, "seed": seed, "fields": spectrum_fields}),
        provenance={"shuffled_from": str(Path(src).resolve()), "seed": seed},
        overwrite=True,
    ) as writer:
        for i, (name, key, sample) in enumerate(samples):
            out = dict(sample, __key__=key)
            if name == split:
                donor = samples[train_rows[perm[position[i]]]][2]
                for f in spectrum_fields:
                    out[f] = donor[f]
            out = {k: v for k, v in out.items() if v is not None}
            writer.write(out, split=name)
