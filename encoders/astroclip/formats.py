"""Native AstroCLIP inputs: Multimodal Universe HDF5 trees and FITS cutouts / spectrum tables.

Multimodal Universe (MMU) layout: `<root>/<config>/healpix=<i>/001-of-001.hdf5` (HEALPix nside
16, nested; `.h5` for desi_provabgs), flat HDF5 files with one row-aligned dataset per column and
the columns `object_id` (int64 or bytes), `ra`, `dec`, `healpix`. Images (legacysurvey,
ssl_legacysurvey, hsc): `image_array` (N, bands, H, W), `image_band` (N, bands) lower-case names
such as `des-g`, `hsc-g`, optional `image_ivar`, `image_mask` ((N, H, W) for all bands or
(N, bands, H, W)), `image_psf_fwhm`, `image_scale`. Spectra (desi, sdss): `spectrum_flux`,
`spectrum_ivar`, `spectrum_lambda`, `spectrum_mask`, `spectrum_lsf_sigma` (N, L), and catalogue
scalars (`Z`, `ZERR` / `Z_ERR`, ...). What a mask's values mean differs between builders, so it is
decided per file (`image_mask_meaning`, `spectrum_mask_meaning`) and never guessed. MMU files
carry no units: Legacy Survey images are in nanomaggies, HSC images in counts at zero point 27
(converted), spectra in 1e-17 erg s⁻¹ cm⁻² Å⁻¹ on vacuum wavelengths in Å — unless a dataset has
a `unit` attribute, which is then honoured (converted with astropy.units).

FITS: image cutouts one object per file as the Legacy Survey cutout service writes them (primary
HDU (bands, H, W), `BANDS` or `BAND0..` keywords, `BUNIT`, position from `RA`/`DEC` or the WCS;
optional `IVAR` and `MASK` extensions, the latter with `MASKMEAN`); spectra as binary tables,
either one spectrum per row (array columns FLUX, IVAR, WAVELENGTH or LOGLAM, MASK plus
RA/DEC/ID/scalar columns) or one spectrum per file with one row per pixel (SDSS spec-lite: COADD +
SPECOBJ HDUs); their mask columns are bit masks. Units come from TUNIT/BUNIT.

Readers index positions and scalar columns of every row up front (cheap) and read pixel data
on demand for the rows that survive cross-matching, so large trees stream.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from astropy import units as u
from astropy.io import fits

from foundation.atomic import replacing
from foundation.errors import DataError
from foundation.hdf5 import check_storage, open_hdf5

log = logging.getLogger(__name__)

NANOMAGGY = u.def_unit("nanomaggy", 3.631e-6 * u.Jy)
SPECTRAL_FLUX_UNIT = u.Unit(1e-17 * u.erg / u.s / u.cm**2 / u.AA)
HEALPIX_NSIDE = 16

_UNIT_ALIASES = {
    "nanomaggy": NANOMAGGY,
    "nanomaggies": NANOMAGGY,
    "nmgy": NANOMAGGY,
    "nanomaggy/pixel": NANOMAGGY,
    "maggy": 1e9 * NANOMAGGY,
    "maggies": 1e9 * NANOMAGGY,
}
ID_COLUMNS = ("object_id", "targetid", "specobjid", "objid", "id")
RA_COLUMNS = ("ra", "target_ra", "plug_ra", "ra_obj")
DEC_COLUMNS = ("dec", "target_dec", "plug_dec", "dec_obj")
HDF5_SUFFIXES = (".hdf5", ".h5", ".hdf")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz", ".fts")


# ----------------------------------------------------------------------------- small helpers


def parse_unit(text: str | None, default: u.UnitBase | None = None) -> u.UnitBase | None:
    """An astropy unit from a FITS/HDF5 unit string, knowing survey spellings (nanomaggy, ...)."""
    if text is None or str(text).strip() == "":
        return default
    text = str(text).strip()
    if text.lower() in _UNIT_ALIASES:
        return _UNIT_ALIASES[text.lower()]
    try:
        return u.Unit(text, format="fits", parse_strict="raise")
    except ValueError:
        try:
            return u.Unit(text.replace("Angstrom", "AA").replace("angstrom", "AA"))
        except ValueError:
            return None


def band_short_name(name: Any) -> str:
    """'DES-G' -> 'g', b'DECam_r' -> 'r', 'z' -> 'z'."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    name = str(name).strip()
    return re.split(r"[-_ ]", name)[-1].lower()


def healpix_index(ra: np.ndarray, dec: np.ndarray, nside: int = HEALPIX_NSIDE) -> np.ndarray:
    """Nested HEALPix pixel of each position (the MMU tree's `healpix=<i>` folders)."""
    from astropy_healpix import HEALPix

    return np.asarray(
        HEALPix(nside=nside, order="nested").lonlat_to_healpix(ra * u.deg, dec * u.deg), dtype=np.int64
    )


def as_str_array(values: Any) -> np.ndarray:
    out = []
    for v in np.asarray(values).ravel():
        out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return np.array(out, dtype=object)


def find_files(spec: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[Path]:
    """Data files named by `spec`: files, or directories searched recursively for HDF5/FITS files
    (an MMU tree's `healpix=*/` folders included). Comma-separated strings name several."""
    items: list[str | os.PathLike]
    if isinstance(spec, (str, os.PathLike)):
        items = [s for s in str(spec).split(",") if s.strip()]
    else:
        items = list(spec)
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.name.lower().endswith(HDF5_SUFFIXES + FITS_SUFFIXES)
            )
            if not found:
                raise DataError(f"{what}: directory {str(path)!r} holds no .hdf5 or .fits files")
            files.extend(found)
        else:
            raise DataError(f"{what}: {str(path)!r} does not exist")
    if not files:
        raise DataError(f"{what}: no input files given")
    return files


def is_hdf5(path: Path) -> bool:
    return path.name.lower().endswith(HDF5_SUFFIXES)


def _column(names: Iterable[str], candidates: Sequence[str]) -> str | None:
    """The first of `candidates` present in `names` (spelled so, else without regard to case: MMU
    files hold both `RA` and `ra`, `HEALPIX` and `healpix`); the stored spelling."""
    names = list(names)
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c in names:
            return c
        if c.lower() in lower:
            return lower[c.lower()]
    return None


def _require(names: Iterable[str], candidates: Sequence[str], path: Path, what: str) -> str:
    names = list(names)
    found = _column(names, candidates)
    if found is None:
        raise DataError(
            f"{path}: no {what} column (looked for {', '.join(candidates)}); it has: "
            f"{', '.join(sorted(names)[:40])}{' ...' if len(names) > 40 else ''}"
        )
    return found


