"""`prepare astroclip --part I/N`: the sky cut into N parts by HEALPix pixel, each prepared alone.

**Owning.** The sky's nested nside-16 HEALPix pixels (the `healpix=<i>` folders of a Multimodal
Universe tree) are cut into N contiguous runs of pixel numbers, so that each run holds about the
same number of the pixels that have images (taken from the image files' `healpix=<i>` folder
names, or from the images' positions for other files). Part I owns every image, spectrum and
catalogue row whose position lies in one of its pixels; it writes the pairs whose *image* it owns.
Every pixel of the sphere belongs to exactly one part, so every pair is written by exactly one.

**Margin.** A pair's fate depends on its neighbours: an image is kept only if exactly one spectrum
lies within the radius r, and that spectrum only if exactly one image does (and likewise for the
catalogue join). Deciding an owned pair exactly needs every object within 8r of the part's pixels
(chains of neighbour-of-neighbour up to 5r, plus the catalogue join's). A part therefore reads
the images, spectra and catalogue rows of its pixels *and of the ring of pixels around them* (the
8 neighbours of each; an object within 8r of a pixel lies in it or in a neighbour, since 8r is far
below a pixel's ~3.7 degree width: `MAX_RADIUS_ARCSEC`), matches them together, and keeps the owned
pairs. An image and its spectrum on two sides of a pixel border, stored in two MMU files, are
therefore found by the part that owns the image. Files named `healpix=<i>` are opened only when
`i` is in the part's pixels or ring (an MMU file holds the objects of its pixel, so an object lies
in its folder's pixel or, rounded differently on a border, in a neighbour); other files are
indexed and their rows filtered by position.

**Merging.** Each part counts in its match reports the rows it owns, so `shards merge` adds the
counts; the statistics that are medians (the training split's sky noise, the reports' median
separations) need the values themselves, which each part writes as `part-*.npy` files
(`PART_FILES`) that `merge_stats` pools.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoders.astroclip.formats import HEALPIX_NSIDE, healpix_index
from foundation.errors import DataError

PIXELS = 12 * HEALPIX_NSIDE**2
#: Largest match radius a partitioned prepare takes: 8 radii must stay far below a pixel's width.
MAX_RADIUS_ARCSEC = 60.0
MARGIN_RADII = 8
RULE = (
    f"nested nside-{HEALPIX_NSIDE} HEALPix pixels cut into N runs of about equal numbers of image "
    "pixels; a part owns the images, spectra and catalogue rows of its pixels, writes the pairs whose "
    "image it owns, and reads its pixels plus the ring of neighbouring pixels"
)

_FOLDER = re.compile(r"healpix=(\d+)")


def folder_pixel(path: str | Path) -> int | None:
    """The pixel of an MMU file's `healpix=<i>` folder, None for files elsewhere."""
    found = _FOLDER.fullmatch(Path(path).parent.name)
    if found is None:
        return None
    pixel = int(found.group(1))
    if pixel >= PIXELS:
        raise DataError(
            f"{path}: folder healpix={pixel} is not an nside-{HEALPIX_NSIDE} pixel (0-{PIXELS - 1})"
        )
    return pixel


