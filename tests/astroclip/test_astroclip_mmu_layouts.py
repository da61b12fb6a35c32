"""Every Multimodal Universe layout the AstroCLIP readers accept, written as the MMU builders write
it (tests/astroclip/mmu_layouts.py): values come through bit for bit, masks keep their meaning."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from encoders.astroclip import formats
from foundation.cli import main
from foundation.data import Manifest, ShardDataset
from foundation.errors import DataError
from tests.astroclip import mmu_layouts

RA = 150.0 + 0.01 * np.arange(4)
DEC = np.full(4, 2.0)
Z = np.array([0.1, 0.2, 0.3, 0.4])
TARGETS = np.arange(4, dtype=np.int64) + 39_627_000_000_000_000


def _only(written: dict) -> tuple[Path, dict]:
    ((path, columns),) = written.items()
    return path, columns


def _expected_image_bad(columns: dict, select: list[int]) -> np.ndarray:
    """Bad pixels as the builder means them: mask False (not clean), or no usable ivar/flux."""
    clean = columns["image_mask"] if "image_mask" in columns else columns["bit_mask"]
    clean = clean[:, None] if clean.ndim == 3 else clean[:, select]
    image = columns["image_array"][:, select]
    ivar = columns["image_ivar"][:, select]
    return ~clean | ~(ivar > 0) | ~np.isfinite(image) | ~np.isfinite(ivar)


@pytest.mark.parametrize("mask_key", ["image_mask", "bit_mask"])
def test_legacysurvey_images_bit_for_bit_with_true_meaning_clean(tmp_path, mask_key):
    path, columns = _only(mmu_layouts.legacysurvey(tmp_path, RA, DEC, size=40, mask_key=mask_key))
    source = formats.ImageSource(tmp_path, ["G", "r", "des-z"])
    assert source.mask_meanings == ["clean (MMU legacysurvey (bands des-*))"]
    assert source.pixel_scale == pytest.approx(0.262) and source.size == 40
    batch = source.read(np.arange(4))
    bad = np.broadcast_to(_expected_image_bad(columns, [0, 1, 3]), batch.image.shape)
    assert 0.01 < bad.mean() < 0.1, "about 3 % of the pixels are not clean"
    np.testing.assert_array_equal(batch.mask, bad)
    np.testing.assert_array_equal(batch.image[~bad], columns["image_array"][:, [0, 1, 3]][~bad])
    np.testing.assert_array_equal(batch.ivar[~bad], columns["image_ivar"][:, [0, 1, 3]][~bad])
    assert not batch.image[bad].any() and not batch.ivar[bad].any()
    assert list(source.rows.object_id) == [s.decode() for s in columns["object_id"]]
    with h5py.File(path) as f:  # the fixture is what the builder writes
        assert f["image_array"].compression == "lzf" and f[mask_key].shape == (4, 40, 40)


def test_legacysurvey_masked_pixels_keep_the_survey_values_when_asked(tmp_path):
    _, columns = _only(mmu_layouts.legacysurvey(tmp_path, RA, DEC, size=40))
    zero = formats.ImageSource(tmp_path, ["g", "r", "z"]).read(np.arange(4))
    keep = formats.ImageSource(tmp_path, ["g", "r", "z"], masked_pixels="keep").read(np.arange(4))
    np.testing.assert_array_equal(keep.image, columns["image_array"][:, [0, 1, 3]])
    assert zero.mask.any() and not zero.image[zero.mask].any()
    np.testing.assert_array_equal(keep.mask, zero.mask)
    np.testing.assert_array_equal(keep.ivar, zero.ivar)
    with pytest.raises(DataError, match="--masked-pixels must be one of zero, keep"):
        formats.ImageSource(tmp_path, ["g"], masked_pixels="nan")


def test_hsc_images_per_band_masks_and_counts_converted_to_nanomaggies(tmp_path):
    _, columns = _only(mmu_layouts.hsc(tmp_path, RA, DEC, size=24))
    source = formats.ImageSource(tmp_path, ["i", "g"])
    assert source.pixel_scale == pytest.approx(0.168)
    assert source.mask_meanings == ["clean (MMU hsc (bands hsc-*))"]
    batch = source.read(np.arange(4))
    bad = _expected_image_bad(columns, [2, 0])
    bad[:, :, 0, 0] = True  # var 0 -> ivar float32 max -> beyond float32 once in nanomaggy^-2
    np.testing.assert_array_equal(batch.mask, bad)
    factor = formats.HSC_COUNTS_TO_NANOMAGGY
    np.testing.assert_array_equal(batch.image[~bad], (columns["image_array"][:, [2, 0]] * factor)[~bad])


def test_ssl_legacysurvey_images_without_mask_or_ivar(tmp_path):
    _, columns = _only(mmu_layouts.ssl_legacysurvey(tmp_path, RA, DEC, size=32))
    source = formats.ImageSource(tmp_path, ["g", "r", "z"])
    assert source.mask_meanings == [] and source.rows.object_id[0] == str(columns["object_id"][0])
    batch = source.read(np.arange(4))
    np.testing.assert_array_equal(batch.image, columns["image_array"])
    assert not batch.mask.any() and np.all(batch.ivar > 0)  # ivar from the border's scatter


def test_desi_spectra_bit_for_bit_with_true_meaning_bad(tmp_path):
    _, columns = _only(mmu_layouts.desi(tmp_path, RA, DEC, Z))
    source = formats.SpectrumSource(tmp_path)
    assert source.mask_meanings == ["bad (MMU desi (column TARGETID))"]
    ((pos, batch),) = source.read(np.arange(4))
    bad = columns["spectrum_mask"] | ~(columns["spectrum_ivar"] > 0)
    np.testing.assert_array_equal(batch.mask, bad)
    np.testing.assert_array_equal(batch.flux[~bad], columns["spectrum_flux"][~bad])
    np.testing.assert_array_equal(batch.ivar[~bad], columns["spectrum_ivar"][~bad])
    np.testing.assert_array_equal(source.rows.column("Z"), Z)
    assert source.rows.column("ZERR") is not None
    assert source.rows.object_id[0] == str(columns["object_id"][0])


def test_sdss_big_endian_padded_spectra(tmp_path):
    _, columns = _only(mmu_layouts.sdss(tmp_path, RA, DEC, Z, lengths=(400, 380)))
    assert columns["spectrum_flux"].dtype == np.dtype(">f4")
    source = formats.SpectrumSource(tmp_path)
    assert source.mask_meanings == ["bad (MMU sdss (column SPECOBJID))"]
    ((_, batch),) = source.read(np.arange(4))
    padded = columns["spectrum_lambda"] < 0
    assert padded[1, 380:].all() and not padded[0].any()
    bad = columns["spectrum_mask"] | ~(columns["spectrum_ivar"] > 0)
    np.testing.assert_array_equal(batch.mask, bad)
    assert batch.mask[padded].all()
    np.testing.assert_array_equal(batch.flux[~bad], columns["spectrum_flux"][~bad].astype(np.float32))
    assert np.all(np.diff(batch.wavelength, axis=1) > 0)
    np.testing.assert_array_equal(batch.wavelength[~padded], columns["spectrum_lambda"][~padded])
    assert source.rows.column("Z_ERR") is not None
    assert list(source.rows.object_id) == [s.decode() for s in columns["SPECOBJID"]]


def test_provabgs_catalogue_in_h5_files(tmp_path):
    _, columns = _only(mmu_layouts.desi_provabgs(tmp_path, RA, DEC, TARGETS, Z))
    catalog = formats.CatalogSource(tmp_path)
    assert list(catalog.rows.object_id) == [str(t) for t in TARGETS]
    np.testing.assert_array_equal(catalog.rows.column("Z_HP"), Z)
    np.testing.assert_array_equal(
        catalog.rows.column("PROVABGS_LOGMSTAR_BF"), columns["PROVABGS_LOGMSTAR_BF"]
    )


def _prepare(tmp_path, images, spectra, *extra, out="shards"):
    return main(
        [
            "prepare",
            "astroclip",
            "--images",
            str(images),
            "--spectra",
            str(spectra),
            "--out",
            str(tmp_path / out),
            "--splits",
            "train=1.0",
            "--progress",
            "off",
            *extra,
        ]
    )


def _samples(path: Path) -> dict:
    ds = ShardDataset(
        path,
        split="train",
        batch_size=1,
        shuffle=False,
        epochs=1,
        drop_last=False,
        collate_fn=lambda s: s[0],
        rank=0,
        world_size=1,
    )
    return {s["meta"]["object_id"]: s for s in ds}


def test_prepare_legacysurvey_desi_provabgs_writes_the_files_values(tmp_path, capsys):
    """The whole command on MMU legacysurvey + desi + desi_provabgs: the shards hold the files'
    pixels bit for bit (bad pixels 0), on the DESI grid, with the catalogue's redshift."""
    _, image_cols = _only(mmu_layouts.legacysurvey(tmp_path / "legacysurvey", RA, DEC, size=32))
    _, spec_cols = _only(mmu_layouts.desi(tmp_path / "desi", RA, DEC, Z))
    # the catalogue row positions match the spectra's, its ids are its own
    mmu_layouts.desi_provabgs(tmp_path / "provabgs", RA, DEC, spec_cols["TARGETID"], Z + 0.5)
    assert (
        _prepare(
            tmp_path,
            tmp_path / "legacysurvey",
            tmp_path / "desi",
            "--catalog",
            str(tmp_path / "provabgs"),
        )
        == 0
    )
    manifest = Manifest.load(tmp_path / "shards")
    assert manifest.extra["pixel_scale_arcsec"] == pytest.approx(0.262)
    assert manifest.extra["mask_meanings"]["image"] == ["clean (MMU legacysurvey (bands des-*))"]
    assert manifest.extra["wavelength"]["pixels"] == 7781
    samples = _samples(tmp_path / "shards")
    assert len(samples) == 4
    image_bad = _expected_image_bad(image_cols, [0, 1, 3])
    spec_bad = spec_cols["spectrum_mask"] | ~(spec_cols["spectrum_ivar"] > 0)
    for k, target in enumerate(spec_cols["object_id"]):
        sample = samples[str(target)]
        bad = np.broadcast_to(image_bad[k], sample["image"].shape)
        expected = np.where(bad, 0, image_cols["image_array"][k, [0, 1, 3]])
        np.testing.assert_array_equal(sample["image"], expected)
        np.testing.assert_array_equal(sample["spectrum_mask"], spec_bad[k])
        np.testing.assert_array_equal(
            sample["spectrum"], np.where(spec_bad[k], 0, spec_cols["spectrum_flux"][k])
        )
        assert sample["redshift"] == Z[k] + 0.5  # Z_HP of the catalogue before the spectra's Z