def _unit_factor(
    unit: u.UnitBase | None, target: u.UnitBase, where: str, spectral: Any = None
) -> float | np.ndarray:
    """Multiplier taking values in `unit` to `target` (1 if unit is None)."""
    if unit is None:
        return 1.0
    try:
        if spectral is not None:
            return (1.0 * unit).to(target, equivalencies=u.spectral_density(spectral)).value
        return (1.0 * unit).to(target).value
    except u.UnitConversionError:
        raise DataError(f"{where}: unit {unit} cannot be converted to {target}") from None


def _hdf5_unit(dataset: h5py.Dataset) -> u.UnitBase | None:
    for key in ("unit", "units", "UNIT", "BUNIT", "TUNIT"):
        if key in dataset.attrs:
            raw = dataset.attrs[key]
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            unit = parse_unit(text)
            if unit is None:
                raise DataError(f"{dataset.file.filename}:{dataset.name}: unknown unit {text!r}")
            return unit
    return None


# ----------------------------------------------------------------------------- mask meanings

#: What a stored mask's values mean: `clean` True/1 = good pixel, `bad` True/1 = bad pixel,
#: `bits` an integer bit mask, any bit set = bad pixel.
MASK_MEANINGS = ("clean", "bad", "bits")
#: Image band-name prefixes the MMU image builders write, with the meaning of their `image_mask`:
#: scripts/legacysurvey/build_parent_sample.py and scripts/hsc/build_parent_sample.py both keep a
#: pixel's mask True when none of the selected bad-pixel bits is set.
MMU_IMAGE_BANDS = {"des-": ("MMU legacysurvey", "clean"), "hsc-": ("MMU hsc", "clean")}
#: Folder names (builder configs) of MMU trees, with the meaning of their image mask.
MMU_IMAGE_CONFIGS = {
    "dr10_south_21": ("MMU legacysurvey", "clean"),
    "pdr3_dud_22.5": ("MMU hsc", "clean"),
    "pdr3_wide_21": ("MMU hsc", "clean"),
}
#: Catalogue columns that identify an MMU spectrum builder; both write True = bad pixel
#: (desi: `(mask > 0) | (ivar < 1e-6)`, sdss: `and_mask.astype(bool) | (ivar <= 1e-6)`).
MMU_SPECTRUM_COLUMNS = {"TARGETID": ("MMU desi", "bad"), "SPECOBJID": ("MMU sdss", "bad")}
MMU_SPECTRUM_CONFIGS = {
    **{name: ("MMU desi", "bad") for name in ("dr1_main", "edr_sv3")},
    **{name: ("MMU sdss", "bad") for name in ("sdss", "segue1", "segue2", "boss", "eboss")},
}
#: HSC coadds are calibrated to a zero point of 27 AB mag; a nanomaggy is 22.5 AB mag.
HSC_COUNTS_TO_NANOMAGGY = 10.0 ** (-0.4 * (27.0 - 22.5))


@dataclass(frozen=True)
class MaskMeaning:
    meaning: str  # one of MASK_MEANINGS
    source: str  # where it was decided, for the manifest and error messages


#: What `prepare` stores at masked pixels: `zero` (0, ours) or `keep` (the survey's value, as the
#: reference AstroCLIP data set has them). Non-finite values are 0 either way; ivar is 0 and the
#: mask says bad either way.
MASKED_PIXELS = ("zero", "keep")


def check_masked_pixels(value: str) -> str:
    if value not in MASKED_PIXELS:
        raise DataError(f"--masked-pixels must be one of {', '.join(MASKED_PIXELS)}, got {value!r}")
    return value


def check_mask_meaning(value: str | None, option: str) -> str | None:
    if value is not None and value not in MASK_MEANINGS:
        raise DataError(f"{option} must be one of {', '.join(MASK_MEANINGS)}, got {value!r}")
    return value


def _attr_text(attrs: Mapping[str, Any], key: str) -> str | None:
    if key not in attrs:
        return None
    raw = attrs[key]
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _declared_meaning(
    path: Path, option: str | None, option_name: str, attrs: Mapping[str, Any], attribute: str
) -> MaskMeaning | None:
    """A mask meaning given by the command-line option, else by the file's own attribute."""
    if option is not None:
        return MaskMeaning(option, option_name)
    stated = _attr_text(attrs, attribute)
    if stated is None:
        return None
    if stated not in MASK_MEANINGS:
        raise DataError(f"{path}: attribute {attribute}={stated!r} is not one of {MASK_MEANINGS}")
    return MaskMeaning(stated, f"file attribute {attribute}")


def _folder_meaning(path: Path, configs: Mapping[str, tuple[str, str]]) -> MaskMeaning | None:
    """A mask meaning from an MMU builder's config folder on the file's path."""
    for part in path.parts:
        if part in configs:
            builder, meaning = configs[part]
            return MaskMeaning(meaning, f"{builder} (folder {part})")
    return None


def _mask_meaning(
    path: Path,
    declared: MaskMeaning | None,
    recognised: MaskMeaning | None,
    folders: Mapping[str, tuple[str, str]],
    unknown: str,
) -> MaskMeaning:
    """The first meaning found: declared (option or attribute), recognised from the file's own
    contents, or from an MMU builder's folder; else a DataError saying `unknown`."""
    for meaning in (declared, recognised):
        if meaning is not None:
            return meaning
    found = _folder_meaning(path, folders)
    if found is None:
        raise DataError(unknown)
    return found


def image_mask_meaning(
    path: Path, option: str | None, attrs: Mapping[str, Any], band_names: Sequence[str]
) -> MaskMeaning:
    """The meaning of an image file's mask: the option, else the file's `image_mask_means`
    attribute, else the MMU builder recognised by its band names or folder, else an error."""
    by_bands = next(
        (
            MaskMeaning(meaning, f"{builder} (bands {prefix}*)")
            for prefix, (builder, meaning) in MMU_IMAGE_BANDS.items()
            if band_names and all(str(b).startswith(prefix) for b in band_names)
        ),
        None,
    )
    return _mask_meaning(
        path,
        _declared_meaning(path, option, "--image-mask-means", attrs, "image_mask_means"),
        by_bands,
        MMU_IMAGE_CONFIGS,
        f"{path}: cannot tell whether its image mask marks clean or bad pixels (bands "
        f"{', '.join(map(str, band_names)) or 'unknown'}, no image_mask_means attribute, not an MMU "
        "legacysurvey/hsc tree); pass --image-mask-means clean|bad|bits",
    )