@dataclass(frozen=True)
class SkyPart:
    """Part `index` of `count`: the pixels [first, stop) it owns and the ring it reads besides."""

    index: int
    count: int
    first: int
    stop: int
    near: np.ndarray  # (PIXELS,) bool: owned pixels and their neighbours

    def owns(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        pixel = healpix_index(np.asarray(ra, float), np.asarray(dec, float))
        return (pixel >= self.first) & (pixel < self.stop)

    def reads(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Rows this part needs: in its pixels or in the ring around them."""
        if len(ra) == 0:
            return np.zeros(0, dtype=bool)
        return self.near[healpix_index(np.asarray(ra, float), np.asarray(dec, float))]

    def wants_file(self, path: str | Path) -> bool:
        pixel = folder_pixel(path)
        return pixel is None or bool(self.near[pixel])

    def provenance(self) -> dict[str, object]:
        """What a partial prepare records in its manifest's provenance (`part`)."""
        return {"index": self.index, "count": self.count, "rule": RULE, "pixels": [self.first, self.stop]}


def check_radius(radius_arcsec: float) -> None:
    if radius_arcsec > MAX_RADIUS_ARCSEC:
        raise DataError(
            f"--match-radius {radius_arcsec} arcsec is too large for --part (at most {MAX_RADIUS_ARCSEC}: "
            f"{MARGIN_RADII} radii must fit well inside a HEALPix pixel); prepare in one run"
        )


def image_pixels(files: Sequence[Path], positions: Callable[[list[Path]], tuple]) -> np.ndarray:
    """The sorted pixels that hold images: from `healpix=<i>` folder names, and from the positions
    of the images in other files (`positions(files)` -> (ra, dec))."""
    named = [folder_pixel(f) for f in files]
    found = {p for p in named if p is not None}
    others = [f for f, p in zip(files, named, strict=True) if p is None]
    if others:
        ra, dec = positions(others)
        found.update(int(p) for p in np.unique(healpix_index(np.asarray(ra, float), np.asarray(dec, float))))
    return np.array(sorted(found), dtype=np.int64)


def sky_part(index: int, count: int, pixels: np.ndarray) -> SkyPart:
    """Part `index` of `count` of the sky, cut between the pixels that hold images."""
    if not 0 <= index < count:
        raise DataError(f"--part {index}/{count}: the part index must be between 0 and {count - 1}")
    if len(pixels) < count:
        raise DataError(
            f"--part {index}/{count}: the images lie in only {len(pixels)} HEALPix pixel(s) (nside "
            f"{HEALPIX_NSIDE}), so part {index} would have none; use at most {len(pixels)} parts"
        )
    starts = [int(pixels[(i * len(pixels)) // count]) for i in range(count)]
    first = 0 if index == 0 else starts[index]
    stop = PIXELS if index == count - 1 else starts[index + 1]
    return SkyPart(index, count, first, stop, _with_ring(first, stop))


def _with_ring(first: int, stop: int) -> np.ndarray:
    from astropy_healpix import core

    near = np.zeros(PIXELS, dtype=bool)
    own = np.arange(first, stop)
    near[own] = True
    with np.errstate(invalid="ignore"):  # -1 where a pixel has 7 neighbours
        ring = core.neighbours(own, HEALPIX_NSIDE, order="nested")
    near[ring[ring >= 0]] = True
    return near


# ----------------------------------------------------------------------------- merging the parts

PART_FILES = {
    "spectrum": "part-train-spectrum-token.npy",
    "image_log_scale": "part-train-image-log-scale.npy",
    "sky": "part-train-sky-sigma.npy",
    "match": "part-match-separation.npy",
    "catalog": "part-catalog-separation.npy",
}


def train_summary(features: dict[str, np.ndarray]) -> dict[str, Any]:
    """Statistics of the training split that the towers normalise with (kept in the manifest),
    from every training object's features (`_TrainStats.arrays`)."""
    spectrum = features["spectrum"]
    sky = np.nanmedian(features["sky"], axis=0)
    return {
        "spectrum_stats_token": {
            "mean": spectrum.mean(0, dtype=np.float64).tolist(),
            "std": spectrum.std(0, dtype=np.float64).tolist(),
            "features": ["asinh(mean flux)", "ln(std flux, floored at 0.2)"],
        },
        "image_log_scale": {
            "mean": float(np.mean(features["image_log_scale"], dtype=np.float64)),
            "std": float(np.std(features["image_log_scale"], dtype=np.float64)),
        },
        "image_sky_sigma": sky.tolist(),
        "image_scale_floor": float(np.median(sky)),
    }


def merge_stats(parts: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`shards merge` of the parts of `prepare astroclip --part I/N`: what one run over the whole sky
    stores. The training statistics are recomputed from every part's training objects' features
    (its part-*.npy files): the medians exactly, means and standard deviations to float64 rounding
    (a sum in another order). The match reports: counts added, median separations of the pooled
    pairs. Everything else in `extra` must agree (mask meanings are joined)."""
    from foundation.data.merge import load_part_array, refuse_difference

    same = "parts of one set must be prepared with the same options"
    for part in parts:
        if not isinstance(part.manifest.provenance.get("part"), dict):
            raise DataError(
                f"part {part.label} was not written by `prepare astroclip --part I/N`, so its training "
                "statistics cannot be pooled; prepare every part with --part"
            )
    refuse_difference(parts, lambda m: _other(m.extra, "match", "mask_meanings"), "extra", same)
    refuse_difference(parts, lambda m: m.extra["match"].get("match_radius_arcsec"), "extra.match", same)
    features = {
        name: np.concatenate([load_part_array(p, PART_FILES[name]) for p in parts])
        for name in ("spectrum", "image_log_scale", "sky")
    }
    if not len(features["image_log_scale"]):
        raise DataError(
            "no part has an object in the train split; use more objects or other --split-fractions"
        )
    extra = dict(parts[0].manifest.extra)
    extra["mask_meanings"] = {
        side: sorted({m for p in parts for m in p.manifest.extra["mask_meanings"][side]})
        for side in ("image", "spectrum")
    }
    extra["match"] = _merge_match_reports(parts)
    return train_summary(features), extra


def _other(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in keys}


_COUNTS = ("matched", "ambiguous_a", "ambiguous_b", "unmatched_a", "unmatched_b")


def _merge_match_reports(parts: Sequence[Any]) -> dict[str, Any]:
    """extra.match over all parts: each part counts the rows it owns, so the counts add up."""
    from foundation.data.merge import load_part_array

    reports = [p.manifest.extra["match"] for p in parts]
    out = dict(reports[0])
    out["images"] = sum(r["images"] for r in reports)
    out["spectra"] = sum(r["spectra"] for r in reports)
    separations = np.concatenate([load_part_array(p, PART_FILES["match"]) for p in parts])
    out["match"] = _merge_counts([r["match"] for r in reports], separations)
    if "catalog" in out:
        separations = np.concatenate([load_part_array(p, PART_FILES["catalog"]) for p in parts])
        out["catalog"] = {
            "rows": sum(r["catalog"]["rows"] for r in reports),
            "match": _merge_counts([r["catalog"]["match"] for r in reports], separations),
        }
    return out


def _merge_counts(reports: list[dict[str, Any]], separations: np.ndarray) -> dict[str, Any]:
    from encoders.astroclip.crossmatch import median_separation

    merged: dict[str, Any] = {key: sum(int(r[key]) for r in reports) for key in _COUNTS}
    if merged["matched"] != len(separations):
        raise DataError(
            f"the parts report {merged['matched']} matched pairs but their separation files hold "
            f"{len(separations)}; re-create the parts"
        )
    merged["median_separation_arcsec"] = median_separation(separations)
    return merged