def test_prepare_hsc_with_sdss(tmp_path, capsys):
    mmu_layouts.hsc(tmp_path / "hsc", RA, DEC, size=24)
    mmu_layouts.sdss(tmp_path / "sdss", RA, DEC, Z, lengths=(3000, 2900))
    assert (
        _prepare(
            tmp_path, tmp_path / "hsc", tmp_path / "sdss", "--bands", "G,r,HSC-I,z,y", "--grid", "3900:7000:2"
        )
        == 0
    )
    manifest = Manifest.load(tmp_path / "shards")
    assert manifest.extra["bands"] == ["g", "r", "hsc-i", "z", "y"]  # as asked, lower-case
    assert manifest.extra["pixel_scale_arcsec"] == pytest.approx(0.168)
    assert manifest.extra["mask_meanings"]["spectrum"] == ["bad (MMU sdss (column SPECOBJID))"]
    assert manifest.schema["image"].shape == (5, 24, 24)


# ----------------------------------------------------------------------------- refusals


def _plain_image_file(path: Path, mask: np.ndarray) -> None:
    """An HDF5 image file that says nothing about its mask (not an MMU builder's)."""
    n = mask.shape[0]
    formats.write_hdf5_atomic(
        path,
        {
            "object_id": np.arange(n),
            "ra": RA[:n],
            "dec": DEC[:n],
            "image_array": np.ones((n, 2, 8, 8), np.float32),
            "image_ivar": np.ones((n, 2, 8, 8), np.float32),
            "image_band": np.array([b"g", b"r"]),
            "image_mask": mask,
        },
    )


