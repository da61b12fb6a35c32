"""Readers of Multimodal Universe HDF5 trees and FITS files: round trips, units, masks, errors."""

import h5py
import numpy as np
import pytest
from astropy import units as u
from astropy.table import Table

from encoders.astroclip import formats
from encoders.astroclip.crossmatch import match_unique
from encoders.astroclip.resample import Resampler
from foundation.errors import DataError


def test_mmu_tree_layout_and_columns(survey):
    root, summary = survey
    files = sorted((root / "legacysurvey").rglob("*.hdf5"))
    assert files and all(f.name == "001-of-001.hdf5" and f.parent.name.startswith("healpix=") for f in files)
    with h5py.File(files[0]) as f:
        for column in (
            "object_id",
            "ra",
            "dec",
            "healpix",
            "image_array",
            "image_band",
            "image_ivar",
            "image_mask",
        ):
            assert column in f
        pixel = int(files[0].parent.name.split("=")[1])
        assert np.all(f["healpix"][()] == pixel)
        assert np.all(formats.healpix_index(f["ra"][()], f["dec"][()]) == pixel)
        assert [b.decode() for b in f["image_band"][0]] == ["des-g", "des-r", "des-z"]
    spectra = sorted((root / "desi").rglob("*.hdf5"))
    with h5py.File(spectra[0]) as f:
        assert f["spectrum_flux"].shape == f["spectrum_lambda"].shape == f["spectrum_mask"].shape
        assert f["spectrum_lambda"][0, 0] == pytest.approx(3600.0)


def test_hdf5_and_fits_images_read_back_identically(survey):
    root, _ = survey
    h5 = formats.ImageSource(root / "legacysurvey", ["g", "r", "z"])
    ft = formats.ImageSource(root / "fits" / "legacysurvey", ["g", "r", "z"])
    assert len(h5.rows) == len(ft.rows)
    by_id = {oid: i for i, oid in enumerate(ft.rows.object_id)}
    pick = np.arange(0, len(h5.rows), 7)
    a = h5.read(pick)
    b = ft.read(np.array([by_id[h5.rows.object_id[i]] for i in pick]))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.ivar, b.ivar)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.mask.any(), "the synthetic images have some masked pixels"
    assert np.all(a.image[a.mask] == 0) and np.all(a.ivar[a.mask] == 0)
    # positions: FITS from the WCS centre, HDF5 from the columns (same to < 0.01")
    j = np.array([by_id[h5.rows.object_id[i]] for i in pick])
    assert np.allclose(h5.rows.ra[pick], ft.rows.ra[j], atol=3e-6)


def test_band_selection_reorders_and_unknown_band_is_a_clear_error(survey):
    root, _ = survey
    grz = formats.ImageSource(root / "legacysurvey", ["g", "r", "z"]).read(np.arange(3)).image
    zg = formats.ImageSource(root / "legacysurvey", ["z", "g"]).read(np.arange(3)).image
    np.testing.assert_array_equal(zg[:, 0], grz[:, 2])
    np.testing.assert_array_equal(zg[:, 1], grz[:, 0])
    with pytest.raises(DataError, match=r"band\(s\) i requested .* des-g, des-r, des-z"):
        formats.ImageSource(root / "legacysurvey", ["g", "i"])


def test_cutout_crops_the_centre(survey):
    root, _ = survey
    full = formats.ImageSource(root / "legacysurvey", ["r"]).read(np.arange(2)).image
    small = formats.ImageSource(root / "legacysurvey", ["r"], cutout=16).read(np.arange(2)).image
    np.testing.assert_array_equal(small, full[..., 8:24, 8:24])
    with pytest.raises(DataError, match="larger than the smallest stored cutout"):
        formats.ImageSource(root / "legacysurvey", ["r"], cutout=64)


