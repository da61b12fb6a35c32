"""Unique sky cross-matches between two sources (astropy `SkyCoord`).

A pair is kept only if each side has exactly one counterpart within the radius; objects with
two or more counterparts on either side are *ambiguous* (blends, shredded galaxies, close pairs)
and dropped, as are objects with none. Counting both ways makes the rule symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord


@dataclass(frozen=True)
class MatchResult:
    index_a: np.ndarray  # rows of source A that matched, one per pair
    index_b: np.ndarray  # rows of source B, aligned with index_a
    separation_arcsec: np.ndarray
    ambiguous_a: int  # rows of A with >1 counterpart (or whose counterpart has >1)
    ambiguous_b: int
    unmatched_a: int  # rows of A with no counterpart within the radius
    unmatched_b: int

    @property
    def matched(self) -> int:
        return len(self.index_a)

    def summary(self, name_a: str, name_b: str) -> str:
        return (
            f"{self.matched} unique {name_a}-{name_b} matches; ambiguous (dropped): "
            f"{self.ambiguous_a} {name_a} / {self.ambiguous_b} {name_b}; no counterpart (dropped): "
            f"{self.unmatched_a} {name_a} / {self.unmatched_b} {name_b}"
        )

    def to_dict(self) -> dict[str, int | float]:
        return {
            "matched": self.matched,
            "ambiguous_a": self.ambiguous_a,
            "ambiguous_b": self.ambiguous_b,
            "unmatched_a": self.unmatched_a,
            "unmatched_b": self.unmatched_b,
            "median_separation_arcsec": float(np.median(self.separation_arcsec)) if self.matched else 0.0,
        }


def match_unique(
    ra_a: np.ndarray, dec_a: np.ndarray, ra_b: np.ndarray, dec_b: np.ndarray, radius_arcsec: float = 1.0
) -> MatchResult:
    """Unique pairs of A and B rows closer than `radius_arcsec` (coordinates in degrees, ICRS)."""
    if radius_arcsec <= 0:
        raise ValueError(f"match radius must be positive, got {radius_arcsec} arcsec")
    n_a, n_b = len(ra_a), len(ra_b)
    if n_a == 0 or n_b == 0:
        empty = np.zeros(0, dtype=np.int64)
        return MatchResult(empty, empty, np.zeros(0), 0, 0, n_a, n_b)
    a = SkyCoord(
        ra=np.asarray(ra_a, dtype=np.float64) * u.deg, dec=np.asarray(dec_a, dtype=np.float64) * u.deg
    )
    b = SkyCoord(
        ra=np.asarray(ra_b, dtype=np.float64) * u.deg, dec=np.asarray(dec_b, dtype=np.float64) * u.deg
    )
    # b.search_around_sky(a, r) -> (rows of a, rows of b, separations, distances)
    ia, ib, sep2d, _ = b.search_around_sky(a, radius_arcsec * u.arcsec)
    ia = ia.astype(np.int64)
    ib = ib.astype(np.int64)
    sep = sep2d.to_value(u.arcsec)
    count_a = np.bincount(ia, minlength=n_a)
    count_b = np.bincount(ib, minlength=n_b)
    unique = (count_a[ia] == 1) & (count_b[ib] == 1)
    has_a = count_a > 0
    has_b = count_b > 0
    keep_a = np.zeros(n_a, dtype=bool)
    keep_a[ia[unique]] = True
    keep_b = np.zeros(n_b, dtype=bool)
    keep_b[ib[unique]] = True
    order = np.argsort(ia[unique], kind="stable")
    return MatchResult(
        index_a=ia[unique][order],
        index_b=ib[unique][order],
        separation_arcsec=sep[unique][order],
        ambiguous_a=int((has_a & ~keep_a).sum()),
        ambiguous_b=int((has_b & ~keep_b).sum()),
        unmatched_a=int((~has_a).sum()),
        unmatched_b=int((~has_b).sum()),
    )