def test_unknown_mask_meaning_stops_and_names_the_option(tmp_path):
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 0, 0] = True
    _plain_image_file(tmp_path / "img.hdf5", mask)
    with pytest.raises(DataError, match="pass --image-mask-means clean|bad|bits"):
        formats.ImageSource(tmp_path / "img.hdf5", ["g"])
    as_bad = formats.ImageSource(tmp_path / "img.hdf5", ["g"], mask_means="bad").read(np.arange(2))
    as_clean = formats.ImageSource(tmp_path / "img.hdf5", ["g"], mask_means="clean").read(np.arange(2))
    assert as_bad.mask.sum() == 2 and as_clean.mask.sum() == 2 * 63
    bits = np.zeros((2, 8, 8), np.int32)
    bits[:, 1, 1] = 2**11
    _plain_image_file(tmp_path / "bits.hdf5", bits)
    with pytest.raises(DataError, match="bit flags.*--image-mask-means bits"):
        formats.ImageSource(tmp_path / "bits.hdf5", ["g"], mask_means="clean").read(np.arange(2))
    assert formats.ImageSource(tmp_path / "bits.hdf5", ["g"], mask_means="bits").read([0]).mask.sum() == 1


def test_spectrum_mask_meaning_unknown_stops_and_names_the_option(tmp_path, capsys):
    formats.write_hdf5_atomic(
        tmp_path / "spec.hdf5",
        {
            "object_id": np.arange(2),
            "ra": RA[:2],
            "dec": DEC[:2],
            "spectrum_flux": np.ones((2, 5), np.float32),
            "spectrum_lambda": np.linspace(4000, 5000, 5),
            "spectrum_mask": np.zeros((2, 5), bool),
        },
    )
    with pytest.raises(DataError, match="pass --spectrum-mask-means"):
        formats.SpectrumSource(tmp_path / "spec.hdf5")
    assert formats.SpectrumSource(tmp_path / "spec.hdf5", mask_means="bad").mask_meanings == [
        "bad (--spectrum-mask-means)"
    ]