def spectrum_mask_meaning(
    path: Path, option: str | None, attrs: Mapping[str, Any], columns: Sequence[str]
) -> MaskMeaning:
    """As `image_mask_meaning`, for a spectrum file (MMU desi/sdss recognised by their columns)."""
    by_columns = next(
        (
            MaskMeaning(meaning, f"{builder} (column {column})")
            for column, (builder, meaning) in MMU_SPECTRUM_COLUMNS.items()
            if column in columns
        ),
        None,
    )
    return _mask_meaning(
        path,
        _declared_meaning(path, option, "--spectrum-mask-means", attrs, "spectrum_mask_means"),
        by_columns,
        MMU_SPECTRUM_CONFIGS,
        f"{path}: cannot tell whether its spectrum mask marks clean or bad pixels (no "
        "spectrum_mask_means attribute, no TARGETID/SPECOBJID column, not an MMU desi/sdss tree); "
        "pass --spectrum-mask-means clean|bad|bits",
    )


def bad_pixels(values: np.ndarray, meaning: str, where: str, option: str) -> np.ndarray:
    """True where a stored mask says a pixel is bad, given what its values mean."""
    values = np.asarray(values)
    if values.dtype.kind not in "biu":
        raise DataError(f"{where}: a mask must hold booleans or integers, found dtype {values.dtype}")
    if meaning == "bits":
        return values != 0
    if values.dtype.kind != "b" and values.size and (values.min() < 0 or values.max() > 1):
        raise DataError(
            f"{where}: mask values go up to {values.max()}, so they are bit flags, not {meaning!r} "
            f"booleans; pass {option} bits"
        )
    return values == 0 if meaning == "clean" else values != 0


# ----------------------------------------------------------------------------- rows


@dataclass
class Rows:
    """Identity, position and scalar catalogue columns of every row of one source."""

    object_id: np.ndarray  # str (object dtype)
    ra: np.ndarray  # deg
    dec: np.ndarray  # deg
    file_index: np.ndarray  # which file
    row: np.ndarray  # row within that file
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # 1-D numeric, original spelling

    def __len__(self) -> int:
        return len(self.ra)

    def column(self, name: str) -> np.ndarray | None:
        found = _column(self.columns, [name])
        return None if found is None else self.columns[found]


def _concat_rows(parts: list[Rows], what: str) -> Rows:
    if not parts:
        raise DataError(f"{what}: no rows")
    shared = set.intersection(*[set(p.columns) for p in parts])
    return Rows(
        object_id=np.concatenate([p.object_id for p in parts]),
        ra=np.concatenate([p.ra for p in parts]).astype(np.float64),
        dec=np.concatenate([p.dec for p in parts]).astype(np.float64),
        file_index=np.concatenate([p.file_index for p in parts]),
        row=np.concatenate([p.row for p in parts]),
        columns={c: np.concatenate([p.columns[c] for p in parts]) for c in sorted(shared)},
    )


def _scalar_columns_hdf5(f: h5py.File, n: int, skip: set[str]) -> dict[str, np.ndarray]:
    out = {}
    for name, obj in f.items():
        if name in skip or not isinstance(obj, h5py.Dataset):
            continue
        if obj.shape == (n,) and obj.dtype.kind in "biuf":
            out[name] = obj[()]
    return out


def _check_hdf5_storage(f: h5py.File, path: Path) -> None:
    """Every top-level dataset is stored whole in this file: a link or storage elsewhere would read
    another file's bytes (/dev/zero, /etc/passwd) as data, a sparse one declare rows never written."""
    for name in f:
        if isinstance(f.get(name, getlink=True), h5py.ExternalLink):
            raise DataError(f"{path}: {name!r} is a link to another file; copy its data into the file")
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            check_storage(obj, f"{path}: {name}")


def _hdf5_rows(path: Path, index: int, what: str) -> Rows:
    with open_hdf5(path, what) as f:
        _check_hdf5_storage(f, path)
        names = list(f.keys())
        id_col = _require(names, ID_COLUMNS, path, "object id")
        ra_col = _require(names, RA_COLUMNS, path, "right ascension (ra)")
        dec_col = _require(names, DEC_COLUMNS, path, "declination (dec)")
        ids = as_str_array(f[id_col][()])
        n = len(ids)
        ra, dec = f[ra_col][()], f[dec_col][()]
        if ra.shape != (n,) or dec.shape != (n,):
            raise DataError(f"{path}: columns {ra_col}/{dec_col} are not aligned with {id_col} ({n} rows)")
        columns = _scalar_columns_hdf5(f, n, {id_col, ra_col, dec_col})
    return Rows(ids, ra, dec, np.full(n, index), np.arange(n), columns)


def _require_numbers(f: h5py.File, columns: Iterable[str | None], path: Path) -> None:
    """Pixel columns must hold numbers (a string or compound column is a wrong file, not a crash)."""
    for column in columns:
        if column is not None and f[column].dtype.kind not in "iuf":
            raise DataError(f"{path}: {column} must hold numbers, found dtype {f[column].dtype}")


