"""Observing the synthetic population: Legacy-Survey-like images and DESI-like spectra.

Images: per band a Sérsic profile (astropy.modeling's Sersic2D) whose total flux is the galaxy's
synthetic photometry, with a slightly larger half-light radius in bluer bands for star-forming
discs, convolved with a per-exposure Moffat PSF (astropy's Moffat2D), sky and source noise, and an
inverse-variance map. Spectra: the same SED on the DESI wavelength grid, scaled by the fraction of
light that enters a 1.5″ fibre (measured on the PSF-convolved r-band model image), emission lines
integrated exactly over each pixel, noise that rises at the blue end, the red end and on sky lines,
cosmic-ray hits masked with ivar = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.modeling.models import Moffat2D, Sersic2D
from scipy.signal import fftconvolve
from scipy.special import gamma as gamma_fn
from scipy.special import gammaincinv

from encoders.astroclip import synth

#: Legacy Survey pixel scale, arcsec.
PIXEL_SCALE = 0.262
#: DESI spectrograph grid: 3600–9824 Å in 0.8 Å steps (7781 pixels).
DESI_GRID = (3600.0, 9824.0, 0.8)
#: Per-pixel sky noise, nanomaggies, of Legacy Survey DR10 south coadds (typical depths).
SKY_SIGMA = {"g": 0.0025, "r": 0.0045, "z": 0.012}
#: Band names as the Multimodal Universe Legacy Survey builder writes them (lower-case).
MMU_BAND_NAMES = {"g": "des-g", "r": "des-r", "i": "des-i", "z": "des-z"}
#: Source noise variance per nanomaggy of pixel flux (an effective gain).
SOURCE_VARIANCE = 5e-4
#: Strong night-sky emission lines (Å, vacuum) that raise the spectral noise.
SKY_LINES = (
    5578.9,
    5891.6,
    5897.6,
    6302.0,
    6365.5,
    6865.8,
    7278.4,
    7343.0,
    7796.1,
    7915.8,
    7995.5,
    8346.9,
    8401.5,
    8432.6,
    8467.7,
    8829.6,
    8888.3,
    8922.1,
    8945.9,
    9378.5,
    9442.5,
    9794.0,
)
LSF_SIGMA_ANGSTROM = 0.8
FIBRE_RADIUS_ARCSEC = 0.75


def wavelength_grid(start: float, stop: float, step: float) -> np.ndarray:
    """Pixel centres start, start+step, ... up to stop (inclusive, to a millionth of a step)."""
    count = int(np.floor((stop - start) / step + 1e-6)) + 1
    return start + step * np.arange(count)


def pixel_edges(centres: np.ndarray) -> np.ndarray:
    """Bin edges halfway between pixel centres (extrapolated at both ends)."""
    mid = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


@dataclass
class ImageSet:
    array: np.ndarray  # (N, B, S, S) float32 nanomaggies
    ivar: np.ndarray  # (N, B, S, S) float32
    mask: np.ndarray  # (N, B, S, S) bool, True = bad pixel
    psf_fwhm: np.ndarray  # (N, B) arcsec
    fibre_fraction: np.ndarray  # (N,)


@dataclass
class SpectrumSet:
    flux: np.ndarray  # (N, L) float32, 1e-17 erg/s/cm²/Å
    ivar: np.ndarray  # (N, L) float32
    mask: np.ndarray  # (N, L) bool, True = bad pixel
    wavelength: np.ndarray  # (L,) Å


def _sersic_total(n: np.ndarray, r_eff: np.ndarray, axis_ratio: np.ndarray) -> np.ndarray:
    """Total flux of a Sérsic profile with unit surface brightness at r_eff (semi-major axis)."""
    b = gammaincinv(2.0 * n, 0.5)
    return 2.0 * np.pi * n * r_eff**2 * axis_ratio * np.exp(b) * b ** (-2.0 * n) * gamma_fn(2.0 * n)


def _sersic_pixels(
    size: int,
    flux: np.ndarray,
    r_eff: np.ndarray,
    n: np.ndarray,
    q: np.ndarray,
    pa: np.ndarray,
    offset: np.ndarray,
) -> np.ndarray:
    """(N, S, S) pixel-integrated Sérsic images: pixel centres, the central 8×8 pixels 5× oversampled."""
    col = (slice(None), None, None)
    centre = (size - 1) / 2.0
    x0 = centre + offset[:, 0][col]
    y0 = centre + offset[:, 1][col]
    amplitude = (flux / _sersic_total(n, r_eff, q))[col]
    params = (amplitude, r_eff[col], n[col], x0, y0, (1.0 - q)[col], pa[col])
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    image = Sersic2D.evaluate(x[None], y[None], *params)
    # The profile is steep near the centre: integrate the central pixels on a finer grid.
    half, sub = 4, 5
    lo = int(np.floor(centre)) - half + 1
    fine = (np.arange(2 * half * sub) + 0.5) / sub - 0.5 + lo
    fy, fx = np.meshgrid(fine, fine, indexing="ij")
    core = Sersic2D.evaluate(fx[None], fy[None], *params)
    core = core.reshape(len(flux), 2 * half, sub, 2 * half, sub).mean(axis=(2, 4))
    image[:, lo : lo + 2 * half, lo : lo + 2 * half] = core
    return image


def _moffat_kernels(fwhm_pixels: np.ndarray, beta: float = 3.5, size: int = 25) -> np.ndarray:
    """(N, size, size) unit-sum Moffat PSFs, pixel-integrated on a 3× finer grid."""
    sub = 3
    coords = (np.arange(size * sub) + 0.5) / sub - size / 2.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    gamma = fwhm_pixels / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    psf = Moffat2D.evaluate(x[None], y[None], 1.0, 0.0, 0.0, gamma[:, None, None], beta)
    psf = psf.reshape(len(fwhm_pixels), size, sub, size, sub).sum(axis=(2, 4))
    return psf / psf.sum(axis=(1, 2), keepdims=True)


def observe_images(
    pop: synth.Population,
    flux: np.ndarray,
    rng: np.random.Generator,
    size: int,
    bands: tuple[str, ...] = ("g", "r", "z"),
) -> ImageSet:
    """PSF-convolved, noisy Sérsic cutouts of each galaxy, centred to within half a pixel."""
    n_gal = len(pop)
    r_eff_pix = np.maximum(pop.r_eff_arcsec / PIXEL_SCALE, 0.05)
    # Colour gradients: star-forming discs are larger in bluer bands.
    gradient = np.where(pop.quiescent, 0.03, 0.10)
    seeing = rng.uniform(1.1, 1.7, n_gal)  # g-band FWHM, arcsec
    offset = rng.uniform(-0.5, 0.5, (n_gal, 2))
    arrays, ivars, fwhms = [], [], []
    model_r = None
    for j, band in enumerate(bands):
        band_index = {"g": -1.0, "r": 0.0, "i": 0.5, "z": 1.0}[band]
        r_band = r_eff_pix * (1.0 - gradient * band_index)
        model = _sersic_pixels(
            size, flux[:, j], r_band, pop.sersic_n, pop.axis_ratio, pop.position_angle, offset
        )
        fwhm = seeing * {"g": 1.0, "r": 0.93, "i": 0.89, "z": 0.86}[band]
        model = fftconvolve(model, _moffat_kernels(fwhm / PIXEL_SCALE), mode="same", axes=(1, 2))
        if band == "r":
            model_r = model
        sky = SKY_SIGMA[band] * rng.uniform(0.75, 1.35, n_gal)[:, None, None]
        variance = sky**2 + SOURCE_VARIANCE * np.maximum(model, 0.0)
        arrays.append(model + rng.normal(size=model.shape) * np.sqrt(variance))
        ivars.append(1.0 / variance)
        fwhms.append(fwhm)
    array = np.stack(arrays, axis=1)
    ivar = np.stack(ivars, axis=1)
    # A few bad pixels (cosmic rays, bad columns) per band: masked, ivar 0, value garbage.
    mask = rng.random(array.shape) < 2e-4
    array[mask] += rng.uniform(0.5, 5.0, mask.sum())
    ivar[mask] = 0.0
    fibre_fraction = _aperture_fraction(
        model_r, FIBRE_RADIUS_ARCSEC / PIXEL_SCALE, offset, flux[:, bands.index("r")]
    )
    return ImageSet(
        array=array.astype(np.float32),
        ivar=ivar.astype(np.float32),
        mask=mask,
        psf_fwhm=np.stack(fwhms, axis=1).astype(np.float32),
        fibre_fraction=fibre_fraction,
    )


def _aperture_fraction(model: np.ndarray, radius: float, offset: np.ndarray, total: np.ndarray) -> np.ndarray:
    size = model.shape[-1]
    centre = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size]
    inside = (
        (x[None] - centre - offset[:, 0, None, None]) ** 2
        + (y[None] - centre - offset[:, 1, None, None]) ** 2
    ) <= radius**2
    return np.clip((model * inside).sum(axis=(1, 2)) / np.maximum(total, 1e-12), 0.01, 1.0)


def spectral_noise_shape(wavelength: np.ndarray) -> np.ndarray:
    """Relative per-pixel noise of a DESI-like spectrograph: blue and red ends, sky lines."""
    shape = 1.0 + 1.5 * np.exp(-(wavelength - 3600.0) / 250.0) + 0.6 * ((wavelength - 6300.0) / 3500.0) ** 2
    for line in SKY_LINES:
        shape = shape + 4.0 * np.exp(-0.5 * ((wavelength - line) / 1.5) ** 2)
    return shape


#: Spectral noise of the dark-time programme (luminous red galaxies: ~1500 s effective exposures)
#: relative to the bright-time one (bright galaxy survey: ~180 s): sqrt(180 / 1500).
DARK_NOISE = 0.35


def in_dark_programme(flux_grz: np.ndarray) -> np.ndarray:
    """Targets that only the luminous-red-galaxy selection keeps (observed in dark time)."""
    return ~(synth.magnitudes(flux_grz)[:, 1] < 19.5)


def observe_spectra(
    pop: synth.Population,
    fibre_fraction: np.ndarray,
    rng: np.random.Generator,
    wavelength: np.ndarray,
    dark: np.ndarray | None = None,
) -> SpectrumSet:
    """Fibre spectra of each galaxy on `wavelength` (pixel centres, Å) with noise and masks.

    dark: (N,) bool, objects observed in the longer dark-time exposures (less noise).
    """
    edges = pixel_edges(wavelength)
    widths = np.diff(edges)
    # Noise per pixel scales with 1/sqrt(pixel width): 0.8 Å pixels are DESI's.
    exposure = rng.uniform(0.5, 1.0, len(pop))[:, None]
    if dark is not None:
        exposure = exposure * np.where(dark, DARK_NOISE, 1.0)[:, None]
    sigma = exposure * spectral_noise_shape(wavelength)[None, :] * np.sqrt(0.8 / widths)[None, :]
    model = synth.observed_continuum(pop, wavelength) + synth.bin_integrated_lines(
        pop, edges, LSF_SIGMA_ANGSTROM
    )
    model *= fibre_fraction[:, None]
    flux = model + rng.normal(size=model.shape) * sigma
    ivar = 1.0 / sigma**2
    # Cosmic rays: a few short runs of masked pixels per spectrum.
    mask = np.zeros(model.shape, dtype=bool)
    for i, hits in enumerate(rng.poisson(3.0, len(pop))):
        for start in rng.integers(0, len(wavelength), hits):
            stop = start + int(np.ceil(rng.uniform(1.0, 3.0) * 0.8 / widths[min(start, len(widths) - 1)]))
            mask[i, start:stop] = True
    flux[mask] += rng.uniform(5.0, 50.0, mask.sum())
    ivar[mask] = 0.0
    return SpectrumSet(flux.astype(np.float32), ivar.astype(np.float32), mask, wavelength.astype(np.float32))


# ----------------------------------------------------------------------------- writing a survey


SKY_PATCH = {"ra": (150.0, 160.0), "dec": (0.0, 8.0)}
IMAGE_ONLY_FRACTION = 0.02  # galaxies imaged but never observed spectroscopically
SPECTRUM_ONLY_FRACTION = 0.02  # spectra whose galaxy fell outside the image footprint
SHREDDED_FRACTION = 0.005  # galaxies the photometric pipeline split in two (ambiguous matches)


def _sky_positions(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ra = rng.uniform(*SKY_PATCH["ra"], n)
    lo, hi = np.sin(np.radians(SKY_PATCH["dec"]))
    dec = np.degrees(np.arcsin(rng.uniform(lo, hi, n)))
    return ra, dec


def _jitter(rng: np.random.Generator, ra: np.ndarray, dec: np.ndarray, arcsec: float):
    d = rng.normal(0.0, arcsec / 3600.0, (2, len(ra)))
    return ra + d[0] / np.cos(np.radians(dec)), dec + d[1]


def synthesize(
    out: str,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    wave_step: float = DESI_GRID[2],
    formats: tuple[str, ...] = ("hdf5",),
    chunk: int = 256,
    progress: bool | None = None,
) -> dict:
    """Write a synthetic survey of `n` galaxies with both an image and a spectrum (plus a few
    image-only, spectrum-only and shredded objects, as in real cross-matches) under `out`:

    - `legacysurvey/synth_grz/healpix=<i>/001-of-001.hdf5` images (MMU Legacy Survey columns:
      bands `des-g`..., one `image_mask` (N, H, W) for all bands, True = clean pixel)
    - `desi/synth/healpix=<i>/001-of-001.hdf5` spectra (MMU DESI columns, `spectrum_mask` True =
      bad pixel, `Z` redshifts)
    - `provabgs/synth/healpix=<i>/001-of-001.hdf5` a PROVABGS-like catalogue of physical properties
    - with "fits" in `formats`: `fits/legacysurvey/<id>.fits` cutouts, `fits/desi/spectra-<i>.fits`
      tables and `fits/provabgs.fits`.
    Returns a summary dict (counts, paths, grid).
    """
    from tqdm import tqdm

    from encoders.astroclip import formats as fmt

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if image_size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {image_size}")
    rng = np.random.default_rng(seed)
    n_img_only = int(round(IMAGE_ONLY_FRACTION * n))
    n_spec_only = int(round(SPECTRUM_ONLY_FRACTION * n))
    total = n + n_img_only + n_spec_only
    pop, flux = synth.draw_population(rng, total)
    has_image = np.arange(total) < n + n_img_only
    has_spectrum = (np.arange(total) < n) | (np.arange(total) >= n + n_img_only)
    ra, dec = _sky_positions(rng, total)
    healpix = fmt.healpix_index(ra, dec)
    image_ids = np.array([f"LS-{10_000_000 + i}" for i in range(total)])
    target_ids = np.array([39_627_000_000_000 + 7919 * i for i in range(total)], dtype=np.int64)
    shredded = has_image & has_spectrum & (rng.random(total) < SHREDDED_FRACTION)
    wavelength = wavelength_grid(DESI_GRID[0], DESI_GRID[1], wave_step)
    out_path = Path(out)
    fits_dir = out_path / "fits"
    catalog_rows: list[dict] = []
    bar = tqdm(
        total=total, desc="synth astroclip", unit="galaxy", disable=None if progress is None else not progress
    )
    for pixel in np.unique(healpix):
        members = np.flatnonzero(healpix == pixel)
        image_cols: dict[str, list] = {
            k: []
            for k in (
                "object_id",
                "ra",
                "dec",
                "image_array",
                "image_ivar",
                "image_mask",
                "image_psf_fwhm",
                "flux",
            )
        }
        spec_cols: dict[str, list] = {
            k: [] for k in ("object_id", "ra", "dec", "flux", "ivar", "mask", "Z", "ZERR", "PROGRAM")
        }
        dark = in_dark_programme(flux)
        for start in range(0, len(members), chunk):
            idx = members[start : start + chunk]
            sub = pop.take(idx)
            images = observe_images(sub, flux[idx], rng, image_size)
            spectra = observe_spectra(
                sub, images.fibre_fraction, rng, wavelength, in_dark_programme(flux[idx])
            )
            img_ra, img_dec = _jitter(rng, ra[idx], dec[idx], 0.03)
            spec_ra, spec_dec = _jitter(rng, ra[idx], dec[idx], 0.1)
            phot = flux[idx] + rng.normal(size=flux[idx].shape) * np.array([0.02, 0.03, 0.08])
            for k, i in enumerate(idx):
                if has_image[i]:
                    copies = [(image_ids[i], img_ra[k], img_dec[k])]
                    if shredded[i]:  # a second catalogue entry 0.6" away from the same galaxy
                        copies.append((image_ids[i] + "s", img_ra[k] + 0.6 / 3600.0, img_dec[k]))
                    for oid, r, d in copies:
                        image_cols["object_id"].append(oid)
                        image_cols["ra"].append(r)
                        image_cols["dec"].append(d)
                        image_cols["image_array"].append(images.array[k])
                        image_cols["image_ivar"].append(images.ivar[k])
                        image_cols["image_mask"].append(images.mask[k])
                        image_cols["image_psf_fwhm"].append(images.psf_fwhm[k])
                        image_cols["flux"].append(phot[k])
                if has_spectrum[i]:
                    z_err = 3e-5 * (1.0 + pop.z[i])
                    spec_cols["object_id"].append(target_ids[i])
                    spec_cols["ra"].append(spec_ra[k])
                    spec_cols["dec"].append(spec_dec[k])
                    spec_cols["flux"].append(spectra.flux[k])
                    spec_cols["ivar"].append(spectra.ivar[k])
                    spec_cols["mask"].append(spectra.mask[k])
                    spec_cols["Z"].append(pop.z[i] + rng.normal(0.0, z_err))
                    spec_cols["ZERR"].append(z_err)
                    spec_cols["PROGRAM"].append("dark" if dark[i] else "bright")
                    catalog_rows.append(
                        _provabgs_row(rng, pop, i, target_ids[i], spec_ra[k], spec_dec[k], pixel)
                    )
            bar.update(len(idx))
        _write_pixel(out_path, fits_dir, int(pixel), image_cols, spec_cols, wavelength, formats)
    bar.close()
    catalog = {k: np.array([row[k] for row in catalog_rows]) for k in catalog_rows[0]}
    order = np.argsort(catalog["healpix"], kind="stable")
    catalog = {k: v[order] for k, v in catalog.items()}
    if "hdf5" in formats:
        for pixel in np.unique(catalog["healpix"]):
            sel = catalog["healpix"] == pixel
            fmt.write_hdf5_atomic(
                fmt.mmu_path(out_path, "provabgs", "synth", pixel), {k: v[sel] for k, v in catalog.items()}
            )
    if "fits" in formats:
        fmt.write_fits_table(
            fits_dir / "provabgs.fits", catalog, {"ra": "deg", "dec": "deg", "TAGE_MW": "Gyr"}
        )
    return {
        "galaxies_with_both": n,
        "image_only": n_img_only,
        "spectrum_only": n_spec_only,
        "shredded": int(shredded.sum()),
        "healpix_pixels": len(np.unique(healpix)),
        "wavelength_grid": [float(wavelength[0]), float(wavelength[-1]), float(wave_step), len(wavelength)],
        "image_size": image_size,
        "images": str(out_path / "legacysurvey"),
        "spectra": str(out_path / "desi"),
        "catalog": str(out_path / "provabgs"),
        "formats": list(formats),
    }


def _provabgs_row(
    rng, pop: synth.Population, i: int, target_id: int, ra: float, dec: float, pixel: int
) -> dict:
    """Catalogue values as a PROVABGS-like SED fit would report them (with fitting scatter)."""
    return {
        "object_id": target_id,
        "ra": ra,
        "dec": dec,
        "healpix": int(pixel),
        "Z_HP": pop.z[i],
        "PROVABGS_LOGMSTAR_BF": pop.log_mstar[i] + rng.normal(0.0, 0.08),
        "Z_MW": pop.metallicity[i] * 10.0 ** rng.normal(0.0, 0.08),
        "TAGE_MW": pop.age_gyr[i] * 10.0 ** rng.normal(0.0, 0.06),
        "AVG_SFR": pop.sfr[i] * 10.0 ** rng.normal(0.0, 0.15),
    }


def _write_pixel(out: Path, fits_dir: Path, pixel: int, image_cols, spec_cols, wavelength, formats) -> None:
    from encoders.astroclip import formats as fmt

    bands = ("g", "r", "z")
    if image_cols["object_id"]:
        n = len(image_cols["object_id"])
        phot = np.array(image_cols["flux"])
        # MMU legacysurvey keeps one mask for all bands, True = clean pixel.
        bad = np.stack(image_cols["image_mask"]).any(axis=1)
        columns = {
            "object_id": np.array(image_cols["object_id"], dtype="S"),
            "ra": np.array(image_cols["ra"]),
            "dec": np.array(image_cols["dec"]),
            "healpix": np.full(n, pixel, dtype=np.int64),
            "image_array": np.stack(image_cols["image_array"]),
            "image_ivar": np.stack(image_cols["image_ivar"]),
            "image_mask": ~bad,
            "image_band": np.array([[MMU_BAND_NAMES[b] for b in bands]] * n, dtype="S"),
            "image_psf_fwhm": np.stack(image_cols["image_psf_fwhm"]),
            "image_scale": np.full((n, len(bands)), PIXEL_SCALE, dtype=np.float32),
            "FLUX_G": phot[:, 0].astype(np.float32),
            "FLUX_R": phot[:, 1].astype(np.float32),
            "FLUX_Z": phot[:, 2].astype(np.float32),
            "EBV": np.zeros(n, np.float32),
        }
        if "hdf5" in formats:
            fmt.write_hdf5_atomic(
                fmt.mmu_path(out, "legacysurvey", "synth_grz", pixel),
                columns,
                attrs={"image_mask_means": "clean"},
                compress=("image_mask", "image_band", "image_scale"),
            )
        if "fits" in formats:
            for k in range(n):
                fmt.write_fits_cutout(
                    fits_dir / "legacysurvey" / f"{image_cols['object_id'][k]}.fits",
                    columns["image_array"][k],
                    columns["image_ivar"][k],
                    np.broadcast_to(bad[k], columns["image_array"][k].shape),
                    bands,
                    columns["ra"][k],
                    columns["dec"][k],
                    image_cols["object_id"][k],
                    PIXEL_SCALE,
                    columns["image_psf_fwhm"][k],
                )
    if spec_cols["object_id"]:
        n = len(spec_cols["object_id"])
        lam = np.broadcast_to(wavelength.astype(np.float32), (n, len(wavelength)))
        step = float(wavelength[1] - wavelength[0])
        columns = {
            "object_id": np.array(spec_cols["object_id"], dtype=np.int64),
            "ra": np.array(spec_cols["ra"]),
            "dec": np.array(spec_cols["dec"]),
            "healpix": np.full(n, pixel, dtype=np.int64),
            "spectrum_flux": np.stack(spec_cols["flux"]),
            "spectrum_ivar": np.stack(spec_cols["ivar"]),
            "spectrum_lambda": np.ascontiguousarray(lam),
            "spectrum_mask": np.stack(spec_cols["mask"]),
            "spectrum_lsf_sigma": np.full((n, len(wavelength)), LSF_SIGMA_ANGSTROM / step, dtype=np.float32),
            "Z": np.array(spec_cols["Z"]),
            "ZERR": np.array(spec_cols["ZERR"]),
            "ZWARN": np.zeros(n, dtype=np.int64),
            "PROGRAM": np.array(spec_cols["PROGRAM"], dtype="S"),
            "EBV": np.zeros(n, np.float32),
        }
        if "hdf5" in formats:
            fmt.write_hdf5_atomic(
                fmt.mmu_path(out, "desi", "synth", pixel),
                columns,
                attrs={"spectrum_mask_means": "bad"},
                compress=("spectrum_lambda", "spectrum_mask", "spectrum_lsf_sigma"),
            )
        if "fits" in formats:
            fmt.write_fits_table(
                fits_dir / "desi" / f"spectra-{pixel}.fits",
                {
                    "TARGETID": columns["object_id"],
                    "TARGET_RA": columns["ra"],
                    "TARGET_DEC": columns["dec"],
                    "Z": columns["Z"],
                    "ZERR": columns["ZERR"],
                    "FLUX": columns["spectrum_flux"],
                    "IVAR": columns["spectrum_ivar"],
                    "WAVELENGTH": lam,
                    "MASK": columns["spectrum_mask"].astype(np.uint8),
                },
                {
                    "FLUX": "1e-17 erg / (s cm2 Angstrom)",
                    "IVAR": "1e+34 s2 cm4 Angstrom2 / erg2",
                    "WAVELENGTH": "Angstrom",
                    "TARGET_RA": "deg",
                    "TARGET_DEC": "deg",
                },
            )
