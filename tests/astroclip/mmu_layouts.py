"""Small files laid out exactly as the Multimodal Universe (MMU) builders write them.

Each writer follows one builder script of the MultimodalUniverse/MultimodalUniverse repository:
the same HDF5 keys, dtypes, shapes, compression and chunking, the same `<config>/healpix=<i>/`
folders, the same mask meaning, and a representative part of the catalogue columns the builder
carries through (which our readers must ignore). Values are random; only the layout is real.
Every writer returns {path: {column: array}} of what it wrote, so tests can compare bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from encoders.astroclip.formats import healpix_index

#: DESI `coadd_cameras` "brz" grid: 3600–9824 Å in 0.8 Å steps.
DESI_WAVE = (3600.0 + 0.8 * np.arange(7781)).astype(np.float32)


def _utf8(length: int) -> np.dtype:
    return h5py.string_dtype("utf-8", length)


def _groups(ra: np.ndarray, dec: np.ndarray) -> dict[int, np.ndarray]:
    """Rows per nested nside-16 HEALPix pixel (every builder groups its output files so)."""
    pixels = healpix_index(np.asarray(ra, float), np.asarray(dec, float))
    return {int(p): np.flatnonzero(pixels == p) for p in np.unique(pixels)}


def _write(path: Path, columns: dict[str, np.ndarray], compression: str | None) -> None:
    """`create_dataset(key, data=...)`, with `compression=..., chunks=True, maxshape=(None, ...)`
    where the builder appends to its files (legacysurvey: lzf, hsc: gzip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, values in columns.items():
            if compression is None:
                f.create_dataset(key, data=values)
            else:
                f.create_dataset(
                    key,
                    data=values,
                    compression=compression,
                    chunks=True,
                    maxshape=(None, *values.shape[1:]),
                )


def _floats(rng: np.random.Generator, shape, dtype=np.float32, scale=1.0) -> np.ndarray:
    return (rng.normal(size=shape) * scale).astype(dtype)


# ----------------------------------------------------------------------------- images


def legacysurvey(
    out_dir: Path,
    ra,
    dec,
    seed: int = 0,
    size: int = 160,
    clean_fraction: float = 0.97,
    mask_key: str = "image_mask",
) -> dict[Path, dict[str, np.ndarray]]:
    """scripts/legacysurvey/build_parent_sample.py, `_processing_fn` (config dr10_south_21).

    4 bands DES-G/R/I/Z (stored lower-case, utf-8 S5), 160x160 float32 `image_array` and
    `image_ivar`; `image_mask` (N, H, W) bool, one mask for all bands, **True = clean pixel**
    (`maskclean &= (maskbits & 2**bit) == 0`); `object_id` utf-8 S16 "BRICKNAME-OBJID"; lzf chunks.
    Builder versions between the commits "Add cutout mask and catalog to dataset" and "renaming
    field to follow convention" named the same mask `bit_mask` (`mask_key`).
    """
    rng = np.random.default_rng(seed)
    written = {}
    bands = ["des-g", "des-r", "des-i", "des-z"]
    for pixel, rows in _groups(ra, dec).items():
        n = len(rows)
        brick = np.array([f"{1500 + k:04d}p0{k:02d}" for k in range(n)])
        objid = rng.integers(0, 5000, n).astype(np.int32)
        columns = {
            # the sweep-catalogue columns the builder joins in (a representative part)
            "RELEASE": np.full(n, 10000, np.int16),
            "BRICKID": rng.integers(0, 600000, n).astype(np.int32),
            "BRICKNAME": brick.astype("S8"),
            "OBJID": objid,
            "TYPE": np.array([b"SER", b"EXP", b"DEV", b"REX"] * n)[:n],
            "RA": np.asarray(ra, np.float64)[rows],
            "DEC": np.asarray(dec, np.float64)[rows],
            "EBV": _floats(rng, n, scale=0.02),
            "DCHISQ": _floats(rng, (n, 5), scale=100.0),
            "MASKBITS": np.zeros(n, np.int32),
            "SHAPE_R": np.abs(_floats(rng, n)),
            "SHAPE_E1": _floats(rng, n, scale=0.1),
            "SHAPE_E2": _floats(rng, n, scale=0.1),
        }
        for b in "GRIZ":
            columns[f"FLUX_{b}"] = np.abs(_floats(rng, n, scale=20.0))
            columns[f"FLUX_IVAR_{b}"] = np.abs(_floats(rng, n, scale=5.0))
            columns[f"MW_TRANSMISSION_{b}"] = np.full(n, 0.95, np.float32)
            columns[f"NOBS_{b}"] = np.full(n, 3, np.int16)
            columns[f"PSFSIZE_{b}"] = (1.2 + 0.1 * rng.random(n)).astype(np.float32)
        for w in ("W1", "W2", "W3", "W4"):
            columns[f"FLUX_{w}"] = _floats(rng, n, scale=10.0)
        mask = rng.random((n, size, size)) < clean_fraction
        columns.update(
            {
                "healpix": np.full(n, pixel, np.int64),
                "ra": columns["RA"].copy(),
                "dec": columns["DEC"].copy(),
                "gid": np.arange(n, dtype=np.int64),
                "object_id": np.array(
                    [f"{b}-{o}" for b, o in zip(brick, objid, strict=True)], dtype=_utf8(16)
                ),
                "image_band": np.array([[b.encode() for b in bands]] * n, dtype=_utf8(5)),
                "image_ivar": np.abs(_floats(rng, (n, 4, size, size), scale=1e4)),
                "image_array": _floats(rng, (n, 4, size, size), scale=0.01),
                mask_key: mask,
                "image_psf_fwhm": np.stack([columns[f"PSFSIZE_{b}"] for b in "GRIZ"], axis=1),
                "image_scale": np.full((n, 4), 0.262, np.float32),
                "image_rgb": rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8),
                "blobmodel": rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8),
                "object_mask": rng.integers(0, 6, (n, size, size)).astype(np.uint8),
            }
        )
        for key in ("FLUX_G", "FLUX_R", "FLUX_I", "FLUX_Z", "SHAPE_R", "SHAPE_E1", "SHAPE_E2"):
            columns[f"catalog_{key}"] = _floats(rng, (n, 20))
        for key in ("TYPE", "X", "Y"):
            columns[f"catalog_{key}"] = rng.integers(0, 160, (n, 20))
        path = Path(out_dir) / "dr10_south_21" / f"healpix={pixel}" / "001-of-001.hdf5"
        _write(path, columns, "lzf")
        written[path] = columns
    return written