def test_hdf5_and_fits_spectra_agree_with_units_and_masks(survey):
    root, _ = survey
    h5 = formats.SpectrumSource(root / "desi")
    ft = formats.SpectrumSource(root / "fits" / "desi")
    ids = list(ft.rows.object_id)
    pick = np.arange(0, len(h5.rows), 5)
    ((pos_a, a),) = [(p, b) for p, b in h5.read(pick[:1])]
    j = ids.index(h5.rows.object_id[pick[0]])
    ((_, b),) = ft.read(np.array([j]))
    np.testing.assert_allclose(a.flux, b.flux, rtol=1e-6)
    np.testing.assert_allclose(a.ivar, b.ivar, rtol=1e-5)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.wavelength, b.wavelength)
    assert np.isclose(h5.rows.column("Z")[pick[0]], ft.rows.column("Z")[j])


def test_fits_spectrum_units_are_converted(tmp_path):
    """Flux in W m^-2 nm^-1 on wavelengths in nm reads back in 1e-17 erg/s/cm2/Å on Å."""
    wave_aa = np.linspace(4000.0, 5000.0, 11)
    flux_std = np.linspace(1.0, 2.0, 11)  # 1e-17 erg/s/cm2/Å
    ivar_std = np.full(11, 4.0)
    flux_si = (flux_std * formats.SPECTRAL_FLUX_UNIT).to_value(u.W / u.m**2 / u.nm)
    table = Table(
        {
            "TARGETID": [7],
            "RA": [10.0],
            "DEC": [-1.0],
            "FLUX": [flux_si],
            "IVAR": [ivar_std / (flux_si[0] / flux_std[0]) ** 2],
            "WAVELENGTH": [wave_aa / 10.0],
            "MASK": [np.array([0] * 10 + [1], dtype=np.uint8)],
        }
    )
    table["FLUX"].unit = "W / (m2 nm)"
    table["WAVELENGTH"].unit = "nm"
    table.write(tmp_path / "spec.fits")
    src = formats.SpectrumSource(tmp_path / "spec.fits")
    ((_, batch),) = src.read(np.array([0]))
    np.testing.assert_allclose(batch.wavelength[0], wave_aa)
    np.testing.assert_allclose(batch.flux[0, :10], flux_std[:10], rtol=1e-5)
    np.testing.assert_allclose(batch.ivar[0, :10], ivar_std[:10], rtol=1e-5)
    assert batch.mask[0].tolist() == [False] * 10 + [True]
    assert batch.ivar[0, 10] == 0


def test_sdss_style_single_spectrum_fits_with_loglam(tmp_path):
    from astropy.io import fits

    loglam = np.log10(np.linspace(3800.0, 9000.0, 50))
    coadd = fits.BinTableHDU(
        Table({"flux": np.ones(50), "loglam": loglam, "ivar": np.ones(50), "and_mask": np.zeros(50, int)}),
        name="COADD",
    )
    specobj = fits.BinTableHDU(
        Table({"PLUG_RA": [150.1], "PLUG_DEC": [2.2], "Z": [0.1], "SPECOBJID": [42]}), name="SPECOBJ"
    )
    fits.HDUList([fits.PrimaryHDU(), coadd, specobj]).writeto(tmp_path / "spec-0001.fits")
    src = formats.SpectrumSource(tmp_path / "spec-0001.fits")
    assert src.rows.object_id[0] == "42" and src.rows.ra[0] == pytest.approx(150.1)
    assert src.rows.column("z")[0] == pytest.approx(0.1)
    ((_, batch),) = src.read(np.array([0]))
    np.testing.assert_allclose(batch.wavelength[0], 10**loglam)


def test_missing_columns_give_clear_errors(tmp_path):
    formats.write_hdf5_atomic(
        tmp_path / "a.hdf5", {"object_id": np.array([b"x"]), "ra": np.zeros(1), "dec": np.zeros(1)}
    )
    with pytest.raises(
        DataError, match=r"a.hdf5: no image \(image_array\) column .* it has: dec, object_id, ra"
    ):
        formats.ImageSource(tmp_path / "a.hdf5", ["g"])
    with pytest.raises(DataError, match=r"no spectrum flux"):
        formats.SpectrumSource(tmp_path / "a.hdf5")
    formats.write_hdf5_atomic(tmp_path / "b.hdf5", {"object_id": np.array([b"x"]), "dec": np.zeros(1)})
    with pytest.raises(DataError, match=r"no right ascension"):
        formats.CatalogSource(tmp_path / "b.hdf5")
    with pytest.raises(DataError, match="does not exist"):
        formats.SpectrumSource(tmp_path / "nowhere")