def _read_hdf5_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """dataset[rows] for any order of rows (h5py wants increasing, unique indices)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    return dataset[unique.tolist()][inverse] if len(unique) else dataset[:0]


# ----------------------------------------------------------------------------- images


@dataclass
class ImageBatch:
    image: np.ndarray  # (n, B, S, S) float32 nanomaggies
    ivar: np.ndarray  # (n, B, S, S) float32, nanomaggies^-2
    mask: np.ndarray  # (n, B, S, S) bool, True = bad


def centre_crop(array: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or array.shape[-1] == size and array.shape[-2] == size:
        return array
    h, w = array.shape[-2:]
    if size > h or size > w:
        raise DataError(f"cutout size {size} is larger than the stored images ({h}x{w})")
    top, left = (h - size) // 2, (w - size) // 2
    return array[..., top : top + size, left : left + size]


def check_bands(bands: Sequence[str]) -> list[str]:
    """Requested band names, lower-cased; empty lists and repeated bands are refused."""
    names = [str(b).strip().lower() for b in bands]
    if not names or any(not b for b in names):
        raise DataError("--bands: give band names separated by commas, e.g. g,r,z")
    repeated = sorted({b for b in names if names.count(b) > 1})
    if repeated:
        raise DataError(f"--bands names {', '.join(repeated)} more than once; give each band once")
    return names


def match_bands(requested: Sequence[str], stored: Sequence[Any], path: Path) -> list[int]:
    """Index of each requested band among a file's band names, matching either the whole name
    (`des-g`) or its last part (`g`), without regard to case."""
    names = [str(n) for n in as_str_array(stored)]
    full = [n.strip().lower() for n in names]
    short = [band_short_name(n) for n in names]
    picks, missing = [], []
    for band in requested:
        hits = [i for i in range(len(names)) if band in (full[i], short[i])]
        if len(hits) == 1:
            picks.append(hits[0])
        elif not hits:
            missing.append(band)
        else:
            raise DataError(f"{path}: band {band!r} (--bands) matches several bands: {', '.join(names)}")
    if missing:
        raise DataError(
            f"{path}: band(s) {', '.join(missing)} requested (--bands) but the file has "
            f"{', '.join(names)}; choose --bands from those"
        )
    if len(set(picks)) != len(picks):
        raise DataError(
            f"{path}: --bands {','.join(requested)} names one stored band twice ({', '.join(names)})"
        )
    return picks


@dataclass
class _ImageLayout:
    """How to read one image file: which planes, which unit factor, what its mask means."""

    select: list[int]
    factor: float
    size: tuple[int, int]
    scale: float | None  # arcsec per pixel, where the file says
    mask: MaskMeaning | None
    columns: dict[str, str | None] = field(default_factory=dict)  # HDF5: array, ivar, mask


class ImageSource:
    """Galaxy cutouts from MMU HDF5 files and/or FITS cutout files, in the requested bands."""

    def __init__(
        self,
        spec: Any,
        bands: Sequence[str],
        cutout: int | None = None,
        mask_means: str | None = None,
        masked_pixels: str = "zero",
    ):
        self.bands = check_bands(bands)
        self.masked_pixels = check_masked_pixels(masked_pixels)
        if cutout is not None and cutout < 1:
            raise DataError(f"--cutout must be a positive number of pixels, got {cutout}")
        self.mask_option = check_mask_meaning(mask_means, "--image-mask-means")
        self.files = find_files(spec, "--images")
        self.cutout = cutout
        self._layouts: list[_ImageLayout] = []
        parts = []
        for i, path in enumerate(self.files):
            parts.append(self._index_hdf5(path, i) if is_hdf5(path) else self._index_fits(path, i))
        self.rows = _concat_rows(parts, "--images")
        sizes = sorted({layout.size for layout in self._layouts})
        if cutout is None and len(sizes) > 1:
            raise DataError(
                f"--images: cutouts have different sizes ({sizes}); pass --cutout N to "
                "centre-crop them all to N x N"
            )
        smallest = min(min(s) for s in sizes)
        if cutout is not None and cutout > smallest:
            raise DataError(
                f"--cutout {cutout} is larger than the smallest stored cutout ({smallest} pixels)"
            )
        self.size = cutout if cutout is not None else sizes[0][0]
        self.pixel_scale = self._common_scale()

    @property
    def mask_meanings(self) -> list[str]:
        """Distinct 'meaning (source)' of the masks read, for the manifest."""
        return sorted({f"{m.mask.meaning} ({m.mask.source})" for m in self._layouts if m.mask})

    def _common_scale(self) -> float | None:
        scales = {layout.scale for layout in self._layouts if layout.scale is not None}
        if len(scales) > 1:
            raise DataError(
                f"--images: files have different pixel scales ({', '.join(map(str, sorted(scales)))} "
                "arcsec); prepare images of one survey at a time"
            )
        return scales.pop() if scales else None

    def _index_hdf5(self, path: Path, index: int) -> Rows:
        rows = _hdf5_rows(path, index, "--images")
        with open_hdf5(path, "--images") as f:
            names = list(f.keys())
            arr = _require(names, ("image_array",), path, "image (image_array)")
            band = _require(names, ("image_band",), path, "band names (image_band)")
            shape = f[arr].shape
            if len(shape) != 4 or shape[0] != len(rows) or min(shape[1:]) < 1:
                raise DataError(f"{path}: {arr} must be (rows, bands, height, width); got shape {shape}")
            stored = _stored_bands(f[band], shape[1], path)
            select = match_bands(self.bands, stored, path)
            ivar = _column(names, ("image_ivar",))
            mask = _column(names, ("image_mask", "bit_mask"))
            _require_numbers(f, (arr, ivar), path)
            if ivar is not None and f[ivar].shape != shape:
                raise DataError(f"{path}: {ivar} has shape {f[ivar].shape}, {arr} {shape}")
            meaning = None
            if mask is not None:
                if f[mask].shape not in (shape, (shape[0], *shape[2:])):
                    raise DataError(
                        f"{path}: {mask} has shape {f[mask].shape}; expected {shape} (one mask per band) "
                        f"or {(shape[0], *shape[2:])} (one for all bands)"
                    )
                meaning = image_mask_meaning(path, self.mask_option, f.attrs, list(stored))
            unit = _hdf5_unit(f[arr])
            hsc = all(str(b).startswith("hsc-") for b in stored)
            factor = (
                HSC_COUNTS_TO_NANOMAGGY
                if unit is None and hsc
                else _unit_factor(unit, NANOMAGGY, f"{path}:{arr}")
            )
            scale = _hdf5_pixel_scale(f, names, select, path)
        self._layouts.append(
            _ImageLayout(
                select, factor, shape[2:], scale, meaning, {"array": arr, "ivar": ivar, "mask": mask}
            )
        )
        return rows

    def _index_fits(self, path: Path, index: int) -> Rows:
        try:
            with fits.open(path, memmap=False) as hdul:
                hdu = next((h for h in hdul if h.is_image and h.data is not None), None)
                if hdu is None:
                    raise DataError(f"{path}: no image HDU with data")
                header = hdu.header
                data = hdu.data
                if data.ndim == 2:
                    data = data[None]
                if data.ndim != 3:
                    raise DataError(
                        f"{path}: image must be (bands, height, width); got shape {hdu.data.shape}"
                    )
                names = _fits_band_names(header, data.shape[0], path)
                ra, dec = _fits_position(header, data.shape, path)
                object_id = str(header.get("OBJID", header.get("OBJECT", path.name.split(".")[0])))
                bunit = header.get("BUNIT")
                unit = parse_unit(bunit, NANOMAGGY)
                if unit is None:
                    raise DataError(f"{path}: unknown BUNIT {bunit!r}")
                meaning = None
                if "MASK" in hdul:
                    mask_header = hdul["MASK"].header
                    attrs = {"image_mask_means": mask_header["MASKMEAN"]} if "MASKMEAN" in mask_header else {}
                    meaning = image_mask_meaning(path, self.mask_option, attrs, names)
                scale = _fits_pixel_scale(header)
        except OSError as exc:
            raise DataError(f"--images: cannot read FITS file {path} ({exc})") from None
        select = match_bands(self.bands, names, path)
        factor = _unit_factor(unit, NANOMAGGY, f"{path} BUNIT")
        self._layouts.append(_ImageLayout(select, factor, tuple(data.shape[1:]), scale, meaning))
        return Rows(
            np.array([object_id], dtype=object),
            np.array([ra]),
            np.array([dec]),
            np.array([index]),
            np.array([0]),
        )

    def read(self, indices: np.ndarray) -> ImageBatch:
        """Images of the given rows (of `self.rows`), bands in the requested order, in nanomaggies;
        bad pixels (masked, ivar <= 0, non-finite) have ivar 0 and are 0, or keep their stored value
        with `masked_pixels="keep"` (non-finite ones are 0 in both)."""
        indices = np.asarray(indices)
        n, b, s = len(indices), len(self.bands), self.size
        out = ImageBatch(
            np.empty((n, b, s, s), np.float32),
            np.empty((n, b, s, s), np.float32),
            np.empty((n, b, s, s), bool),
        )
        files = self.rows.file_index[indices]
        for fi in np.unique(files):
            pos = np.flatnonzero(files == fi)
            rows = self.rows.row[indices[pos]]
            path, layout = self.files[fi], self._layouts[fi]
            if is_hdf5(path):
                image, ivar, bad = self._read_hdf5(path, rows, layout)
            else:
                image, ivar, bad = self._read_fits(path, layout)
            image = centre_crop(image, self.cutout) * layout.factor
            with np.errstate(over="ignore"):  # HSC's float32-max ivar of no-data pixels: inf, masked
                ivar = centre_crop(ivar, self.cutout) / layout.factor**2
            bad = centre_crop(bad, self.cutout) | ~np.isfinite(image) | ~np.isfinite(ivar) | ~(ivar > 0)
            blank = bad if self.masked_pixels == "zero" else ~np.isfinite(image)
            out.image[pos] = np.where(blank, 0.0, image)
            out.ivar[pos] = np.where(bad, 0.0, ivar)
            out.mask[pos] = bad
        return out

    def _read_hdf5(self, path: Path, rows: np.ndarray, layout: _ImageLayout):
        columns = layout.columns
        with open_hdf5(path, "--images") as f:
            image = _read_hdf5_rows(f[columns["array"]], rows)[:, layout.select].astype(np.float32)
            if columns["ivar"]:
                ivar = _read_hdf5_rows(f[columns["ivar"]], rows)[:, layout.select].astype(np.float32)
            else:
                ivar = _ivar_from_sky(image)
            if columns["mask"]:
                stored = _read_hdf5_rows(f[columns["mask"]], rows)
                stored = stored[:, None] if stored.ndim == 3 else stored[:, layout.select]
                where = f"{path}:{columns['mask']} (read as {layout.mask.meaning}: {layout.mask.source})"
                bad = np.broadcast_to(
                    bad_pixels(stored, layout.mask.meaning, where, "--image-mask-means"), image.shape
                )
            else:
                bad = np.zeros(image.shape, bool)
        return image, ivar, bad

    def _read_fits(self, path: Path, layout: _ImageLayout):
        with fits.open(path, memmap=False) as hdul:
            hdu = next(h for h in hdul if h.is_image and h.data is not None)
            image = np.asarray(hdu.data, dtype=np.float32)
            image = image[None] if image.ndim == 2 else image
            ivar = _fits_extension(hdul, "IVAR", image.shape)
            mask = _fits_extension(hdul, "MASK", image.shape)
        ivar = ivar.astype(np.float32) if ivar is not None else _ivar_from_sky(image[None])[0]
        if mask is not None:
            where = f"{path}[MASK] (read as {layout.mask.meaning}: {layout.mask.source})"
            bad = bad_pixels(mask, layout.mask.meaning, where, "--image-mask-means")
        else:
            bad = np.zeros(image.shape, bool)
        select = layout.select
        return image[None, select], ivar[None, select], bad[None, select]


def _stored_bands(dataset: h5py.Dataset, count: int, path: Path) -> np.ndarray:
    """A file's band names: `image_band` is (bands,) or, as MMU writes it, (rows, bands)."""
    if dataset.ndim == 2 and dataset.shape[0] == 0:
        raise DataError(f"{path}: {dataset.name} has no rows, so the file names no bands")
    bands = np.asarray(dataset[()] if dataset.ndim < 2 else dataset[0])
    if dataset.ndim == 2 and dataset.shape[0] > 1 and not (np.asarray(dataset[()]) == bands).all():
        raise DataError(f"{path}: rows list their bands in different orders ({dataset.name})")
    if bands.ndim != 1 or len(bands) != count:
        raise DataError(f"{path}: {dataset.name} names {bands.size} bands but the images have {count}")
    return np.array([str(b).strip() for b in as_str_array(bands)], dtype=object)