def ssl_legacysurvey(
    out_dir: Path, ra, dec, seed: int = 0, sample: str = "north", size: int = 152
) -> dict[Path, dict[str, np.ndarray]]:
    """scripts/ssl_legacysurvey/build_parent_sample.py, `_processing_fn` (Stein et al. stamps).

    3 bands DES-G/R/Z, 152x152 float32 `image_array`; no ivar, no mask; `object_id` int64 (the
    builder's `internal_inds`); no compression.
    """
    rng = np.random.default_rng(seed)
    written = {}
    for pixel, rows in _groups(ra, dec).items():
        n = len(rows)
        internal = np.arange(n, dtype=np.int64) + 1_000_000
        columns = {
            "inds": rng.integers(0, 10**7, n).astype(np.int64),
            "ra": np.asarray(ra, np.float64)[rows],
            "dec": np.asarray(dec, np.float64)[rows],
            "release": np.full(n, 9010, np.int32),
            "brickid": rng.integers(0, 600000, n).astype(np.int32),
            "objid": rng.integers(0, 5000, n).astype(np.int32),
            "z_spec": np.full(n, -99.0, np.float32),
            "psfsize": (1.2 + 0.1 * rng.random((n, 3))).astype(np.float32),
            "ebv": _floats(rng, n, scale=0.02),
            "internal_inds": internal,
            "healpix": np.full(n, pixel, np.int64),
            "object_id": internal.copy(),
            "image_band": np.array([[b"des-g", b"des-r", b"des-z"]] * n, dtype=_utf8(5)),
            "image_array": _floats(rng, (n, 3, size, size), scale=0.01),
            "image_scale": np.full((n, 3), 0.262, np.float32),
        }
        columns["image_psf_fwhm"] = columns["psfsize"].copy()
        for b in "grz":
            columns[f"flux_{b}"] = np.abs(_floats(rng, n, scale=20.0))
            columns[f"fiberflux_{b}"] = np.abs(_floats(rng, n, scale=5.0))
            columns[f"psfdepth_{b}"] = np.abs(_floats(rng, n, scale=100.0))
        path = Path(out_dir) / sample / f"healpix={pixel}" / "001-of-001.hdf5"
        _write(path, columns, None)
        written[path] = columns
    return written