def _image_file(path, n=2):
    formats.write_hdf5_atomic(
        path,
        {
            "object_id": np.array([b"a", b"b"][:n]),
            "ra": np.zeros(n),
            "dec": np.zeros(n),
            "image_array": np.ones((n, 1, 4, 4), np.float32),
            "image_band": np.array([[b"r"]] * n),
        },
    )


def _replace(path, name, make):
    with h5py.File(path, "a") as f:
        shape, dtype = f[name].shape, f[name].dtype
        del f[name]
        make(f, name, shape, dtype)


@pytest.mark.parametrize(
    "column, make, message",
    [
        # Raw bytes of another file (here /dev/zero) read as the images.
        (
            "image_array",
            lambda f, n, shape, dtype: f.create_dataset(
                n, shape=shape, dtype=dtype, external=[("/dev/zero", 0, h5py.h5f.UNLIMITED)]
            ),
            "image_array: data stored in external raw files",
        ),
        # A link to a dataset of another file.
        (
            "image_array",
            lambda f, n, shape, dtype: f.__setitem__(n, h5py.ExternalLink("/elsewhere.h5", "x")),
            "'image_array' is a link to another file",
        ),
        # A few KiB declaring 2**31 rows: read whole, it took tens of GB.
        (
            "ra",
            lambda f, n, shape, dtype: f.create_dataset(n, shape=(2**31,), dtype=dtype, chunks=(4096,)),
            "ra: declares shape",
        ),
    ],
)
def test_hdf5_data_not_stored_in_the_file_is_refused(tmp_path, column, make, message):
    path = tmp_path / "img.hdf5"
    _image_file(path)
    _replace(path, column, make)
    with pytest.raises(DataError, match=message):
        formats.ImageSource(path, ["r"])


def test_hdf5_unit_attribute_is_honoured(tmp_path):
    values = np.ones((1, 1, 4, 4), np.float32)
    path = tmp_path / "img.hdf5"
    formats.write_hdf5_atomic(
        path,
        {
            "object_id": np.array([b"a"]),
            "ra": np.zeros(1),
            "dec": np.zeros(1),
            "image_array": values,
            "image_band": np.array([[b"r"]]),
        },
    )
    with h5py.File(path, "a") as f:
        f["image_array"].attrs["unit"] = "maggy"
    image = formats.ImageSource(path, ["r"]).read(np.array([0])).image
    assert np.allclose(image, 1e9)


def test_unique_sky_matches_drop_ambiguous_and_unmatched():
    arcsec = 1 / 3600
    ra_a = np.array([10.0, 20.0, 30.0, 30.0 + 0.5 * arcsec, 40.0])
    ra_b = np.array([10.0 + 0.2 * arcsec, 20.0 + 1.5 * arcsec, 30.0 + 0.2 * arcsec, 50.0])
    result = match_unique(ra_a, np.zeros(5), ra_b, np.zeros(4), radius_arcsec=1.0)
    assert result.index_a.tolist() == [0] and result.index_b.tolist() == [0]
    assert result.separation_arcsec[0] == pytest.approx(0.2, abs=1e-3)
    assert (result.ambiguous_a, result.ambiguous_b) == (2, 1)  # rows 2 and 3 both within 1" of b[2]
    assert (result.unmatched_a, result.unmatched_b) == (2, 2)
    wider = match_unique(ra_a, np.zeros(5), ra_b, np.zeros(4), radius_arcsec=2.0)
    assert 1 in wider.index_a.tolist()