@pytest.fixture
def mmu_pair(tmp_path):
    mmu_layouts.legacysurvey(tmp_path / "ls", RA, DEC, size=16)
    mmu_layouts.desi(tmp_path / "desi", RA, DEC, Z)
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bands", "g,g,g"], "--bands names g more than once"),
        (["--bands", "g,des-g"], "names one stored band twice"),
        (["--bands", "g,u"], "band(s) u requested (--bands) but the file has des-g, des-r, des-i, des-z"),
        (["--cutout", "0"], "--cutout: must lie in [1, 2147483647], got 0"),
        (["--cutout", "-4"], "--cutout: must lie in [1, 2147483647], got -4"),
        (["--grid", "10000:12000:1"], "does not overlap the spectra's wavelengths (3600.0–9824.0 Å)"),
        (["--grid", "100:3000:1"], "does not overlap the spectra's wavelengths"),
    ],
)
def test_prepare_refuses_bad_options(mmu_pair, capsys, args, message):
    assert _prepare(mmu_pair, mmu_pair / "ls", mmu_pair / "desi", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (mmu_pair / "shards").exists()


def test_all_nan_images_are_skipped_and_reported_or_refused(mmu_pair, capsys):
    path = next((mmu_pair / "ls").rglob("*.hdf5"))
    with h5py.File(path, "a") as f:
        f["image_array"][1, 2] = np.nan  # one band of one object: no good pixel
    assert _prepare(mmu_pair, mmu_pair / "ls", mmu_pair / "desi", "--bands", "g,i") == 0
    out = capsys.readouterr().out
    assert '"image_band_without_good_pixels": 1' in out and 'wrote {"train": 3}' in out
    with h5py.File(path, "a") as f:
        f["image_array"][...] = np.nan
    assert _prepare(mmu_pair, mmu_pair / "ls", mmu_pair / "desi", out="all-nan") == 2
    assert "every matched object was skipped" in capsys.readouterr().err


def test_a_mask_of_the_opposite_meaning_gives_the_degenerate_output_error(tmp_path, capsys):
    """A file whose `image_mask` is True for bad pixels but looks like MMU legacysurvey (so is read
    True = clean) masks 99.9 % of every image: prepare fails naming the field, unless told."""
    path, columns = _only(mmu_layouts.legacysurvey(tmp_path / "ls", RA, DEC, size=100, clean_fraction=0.999))
    mmu_layouts.desi(tmp_path / "desi", RA, DEC, Z)
    with h5py.File(path, "a") as f:
        f["image_mask"][...] = ~columns["image_mask"]  # True = bad pixel, the opposite of MMU's
    assert _prepare(tmp_path, tmp_path / "ls", tmp_path / "desi") == 2
    err = capsys.readouterr().err
    assert "degenerate" in err and "'image'" in err and "opposite" in err
    assert not (tmp_path / "shards" / "manifest.json").exists()
    # told what the mask means, the same file prepares fine
    told = ["--image-mask-means", "bad"]
    assert _prepare(tmp_path, tmp_path / "ls", tmp_path / "desi", *told, out="told") == 0
    samples = _samples(tmp_path / "told")
    assert np.mean([np.mean(s["image"] == 0) for s in samples.values()]) < 0.01