def hsc(
    out_dir: Path,
    ra,
    dec,
    seed: int = 0,
    sample: str = "pdr3_dud_22.5",
    size: int = 160,
    clean_fraction: float = 0.97,
) -> dict[Path, dict[str, np.ndarray]]:
    """scripts/hsc/build_parent_sample.py, `_processing_fn` (config pdr3_dud_22.5).

    5 bands HSC-G/R/I/Z/Y (lower-case utf-8 S5), 160x160 float32 `image_array`, `image_ivar`
    (`nan_to_num(1/var)`), `image_mask` (N, 5, H, W) bool, one per band, **True = clean pixel**
    (`maskclean &= (mask & 2**bit) == 0` for bits 0, 1, 8); `object_id` int64; gzip chunks.
    """
    rng = np.random.default_rng(seed)
    written = {}
    bands = [b"hsc-g", b"hsc-r", b"hsc-i", b"hsc-z", b"hsc-y"]
    for pixel, rows in _groups(ra, dec).items():
        n = len(rows)
        var = np.abs(_floats(rng, (n, 5, size, size), scale=1e-2))
        var[:, :, 0, 0] = 0.0  # no-data pixels: 1/0 -> inf -> nan_to_num -> float32 max
        with np.errstate(divide="ignore"):
            ivar = np.nan_to_num(1.0 / var)
        columns = {
            "object_id": rng.integers(36_000_000_000_000_000, 37_000_000_000_000_000, n).astype(np.int64),
            "ra": np.asarray(ra, np.float64)[rows],
            "dec": np.asarray(dec, np.float64)[rows],
            "tract": np.full(n, 9813, np.int32),
            "patch": np.full(n, 404, np.int32),
            "healpix": np.full(n, pixel, np.int64),
            "image_band": np.array([bands] * n, dtype=_utf8(5)),
            "image_ivar": ivar,
            "image_array": _floats(rng, (n, 5, size, size), scale=0.5),
            "image_mask": rng.random((n, 5, size, size)) < clean_fraction,
            "image_psf_fwhm": (0.6 + 0.1 * rng.random((n, 5))).astype(np.float32),
            "image_scale": np.full((n, 5), 0.168, np.float32),
        }
        for b in "grizy":
            columns[f"a_{b}"] = _floats(rng, n, scale=0.05)
            columns[f"{b}_extendedness_value"] = np.ones(n, np.float32)
            columns[f"{b}_variance_value"] = np.abs(_floats(rng, n))
            columns[f"{b}_cmodel_mag"] = (21 + rng.random(n)).astype(np.float32)
            columns[f"{b}_cmodel_magerr"] = (0.01 * rng.random(n)).astype(np.float32)
            columns[f"{b}_cmodel_flux"] = np.abs(_floats(rng, n, scale=100.0)).astype(np.float64)
            columns[f"{b}_cmodel_fluxerr"] = np.abs(_floats(rng, n)).astype(np.float64)
            for k in ("11", "22", "12"):
                columns[f"{b}_sdssshape_psf_shape{k}"] = _floats(rng, n, scale=0.1)
                columns[f"{b}_sdssshape_shape{k}"] = _floats(rng, n, scale=0.3)
        path = Path(out_dir) / sample / f"healpix={pixel}" / "001-of-001.hdf5"
        _write(path, columns, "gzip")
        written[path] = columns
    return written