def test_resampling_conserves_flux_and_masks_uncovered_pixels():
    source = np.arange(4000.5, 4100.0, 1.0)  # pixel edges at 4000, 4001, ..., 4100
    target = np.arange(4002.0, 4120.0, 4.0)  # edges at 4000, 4004, ...: 25 covered, 5 beyond
    flux = np.sin(source / 7.0)[None] + 2.0
    ivar = np.full_like(flux, 4.0)
    mask = np.zeros_like(flux, dtype=bool)
    out_flux, out_ivar, out_mask = Resampler(source, target)(flux, ivar, mask)
    inside = ~out_mask[0]
    # integrated flux over the covered output pixels equals the integral of the input there
    assert inside.sum() == 25 and out_mask[0, 25:].all() and np.all(out_flux[0, 25:] == 0)
    np.testing.assert_allclose(out_flux[0, inside].sum() * 4.0, flux[0].sum() * 1.0, rtol=1e-6)
    np.testing.assert_allclose(out_ivar[0, 1:5], 16.0, rtol=1e-6)  # averaging 4 pixels: ivar x 4
    # a masked input pixel is left out of the mean, and a mostly-masked output pixel is masked
    mask[0, 10] = True
    f2, _, m2 = Resampler(source, target)(flux, ivar, mask)
    np.testing.assert_allclose(f2[0, 2], flux[0, [8, 9, 11]].mean(), rtol=1e-6)
    mask[0, 8:12] = True
    assert Resampler(source, target)(flux, ivar, mask)[2][0, 2]


def test_masked_pixels_keep_their_values_only_when_asked():
    """--masked-pixels keep: a masked pixel keeps its value (same grid) or the mean of every finite
    input under it (resampled); the mask and ivar 0 are the same as with zero; NaN stays 0."""
    source = np.arange(4000.5, 4100.0, 1.0)
    flux = (np.sin(source / 7.0) + 2.0)[None]
    ivar = np.full_like(flux, 4.0)
    mask = np.zeros_like(flux, dtype=bool)
    mask[0, 8:12] = True
    flux[0, 20] = np.nan
    zero = Resampler(source, source)(flux, ivar, mask)
    keep = Resampler(source, source, keep_masked=True)(flux, ivar, mask)
    assert np.all(zero[0][0, 8:12] == 0)
    assert np.array_equal(keep[0][0, 8:12], flux[0, 8:12].astype(np.float32))
    assert keep[0][0, 20] == 0 and np.array_equal(keep[1], zero[1]) and np.array_equal(keep[2], zero[2])
    target = np.arange(4002.0, 4100.0, 4.0)
    zero = Resampler(source, target)(flux, ivar, mask)
    keep = Resampler(source, target, keep_masked=True)(flux, ivar, mask)
    assert zero[2][0, 2] and keep[2][0, 2] and zero[0][0, 2] == 0
    np.testing.assert_allclose(keep[0][0, 2], flux[0, 8:12].mean(), rtol=1e-6)
    np.testing.assert_allclose(keep[0][0, 5], flux[0, [21, 22, 23]].mean(), rtol=1e-6)  # NaN left out
    assert np.array_equal(keep[0][0, ~keep[2][0]], zero[0][0, ~zero[2][0]])


def test_fits_cutout_mask_meaning_comes_from_maskmean_or_the_option(tmp_path):
    from astropy.io import fits

    image = np.ones((2, 8, 8), np.float32)
    mask = np.zeros((2, 8, 8), bool)
    mask[0, 1, 1] = True
    path = tmp_path / "cut.fits"
    formats.write_fits_cutout(path, image, image, mask, ["g", "r"], 150.0, 2.0, "a", 0.262, [1.2, 1.1])
    assert formats.ImageSource(path, ["g", "r"]).read([0]).mask.sum() == 1
    with fits.open(path, mode="update") as hdul:
        del hdul["MASK"].header["MASKMEAN"]
    with pytest.raises(DataError, match="pass --image-mask-means"):
        formats.ImageSource(path, ["g"])
    assert formats.ImageSource(path, ["g", "r"], mask_means="clean").read([0]).mask.sum() == 127
