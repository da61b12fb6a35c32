"""`prepare astroclip --part I/N` (the sky cut by HEALPix pixel, each part matched with the ring of
pixels around it) and `shards merge` of the parts: the set one prepare over the whole sky writes —
the same pairs under the same keys, byte for byte, the same match reports and training statistics
— including pairs whose image and spectrum lie on two sides of a pixel border, in two MMU files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from encoders.astroclip.formats import healpix_index
from encoders.astroclip.partition import folder_pixel
from foundation.cli import main
from foundation.data import Manifest
from foundation.data.merge import merge_shard_sets
from foundation.errors import DataError
from tests.astroclip import mmu_layouts
from tests.testkit.same_shards import members_by_key

ARCSEC = 1 / 3600.0
OPTIONS = ["--grid", "3600:9800:40", "--samples-per-shard", "5", "--splits", "train=0.6,valid=0.2,test=0.2"]


def _border(ra: float, dec: float, step: float) -> tuple[float, float]:
    """A point on the border between the pixel of (ra, dec) and the next one along ra (bisection)."""
    start = healpix_index(np.array([ra]), np.array([dec]))[0]
    lo, hi = ra, ra
    while healpix_index(np.array([hi]), np.array([dec]))[0] == start:
        hi += step
    for _ in range(60):
        mid = (lo + hi) / 2
        if healpix_index(np.array([mid]), np.array([dec]))[0] == start:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2, dec


def _sky(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Image and spectrum positions: scattered pairs over several pixels, pairs straddling a pixel
    border, and across-border pairs made ambiguous by a third object on the other side."""
    n = 36
    ra = rng.uniform(150.0, 160.0, n)
    dec = rng.uniform(0.5, 7.5, n)
    image = [(r, d) for r, d in zip(ra, dec, strict=True)]
    spectrum = [(r + 0.2 * ARCSEC, d) for r, d in image]
    for k, dec0 in enumerate((1.0, 2.5, 4.0, 5.5)):
        bra, bdec = _border(151.0 + 2 * k, dec0, 0.5)
        image.append((bra - 0.3 * ARCSEC, bdec))  # one pair straddling the border
        spectrum.append((bra + 0.3 * ARCSEC, bdec))
        bra, bdec = _border(151.0 + 2 * k, dec0 + 0.7, 0.5)
        image.append((bra - 0.3 * ARCSEC, bdec))  # ambiguous: two spectra, one on each side
        spectrum.append((bra + 0.3 * ARCSEC, bdec))
        spectrum.append((bra - 0.6 * ARCSEC, bdec + 0.1 * ARCSEC))
    return {"image": np.array(image), "spectrum": np.array(spectrum)}


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("astroclip-sky")
    rng = np.random.default_rng(5)
    sky = _sky(rng)
    images, spectra = sky["image"], sky["spectrum"]
    mmu_layouts.legacysurvey(root / "legacysurvey", images[:, 0], images[:, 1], size=16)
    z = rng.uniform(0.05, 0.5, len(spectra))
    written = mmu_layouts.desi(root / "desi", spectra[:, 0], spectra[:, 1], z)
    ids = np.concatenate([c["TARGETID"] for c in written.values()])
    ra = np.concatenate([c["ra"] for c in written.values()])
    dec = np.concatenate([c["dec"] for c in written.values()])
    mmu_layouts.desi_provabgs(root / "provabgs", ra, dec, ids, rng.uniform(0.05, 0.5, len(ids)))
    return root, sky


def _prepare(root: Path, out: Path, *extra: str) -> int:
    inputs = ["--images", str(root / "legacysurvey"), "--spectra", str(root / "desi")]
    inputs += ["--catalog", str(root / "provabgs")]
    return main(["prepare", "astroclip", *inputs, "--out", str(out), *OPTIONS, *extra])


@pytest.mark.slow
def test_parts_of_the_sky_merge_to_the_one_run_set_with_pairs_across_pixel_borders(survey, tmp_path):
    root, sky = survey
    assert _prepare(root, tmp_path / "whole") == 0
    parts = [tmp_path / "parts" / f"part-{i}" for i in range(3)]
    for i, part in enumerate(parts):
        assert _prepare(root, part, "--part", f"{i}/3") == 0
    merge_shard_sets(parts, tmp_path / "merged")
    merged, whole = Manifest.load(tmp_path / "merged"), Manifest.load(tmp_path / "whole")

    for split in whole.splits:
        assert members_by_key(tmp_path / "merged", split) == members_by_key(tmp_path / "whole", split)
    assert merged.extra == whole.extra  # match reports: counts added, median separations pooled
    assert merged.files == whole.files == {}  # the parts' per-part files stay behind
    _assert_same_train_stats(merged.stats, whole.stats)

    # The straddling pairs were written (each by one part), and their files differ.
    report = whole.extra["match"]["match"]
    assert report["ambiguous_a"] >= 4 and report["ambiguous_b"] >= 8
    straddling = _straddling_pairs(tmp_path / "whole")
    assert len(straddling) == 4
    owners = {key for i, part in enumerate(parts) for key in _keys(part) if key in straddling}
    assert owners == straddling


def _assert_same_train_stats(merged: dict, whole: dict) -> None:
    """Medians exactly (the same values pooled); means and standard deviations to float64
    rounding (relative 1e-12: the same values summed in another order)."""
    assert merged.keys() == whole.keys()
    assert merged["image_sky_sigma"] == whole["image_sky_sigma"]
    assert merged["image_scale_floor"] == whole["image_scale_floor"]
    pairs = [
        *zip(merged["spectrum_stats_token"]["mean"], whole["spectrum_stats_token"]["mean"], strict=True),
        *zip(merged["spectrum_stats_token"]["std"], whole["spectrum_stats_token"]["std"], strict=True),
        (merged["image_log_scale"]["mean"], whole["image_log_scale"]["mean"]),
        (merged["image_log_scale"]["std"], whole["image_log_scale"]["std"]),
    ]
    for a, b in pairs:
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def _keys(folder: Path) -> set[str]:
    return {key for split in Manifest.load(folder).splits for key in members_by_key(folder, split)}


def _straddling_pairs(folder: Path) -> set[str]:
    """Keys of the samples whose image and spectrum lie in different pixels (so in two MMU files;
    every image of the fixture lies due west of its spectrum, at the recorded separation)."""
    import json
    import tarfile

    manifest = Manifest.load(folder)
    found = set()
    for split in manifest.splits:
        for path in manifest.shard_paths(split):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if not member.name.endswith(".meta.json"):
                        continue
                    meta = json.loads(tar.extractfile(member).read())
                    image_ra = meta["ra"] - meta["separation_arcsec"] * ARCSEC / math.cos(
                        math.radians(meta["dec"])
                    )
                    pixels = healpix_index(np.array([meta["ra"], image_ra]), np.array([meta["dec"]] * 2))
                    if pixels[0] != pixels[1]:
                        found.add(member.name.split(".", 1)[0])
    return found


def test_folder_pixel_reads_mmu_folder_names(tmp_path):
    assert folder_pixel(tmp_path / "healpix=1234" / "001-of-001.hdf5") == 1234
    assert folder_pixel(tmp_path / "cutouts" / "a.fits") is None
    with pytest.raises(DataError, match="is not an nside-16 pixel"):
        folder_pixel(tmp_path / "healpix=99999" / "001-of-001.hdf5")


def test_more_parts_than_pixels_with_images_is_refused_in_one_line(survey, tmp_path, capsys):
    root, _ = survey
    assert _prepare(root, tmp_path / "p", "--part", "0/500") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HEALPix pixel(s)" in err and "use at most" in err