# ----------------------------------------------------------------------------- spectra


def desi(
    out_dir: Path, ra, dec, z, seed: int = 0, release: str = "dr1_main", bad_fraction: float = 0.03
) -> dict[Path, dict[str, np.ndarray]]:
    """scripts/desi/build_parent_sample.py, `processing_fn` + `save_in_standard_format`
    (config dr1_main; the earlier builder wrote edr_sv3 with the same columns).

    `spectrum_lambda`, `spectrum_flux`, `spectrum_ivar`, `spectrum_lsf_sigma` (N, 7781) float32,
    `spectrum_mask` (N, 7781) bool = `(mask > 0) | (ivar < 1e-6)`, **True = bad pixel**,
    `spectrum_lsf` (N, 11, 7781) float32; `object_id` = TARGETID int64; zall-pix catalogue
    columns (Z, ZERR float64, SURVEY/PROGRAM bytes, HEALPIX, ...); no compression.
    """
    rng = np.random.default_rng(seed)
    written = {}
    length = len(DESI_WAVE)
    for pixel, rows in _groups(ra, dec).items():
        n = len(rows)
        target = (39_627_000_000_000_000 + rng.integers(0, 10**9, n)).astype(np.int64)
        ivar = np.abs(_floats(rng, (n, length), scale=2.0))
        bits = (rng.random((n, length)) < bad_fraction).astype(np.uint32) * 4
        columns = {
            "TARGETID": target,
            "SURVEY": np.array([b"main"] * n, dtype="S7"),
            "PROGRAM": np.array([b"bright"] * n, dtype="S6"),
            "HEALPIX": np.full(n, 9820, np.int32),
            "SPGRPVAL": np.full(n, 9820, np.int32),
            "Z": np.asarray(z, np.float64)[rows],
            "ZERR": np.full(n, 3e-5),
            "ZWARN": np.zeros(n, np.int64),
            "CHI2": np.abs(rng.normal(size=n)) * 7000,
            "COEFF": rng.normal(size=(n, 10)),
            "NPIXELS": np.full(n, 7781, np.int64),
            "SPECTYPE": np.array([b"GALAXY"] * n, dtype="S6"),
            "SUBTYPE": np.array([b""] * n, dtype="S20"),
            "DELTACHI2": np.abs(rng.normal(size=n)) * 100,
            "COADD_FIBERSTATUS": np.zeros(n, np.int32),
            "TARGET_RA": np.asarray(ra, np.float64)[rows],
            "TARGET_DEC": np.asarray(dec, np.float64)[rows],
            "OBJTYPE": np.array([b"TGT"] * n, dtype="S3"),
            "MAIN_PRIMARY": np.ones(n, bool),
            "EBV": _floats(rng, n, scale=0.02),
            "healpix": np.full(n, pixel, np.int64),
            "spectrum_lambda": np.repeat(DESI_WAVE.reshape(1, -1), n, axis=0),
            "spectrum_flux": _floats(rng, (n, length), scale=3.0),
            "spectrum_ivar": ivar,
            "spectrum_mask": (bits > 0) | (ivar < 1e-6),
            "spectrum_lsf_sigma": np.full((n, length), 0.89, np.float32),
            "spectrum_lsf": np.abs(_floats(rng, (n, 11, length), scale=0.1)),
        }
        for b in "GRZ":
            for prefix in ("FLUX", "FLUX_IVAR", "FIBERFLUX", "FIBERTOTFLUX"):
                columns[f"{prefix}_{b}"] = np.abs(_floats(rng, n, scale=10.0))
        columns["ra"] = columns["TARGET_RA"].copy()
        columns["dec"] = columns["TARGET_DEC"].copy()
        columns["object_id"] = columns["TARGETID"].copy()
        path = Path(out_dir) / release / f"healpix={pixel}" / "001-of-001.hdf5"
        _write(path, columns, None)
        written[path] = columns
    return written