def _hdf5_pixel_scale(f: h5py.File, names: list[str], select: list[int], path: Path) -> float | None:
    """arcsec per pixel of the selected bands from `image_scale` (rows, bands), if the file has it."""
    column = _column(names, ("image_scale",))
    if column is None or f[column].ndim == 0 or f[column].shape[0] == 0:
        return None
    if f[column].dtype.kind not in "iuf":
        raise DataError(f"{path}: {column} must hold numbers (arcsec per pixel), found {f[column].dtype}")
    first = np.atleast_1d(np.asarray(f[column][0], np.float64))
    values = first[select] if first.shape[0] > max(select) else first
    if not np.all(np.isfinite(values)) or np.ptp(values) > 1e-6:
        raise DataError(f"{path}: {column} gives different or invalid pixel scales {values.tolist()}")
    return round(float(values[0]), 6)


def _fits_pixel_scale(header: fits.Header) -> float | None:
    for key in ("CD2_2", "CDELT2"):
        if key in header:
            return round(abs(float(header[key])) * 3600.0, 6)
    return None


def _fits_extension(hdul: fits.HDUList, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if name not in hdul:
        return None
    data = np.asarray(hdul[name].data)
    data = data[None] if data.ndim == 2 else data
    if data.shape[0] == 1 and data.shape[1:] == shape[1:]:
        data = np.broadcast_to(data, shape)
    if data.shape != shape:
        raise DataError(f"{hdul.filename()}: extension {name} has shape {data.shape}, the image {shape}")
    return data


def _ivar_from_sky(image: np.ndarray) -> np.ndarray:
    """Without an ivar map: a constant per band from the robust scatter of the cutout's border."""
    border = np.concatenate(
        [image[..., :4, :].reshape(*image.shape[:2], -1), image[..., -4:, :].reshape(*image.shape[:2], -1)],
        axis=-1,
    )
    mad = np.median(np.abs(border - np.median(border, axis=-1, keepdims=True)), axis=-1) * 1.4826
    return np.broadcast_to((1.0 / np.maximum(mad, 1e-12) ** 2)[..., None, None], image.shape).astype(
        np.float32
    )


def _fits_band_names(header: fits.Header, count: int, path: Path) -> list[str]:
    if all(f"BAND{i}" in header for i in range(count)):
        return [str(header[f"BAND{i}"]) for i in range(count)]
    if "BANDS" in header:
        raw = str(header["BANDS"]).strip()
        names = [b for b in re.split(r"[,\s]+", raw) if b] if ("," in raw or " " in raw) else list(raw)
        if len(names) == count:
            return names
    if count == 1 and "FILTER" in header:
        return [str(header["FILTER"])]
    raise DataError(
        f"{path}: cannot tell which band each of the {count} image planes is: add BAND0..BAND{count - 1} "
        "or BANDS (e.g. 'grz') to the header"
    )


def _fits_position(header: fits.Header, shape: tuple[int, ...], path: Path) -> tuple[float, float]:
    if "RA" in header and "DEC" in header:
        return float(header["RA"]), float(header["DEC"])
    if "CRVAL1" in header and "CRVAL2" in header:
        from astropy.wcs import WCS

        wcs = WCS(header, naxis=2)
        ra, dec = wcs.wcs_pix2world([[(shape[-1] - 1) / 2.0, (shape[-2] - 1) / 2.0]], 0)[0]
        return float(ra), float(dec)
    raise DataError(f"{path}: no sky position (RA/DEC keywords or a celestial WCS) in the header")


# ----------------------------------------------------------------------------- spectra


@dataclass
class SpectrumBatch:
    flux: np.ndarray  # (n, L) float32, 1e-17 erg/s/cm²/Å
    ivar: np.ndarray  # (n, L) float32
    mask: np.ndarray  # (n, L) bool, True = bad
    wavelength: np.ndarray  # (n, L) float64, Å


FLUX_COLUMNS = ("spectrum_flux", "flux")
IVAR_COLUMNS = ("spectrum_ivar", "ivar")
MASK_COLUMNS = ("spectrum_mask", "mask", "and_mask")
WAVE_COLUMNS = ("spectrum_lambda", "wavelength", "lambda", "wave")


class SpectrumSource:
    """Spectra from MMU HDF5 files and/or FITS tables, with catalogue scalars of each row."""

    def __init__(self, spec: Any, mask_means: str | None = None):
        self.mask_option = check_mask_meaning(mask_means, "--spectrum-mask-means")
        self.files = find_files(spec, "--spectra")
        self._layouts: list[dict[str, Any]] = []
        parts = []
        for i, path in enumerate(self.files):
            parts.append(self._index_hdf5(path, i) if is_hdf5(path) else self._index_fits(path, i))
        self.rows = _concat_rows(parts, "--spectra")

    @property
    def mask_meanings(self) -> list[str]:
        """Distinct 'meaning (source)' of the masks read, for the manifest."""
        found = {layout.get("mask_meaning") for layout in self._layouts} - {None}
        return sorted(f"{m.meaning} ({m.source})" for m in found)

    def wavelength_range(self) -> tuple[float, float]:
        """Shortest and longest wavelength (Å) of the first spectrum of every file: a cheap view of
        the data's coverage, to check a model grid against before reading everything."""
        lo, hi = np.inf, -np.inf
        for fi in range(len(self.files)):
            first = np.flatnonzero(self.rows.file_index == fi)[:1]
            if len(first) == 0:
                continue
            ((_, batch),) = self.read(first)
            good = batch.wavelength[0][~batch.mask[0]]
            good = good if good.size else batch.wavelength[0]
            lo, hi = min(lo, float(good.min())), max(hi, float(good.max()))
        return lo, hi

    def _index_hdf5(self, path: Path, index: int) -> Rows:
        rows = _hdf5_rows(path, index, "--spectra")
        with open_hdf5(path, "--spectra") as f:
            names = list(f.keys())
            flux = _require(names, FLUX_COLUMNS, path, "spectrum flux (spectrum_flux)")
            wave = _require(names, WAVE_COLUMNS, path, "wavelength (spectrum_lambda)")
            shape = f[flux].shape
            if len(shape) != 2 or shape[0] != len(rows) or shape[1] < 2:
                raise DataError(f"{path}: {flux} must be (rows, pixels); got shape {shape}")
            if f[wave].shape not in (shape, shape[1:]):
                raise DataError(f"{path}: {wave} has shape {f[wave].shape}, the fluxes {shape}")
            ivar, mask = _column(names, IVAR_COLUMNS), _column(names, MASK_COLUMNS)
            _require_numbers(f, (flux, wave, ivar), path)
            for column in (ivar, mask):
                if column is not None and f[column].shape != shape:
                    raise DataError(f"{path}: {column} has shape {f[column].shape}, the fluxes {shape}")
            meaning = spectrum_mask_meaning(path, self.mask_option, f.attrs, names) if mask else None
            self._layouts.append(
                {
                    "kind": "hdf5",
                    "flux": flux,
                    "wave": wave,
                    "ivar": ivar,
                    "mask": mask,
                    "mask_meaning": meaning,
                    "flux_unit": _hdf5_unit(f[flux]),
                    "wave_factor": _unit_factor(_hdf5_unit(f[wave]), u.AA, f"{path}:{wave}"),
                }
            )
        return rows

    def _index_fits(self, path: Path, index: int) -> Rows:
        from astropy.table import Table

        try:
            with fits.open(path, memmap=False) as hdul:
                tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
                if not tables:
                    raise DataError(f"{path}: no binary table HDU (spectra FITS files are tables)")
                flux_hdu = next((h for h in tables if _column(h.columns.names, FLUX_COLUMNS)), None)
                if flux_hdu is None:
                    raise DataError(
                        f"{path}: no table has a flux column (looked for {', '.join(FLUX_COLUMNS)})"
                    )
                table = Table.read(flux_hdu)
                names = table.colnames
                flux = _require(names, FLUX_COLUMNS, path, "flux")
                per_pixel_rows = table[flux].ndim == 1
                wave = _column(names, WAVE_COLUMNS)
                loglam = _column(names, ("loglam",))
                if wave is None and loglam is None:
                    raise DataError(f"{path}: no wavelength column (WAVELENGTH, LAMBDA, WAVE or LOGLAM)")
                layout = {
                    "kind": "fits",
                    "hdu": flux_hdu.name if flux_hdu.name else tables.index(flux_hdu) + 1,
                    "flux": flux,
                    "wave": wave,
                    "loglam": loglam if wave is None else None,
                    "ivar": _column(names, IVAR_COLUMNS),
                    "mask": _column(names, MASK_COLUMNS),
                    "mask_meaning": MaskMeaning(self.mask_option, "--spectrum-mask-means")
                    if self.mask_option
                    else MaskMeaning("bits", "FITS spectrum bit mask, nonzero = bad"),
                    "per_pixel_rows": per_pixel_rows,
                    "flux_unit": table[flux].unit,
                    "ivar_unit": table[_column(names, IVAR_COLUMNS)].unit
                    if _column(names, IVAR_COLUMNS)
                    else None,
                    "wave_factor": 1.0
                    if wave is None
                    else _unit_factor(table[wave].unit, u.AA, f"{path}:{wave}"),
                }
                if per_pixel_rows:
                    meta = _fits_single_object(hdul, path)
                    rows = Rows(
                        np.array([meta["id"]], dtype=object),
                        np.array([meta["ra"]]),
                        np.array([meta["dec"]]),
                        np.array([index]),
                        np.array([0]),
                        {k: np.array([v]) for k, v in meta["columns"].items()},
                    )
                else:
                    id_col = _require(names, ID_COLUMNS, path, "object id")
                    ra_col = _require(names, RA_COLUMNS, path, "right ascension")
                    dec_col = _require(names, DEC_COLUMNS, path, "declination")
                    n = len(table)
                    columns = {
                        c: np.asarray(table[c])
                        for c in names
                        if c not in (id_col, ra_col, dec_col)
                        and table[c].ndim == 1
                        and table[c].dtype.kind in "biuf"
                    }
                    rows = Rows(
                        as_str_array(table[id_col]),
                        np.asarray(table[ra_col], float),
                        np.asarray(table[dec_col], float),
                        np.full(n, index),
                        np.arange(n),
                        columns,
                    )
        except OSError as exc:
            raise DataError(f"--spectra: cannot read FITS file {path} ({exc})") from None
        self._layouts.append(layout)
        return rows

    def read(self, indices: np.ndarray) -> list[tuple[np.ndarray, SpectrumBatch]]:
        """Spectra of the given rows: (positions within `indices`, batch) for each file read."""
        indices = np.asarray(indices)
        files = self.rows.file_index[indices]
        out: list[tuple[np.ndarray, SpectrumBatch]] = []
        for fi in np.unique(files):
            pos = np.flatnonzero(files == fi)
            rows = self.rows.row[indices[pos]]
            layout = self._layouts[fi]
            path = self.files[fi]
            batch = (
                self._read_hdf5(path, rows, layout)
                if layout["kind"] == "hdf5"
                else self._read_fits(path, rows, layout)
            )
            out.append((pos, batch))
        return out

    def _read_hdf5(self, path: Path, rows: np.ndarray, layout: dict[str, Any]) -> SpectrumBatch:
        with open_hdf5(path, "--spectra") as f:
            flux = _read_hdf5_rows(f[layout["flux"]], rows).astype(np.float64)
            wave_ds = f[layout["wave"]]
            wave = wave_ds[()] if wave_ds.ndim == 1 else _read_hdf5_rows(wave_ds, rows)
            wave = np.broadcast_to(np.asarray(wave, np.float64) * layout["wave_factor"], flux.shape)
            ivar = (
                _read_hdf5_rows(f[layout["ivar"]], rows).astype(np.float64)
                if layout["ivar"]
                else np.ones_like(flux)
            )
            if layout["mask"]:
                meaning = layout["mask_meaning"]
                where = f"{path}:{layout['mask']} (read as {meaning.meaning}: {meaning.source})"
                stored = _read_hdf5_rows(f[layout["mask"]], rows)
                mask = bad_pixels(stored, meaning.meaning, where, "--spectrum-mask-means")
            else:
                mask = np.zeros(flux.shape, bool)
        wave, mask = extend_padded_wavelengths(wave, mask, f"{path}:{layout['wave']}")
        return _to_standard_units(
            flux, ivar, mask, wave, layout["flux_unit"], None, f"{path}:{layout['flux']}"
        )

    def _read_fits(self, path: Path, rows: np.ndarray, layout: dict[str, Any]) -> SpectrumBatch:
        from astropy.table import Table

        table = Table.read(path, hdu=layout["hdu"])
        if layout["per_pixel_rows"]:
            pick = lambda col: np.asarray(table[col], np.float64)[None]  # noqa: E731
        else:
            pick = lambda col: np.asarray(table[col], np.float64)[rows]  # noqa: E731
        flux = pick(layout["flux"])
        wave = (
            10.0 ** pick(layout["loglam"])
            if layout["loglam"]
            else pick(layout["wave"]) * layout["wave_factor"]
        )
        ivar = pick(layout["ivar"]) if layout["ivar"] else np.ones_like(flux)
        if layout["mask"]:
            meaning = layout["mask_meaning"]
            where = f"{path}:{layout['mask']} (read as {meaning.meaning}: {meaning.source})"
            stored = np.asarray(table[layout["mask"]])
            stored = stored[None] if layout["per_pixel_rows"] else stored[rows]
            mask = bad_pixels(stored, meaning.meaning, where, "--spectrum-mask-means")
        else:
            mask = np.zeros(flux.shape, bool)
        flux_unit = layout["flux_unit"]
        if flux_unit is None:
            log.debug("%s: flux has no unit; assuming 1e-17 erg/s/cm2/Angstrom", path)
        return _to_standard_units(
            flux, ivar, mask, wave, flux_unit, layout["ivar_unit"], f"{path}:{layout['flux']}"
        )


def extend_padded_wavelengths(wave: np.ndarray, bad: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows padded to a common length (MMU sdss: lambda -1, mask True after the last pixel) get
    increasing wavelengths there, continuing the last pixel ratio, and are marked bad."""
    padded = ~(wave > 0)
    if not padded.any():
        return wave, bad
    wave, bad = np.array(wave), np.array(bad)
    for row in np.flatnonzero(padded.any(axis=1)):
        first = int(np.argmax(padded[row]))
        if first < 2 or not padded[row, first:].all():
            raise DataError(f"{where}: row {row} has non-positive wavelengths inside the spectrum")
        ratio = wave[row, first - 1] / wave[row, first - 2]
        if not ratio > 1:
            raise DataError(f"{where}: wavelengths of row {row} are not increasing")
        wave[row, first:] = wave[row, first - 1] * ratio ** np.arange(1, wave.shape[1] - first + 1)
        bad[row, first:] = True
    return wave, bad


def _to_standard_units(
    flux: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray,
    wave: np.ndarray,
    flux_unit: Any,
    ivar_unit: Any,
    where: str,
) -> SpectrumBatch:
    if flux_unit is not None and flux_unit != SPECTRAL_FLUX_UNIT:
        factor = _unit_factor(u.Unit(flux_unit), SPECTRAL_FLUX_UNIT, where, spectral=wave * u.AA)
        flux = flux * factor
        if ivar_unit is not None:
            ivar = ivar * _unit_factor(
                u.Unit(ivar_unit), SPECTRAL_FLUX_UNIT**-2, where + " ivar", spectral=None
            )
        else:
            ivar = ivar / np.square(factor)
    if np.any(np.diff(wave, axis=-1) <= 0):
        raise DataError(f"{where}: wavelengths are not strictly increasing")
    mask = mask | ~(ivar > 0) | ~np.isfinite(flux) | ~np.isfinite(ivar)
    return SpectrumBatch(flux.astype(np.float32), np.where(mask, 0, ivar).astype(np.float32), mask, wave)


def _fits_single_object(hdul: fits.HDUList, path: Path) -> dict[str, Any]:
    """Identity, position and scalars of a one-spectrum-per-file FITS (SDSS spec-lite layout)."""
    for hdu in hdul:
        if isinstance(hdu, fits.BinTableHDU) and len(hdu.data) == 1:
            names = hdu.columns.names
            ra, dec = _column(names, RA_COLUMNS), _column(names, DEC_COLUMNS)
            if ra and dec:
                row = hdu.data[0]
                id_col = _column(names, ID_COLUMNS)
                columns = {
                    n: float(row[n])
                    for n in names
                    if n not in (ra, dec, id_col)
                    and np.ndim(row[n]) == 0
                    and np.asarray(row[n]).dtype.kind in "biuf"
                }
                return {
                    "id": str(row[id_col]) if id_col else path.name.split(".")[0],
                    "ra": float(row[ra]),
                    "dec": float(row[dec]),
                    "columns": columns,
                }
    header = hdul[0].header
    ra, dec = _column(header.keys(), RA_COLUMNS), _column(header.keys(), DEC_COLUMNS)
    if ra and dec:
        return {
            "id": str(header.get("OBJID", path.name.split(".")[0])),
            "ra": float(header[ra]),
            "dec": float(header[dec]),
            "columns": {},
        }
    raise DataError(f"{path}: no sky position for the spectrum (RA/DEC in a one-row table or the header)")


# ----------------------------------------------------------------------------- catalogues


class CatalogSource:
    """Rows of a catalogue of targets (MMU HDF5 tree or FITS tables): ids, positions, scalars."""

    def __init__(self, spec: Any):
        from astropy.table import Table

        self.files = find_files(spec, "--catalog")
        parts = []
        for i, path in enumerate(self.files):
            if is_hdf5(path):
                parts.append(_hdf5_rows(path, i, "--catalog"))
                continue
            try:
                table = Table.read(path)
            except (OSError, ValueError) as exc:
                raise DataError(f"--catalog: cannot read {path} as a FITS table ({exc})") from None
            names = table.colnames
            id_col = _column(names, ID_COLUMNS)
            ra_col = _require(names, RA_COLUMNS, path, "right ascension")
            dec_col = _require(names, DEC_COLUMNS, path, "declination")
            n = len(table)
            ids = (
                as_str_array(table[id_col])
                if id_col
                else np.array([f"{path.stem}-{k}" for k in range(n)], object)
            )
            columns = {
                c: np.asarray(table[c])
                for c in names
                if c not in (id_col, ra_col, dec_col) and table[c].ndim == 1 and table[c].dtype.kind in "biuf"
            }
            parts.append(
                Rows(
                    ids,
                    np.asarray(table[ra_col], float),
                    np.asarray(table[dec_col], float),
                    np.full(n, i),
                    np.arange(n),
                    columns,
                )
            )
        self.rows = _concat_rows(parts, "--catalog")


# ----------------------------------------------------------------------------- writers


def write_hdf5_atomic(
    path: str | os.PathLike,
    columns: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any] | None = None,
    compress: Iterable[str] = (),
) -> None:
    """One flat MMU-style HDF5 file (one dataset per column), written under a temporary name.

    compress: columns stored gzip-compressed (transparent to readers; for repetitive columns).
    """
    compress = set(compress)
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        for name, values in columns.items():
            if name in compress:
                f.create_dataset(name, data=values, compression="gzip", compression_opts=1, shuffle=True)
            else:
                f.create_dataset(name, data=values)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def mmu_path(root: str | os.PathLike, dataset: str, config: str, healpix: int) -> Path:
    return Path(root) / dataset / config / f"healpix={int(healpix)}" / "001-of-001.hdf5"


def write_fits_cutout(
    path: str | os.PathLike,
    image: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray,
    bands: Sequence[str],
    ra: float,
    dec: float,
    object_id: str,
    pixel_scale: float,
    psf_fwhm: Sequence[float],
) -> None:
    """A Legacy-Survey-cutout-style FITS file: (bands, H, W) in nanomaggies with a TAN WCS; `mask`
    True = bad pixel (stated by the MASK extension's MASKMEAN keyword)."""
    mask_header = fits.Header()
    mask_header["MASKMEAN"] = ("bad", "nonzero = bad pixel")
    header = fits.Header()
    header["BUNIT"] = "nanomaggy"
    header["OBJID"] = str(object_id)
    header["BANDS"] = "".join(bands)
    for i, band in enumerate(bands):
        header[f"BAND{i}"] = band
        header[f"PSFFWHM{i}"] = (float(psf_fwhm[i]), "arcsec")
    size = image.shape[-1]
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = float(ra), float(dec)
    header["CRPIX1"] = header["CRPIX2"] = (size + 1) / 2.0
    header["CD1_1"], header["CD2_2"] = -pixel_scale / 3600.0, pixel_scale / 3600.0
    header["CD1_2"] = header["CD2_1"] = 0.0
    hdus = fits.HDUList(
        [
            fits.PrimaryHDU(np.asarray(image, np.float32), header=header),
            fits.ImageHDU(np.asarray(ivar, np.float32), name="IVAR"),
            fits.ImageHDU(np.asarray(mask, np.uint8), header=mask_header, name="MASK"),
        ]
    )
    _write_fits_atomic(hdus, path)


def write_fits_table(
    path: str | os.PathLike, columns: Mapping[str, np.ndarray], units: Mapping[str, str] | None = None
) -> None:
    from astropy.table import Table

    table = Table({k: np.asarray(v) for k, v in columns.items()})
    for name, unit in (units or {}).items():
        table[name].unit = unit
    _write_fits_atomic(fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]), path)


def _write_fits_atomic(hdus: fits.HDUList, path: str | os.PathLike) -> None:
    with replacing(path) as tmp:
        hdus.writeto(tmp, overwrite=True)