def sdss(
    out_dir: Path, ra, dec, z, seed: int = 0, survey: str = "sdss", lengths=(3850, 3840)
) -> dict[Path, dict[str, np.ndarray]]:
    """scripts/sdss/build_parent_sample.py, `processing_fn` + `save_in_standard_format`.

    spPlate HDUs are big-endian: `spectrum_flux`, `spectrum_ivar`, `spectrum_lsf_sigma` '>f4';
    `spectrum_lambda` native float32 (10**loglam); `spectrum_mask` bool = `and_mask | ivar <= 1e-6`,
    **True = bad pixel**. Spectra from plates of different lengths are padded to the longest:
    flux and lsf with their edge value, ivar with 0, lambda with -1, mask with True.
    `object_id` = SPECOBJID (a 19-character string in specObj-dr17); Z and Z_ERR float32.
    """
    rng = np.random.default_rng(seed)
    written = {}
    for pixel, rows in _groups(ra, dec).items():
        n = len(rows)
        parts = []
        for k in range(n):  # one plate per object, alternating lengths (and start wavelengths)
            length = lengths[k % len(lengths)]
            loglam = 3.5797 + 0.0001 * k + 1e-4 * np.arange(length)
            ivar = np.abs(rng.normal(size=length) * 2).astype(">f4")
            and_mask = (rng.random(length) < 0.03).astype(">i4") * 8
            parts.append(
                {
                    "spectrum_lambda": (10**loglam).astype(np.float32),
                    "spectrum_flux": (rng.normal(size=length) * 3).astype(">f4"),
                    "spectrum_ivar": ivar,
                    "spectrum_mask": and_mask.astype(bool) | (ivar <= 1e-6),
                    "spectrum_lsf_sigma": (1.0 + 0.1 * rng.random(length)).astype(">f4"),
                }
            )
        longest = max(len(p["spectrum_flux"]) for p in parts)
        pad = {
            "spectrum_flux": {"mode": "edge"},
            "spectrum_ivar": {"mode": "constant"},
            "spectrum_lambda": {"mode": "constant", "constant_values": -1},
            "spectrum_lsf_sigma": {"mode": "edge"},
            "spectrum_mask": {"mode": "constant", "constant_values": True},
        }
        spectra = {
            key: np.stack([np.pad(p[key], (0, longest - len(p[key])), **how) for p in parts])
            for key, how in pad.items()
        }
        # np.concatenate of big-endian arrays returns native ones in numpy 2 but kept the byte
        # order in the numpy the builder ran on; keep it here, the case a reader can get wrong.
        for key in ("spectrum_flux", "spectrum_ivar", "spectrum_lsf_sigma"):
            spectra[key] = spectra[key].astype(">f4")
        specobjid = np.array([str(299_489_952_322_840_576 + 1024 * k) for k in range(n)], dtype="S19")
        columns = {
            "SURVEY": np.array([survey.ljust(6).encode()] * n, dtype="S6"),
            "PLATE": np.arange(266, 266 + n, dtype=np.int32),
            "MJD": np.full(n, 51630, np.int32),
            "FIBERID": np.arange(1, n + 1, dtype=np.int32),
            "SPECOBJID": specobjid,
            "PLUG_RA": np.asarray(ra, np.float64)[rows],
            "PLUG_DEC": np.asarray(dec, np.float64)[rows],
            "CLASS": np.array([b"GALAXY"] * n, dtype="S6"),
            "Z": np.asarray(z, np.float32)[rows],
            "Z_ERR": np.full(n, 2e-5, np.float32),
            "ZWARNING": np.zeros(n, np.int32),
            "VDISP": np.abs(_floats(rng, n, scale=150.0)),
            "VDISP_ERR": np.abs(_floats(rng, n, scale=10.0)),
            "SPECPRIMARY": np.ones(n, np.uint8),
            "TARGETTYPE": np.array([b"SCIENCE"] * n, dtype="S10"),
            "PLATEQUALITY": np.array([b"good"] * n, dtype="S8"),
            "SPECTROFLUX": np.abs(_floats(rng, (n, 5), scale=10.0)),
            "SPECTROFLUX_IVAR": np.abs(_floats(rng, (n, 5))),
            "SPECTROSYNFLUX": np.abs(_floats(rng, (n, 5), scale=10.0)),
            "SPECTROSYNFLUX_IVAR": np.abs(_floats(rng, (n, 5))),
            "healpix": np.full(n, pixel, np.int64),
            **spectra,
        }
        columns["ra"] = columns["PLUG_RA"].copy()
        columns["dec"] = columns["PLUG_DEC"].copy()
        columns["object_id"] = columns["SPECOBJID"].copy()
        path = Path(out_dir) / survey / f"healpix={pixel}" / "001-of-001.hdf5"
        _write(path, columns, None)
        written[path] = columns
    return written


# ----------------------------------------------------------------------------- catalogue


def desi_provabgs(out_dir: Path, ra, dec, target_ids, z, seed: int = 0) -> dict[Path, dict[str, np.ndarray]]:
    """scripts/desi_provabgs/build_parent_sample.py, `save_in_standard_format`.

    `datafiles/healpix=<i>/001-of-001.h5` (note .h5); every column of the PROVABGS VAC (RA and
    DEC renamed to ra, dec), `object_id` = TARGETID int64, `healpix`, plus Z_MW, TAGE_MW,
    AVG_SFR computed by the builder; no compression.
    """
    rng = np.random.default_rng(seed)
    written = {}
    for pixel, rows in _groups(ra, dec).items():
        n = len(rows)
        ids = np.asarray(target_ids, np.int64)[rows]
        columns = {
            "TARGETID": ids,
            "Z_HP": np.asarray(z, np.float64)[rows],
            "ZERR": np.full(n, 3e-5),
            "TSNR2_BGS": np.abs(rng.normal(size=n)) * 1000,
            "MAG_G": (19 + rng.random(n)).astype(np.float64),
            "MAG_R": (18.5 + rng.random(n)).astype(np.float64),
            "MAG_Z": (18 + rng.random(n)).astype(np.float64),
            "MAG_W1": (18 + rng.random(n)).astype(np.float64),
            "FIBMAG_R": (20 + rng.random(n)).astype(np.float64),
            "HPIX_64": rng.integers(0, 49152, n).astype(np.int64),
            "IS_BGS_BRIGHT": np.ones(n, bool),
            "IS_BGS_FAINT": np.zeros(n, bool),
            "PROVABGS_MCMC": rng.normal(size=(n, 100, 13)),
            "PROVABGS_THETA_BF": rng.normal(size=(n, 13)),
            "PROVABGS_LOGMSTAR_BF": 10 + rng.random(n),
            "PROVABGS_Z_MAX": np.full(n, 0.6),
            "SCHLEGEL_COLOR": rng.normal(size=n),
            "PROVABGS_W_ZFAIL": np.ones(n),
            "PROVABGS_W_FIBASSIGN": np.ones(n),
            "Z_MW": 0.02 * rng.random(n),
            "TAGE_MW": 1 + 8 * rng.random(n),
            "AVG_SFR": 10 ** rng.normal(size=n),
            "object_id": ids.copy(),
            "ra": np.asarray(ra, np.float64)[rows],
            "dec": np.asarray(dec, np.float64)[rows],
            "healpix": np.full(n, pixel, np.int64),
        }
        path = Path(out_dir) / "datafiles" / f"healpix={pixel}" / "001-of-001.h5"
        _write(path, columns, None)
        written[path] = columns
    return written
