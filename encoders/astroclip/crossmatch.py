"""Unique sky cross-matches between two sources (astropy `SkyCoord`).

A pair is kept only if each side has exactly one counterpart within the radius; objects with
two or more counterparts on either side are *ambiguous* (blends, shredded galaxies, close pairs)
and dropped, as are objects with none. Counting both ways makes the rule symmetric.

`match_unique` matches everything at once; `match_unique_partitioned` gives the same result
with bounded working memory by matching one HEALPix pixel group at a time (survey-sized inputs);
`match_unique_auto` picks between them by size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy_healpix import core as healpix

GLOBAL_MATCH_MAX_OBJECTS = 1 << 19  # both sources; above, `match_unique_auto` matches per pixel group
DEFAULT_GROUP_SIZE = 1 << 17  # objects of both sources per matched group (partitioned match)
_MAX_ORDER = 24  # finest HEALPix order a group is split to (pixels of ~12 mas)
_CHUNK = 1 << 20  # objects per HEALPix indexing call (bounds astropy's temporaries)
_SLACK_RAD = 1e-9  # rounding allowance (0.2 mas) in the pruning bounds; pruning only, never matching


@dataclass(frozen=True)
class MatchResult:
    index_a: np.ndarray  # rows of source A that matched, one per pair
    index_b: np.ndarray  # rows of source B, aligned with index_a
    separation_arcsec: np.ndarray
    ambiguous_a: int  # rows of A with >1 counterpart (or whose counterpart has >1)
    ambiguous_b: int
    unmatched_a: int  # rows of A with no counterpart within the radius
    unmatched_b: int
    # Per row: has at least one counterpart within the radius (what `owned` recounts from).
    has_counterpart_a: np.ndarray | None = field(default=None, repr=False, compare=False)
    has_counterpart_b: np.ndarray | None = field(default=None, repr=False, compare=False)

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
            "median_separation_arcsec": median_separation(self.separation_arcsec),
        }

    def owned(self, own_a: np.ndarray, own_b: np.ndarray) -> MatchResult:
        """The pairs whose A row is owned (`own_a`, a mask over A's rows), and the ambiguous and
        unmatched counts of the owned rows of each side: what one part of a sky partition reports,
        so that the parts' counts add up to the whole match's. A B row paired with an A row
        another part owns counts as matched here (it is not ambiguous), and its pair is that part's."""
        if self.has_counterpart_a is None or self.has_counterpart_b is None:
            raise ValueError("this match carries no per-row counterpart flags")
        paired_a = np.zeros(len(own_a), dtype=bool)
        paired_a[self.index_a] = True
        paired_b = np.zeros(len(own_b), dtype=bool)
        paired_b[self.index_b] = True
        keep = own_a[self.index_a]
        has_a, has_b = self.has_counterpart_a, self.has_counterpart_b
        return MatchResult(
            index_a=self.index_a[keep],
            index_b=self.index_b[keep],
            separation_arcsec=self.separation_arcsec[keep],
            ambiguous_a=int((has_a & ~paired_a & own_a).sum()),
            ambiguous_b=int((has_b & ~paired_b & own_b).sum()),
            unmatched_a=int((~has_a & own_a).sum()),
            unmatched_b=int((~has_b & own_b).sum()),
            has_counterpart_a=has_a,
            has_counterpart_b=has_b,
        )


def median_separation(separation_arcsec: np.ndarray) -> float:
    """The match report's median separation (0 when nothing matched)."""
    return float(np.median(separation_arcsec)) if len(separation_arcsec) else 0.0


def _check_radius(radius_arcsec: float) -> None:
    if radius_arcsec <= 0:
        raise ValueError(f"match radius must be positive, got {radius_arcsec} arcsec")


def _pairs_within(
    ra_a: np.ndarray, dec_a: np.ndarray, ra_b: np.ndarray, dec_b: np.ndarray, radius_arcsec: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows of A, rows of B, separation in arcsec) of every pair closer than the radius.

    The one pair criterion of both matchers: astropy's KD-tree search on unit vectors."""
    a = SkyCoord(
        ra=np.asarray(ra_a, dtype=np.float64) * u.deg, dec=np.asarray(dec_a, dtype=np.float64) * u.deg
    )
    b = SkyCoord(
        ra=np.asarray(ra_b, dtype=np.float64) * u.deg, dec=np.asarray(dec_b, dtype=np.float64) * u.deg
    )
    # b.search_around_sky(a, r) -> (rows of a, rows of b, separations, distances)
    ia, ib, sep2d, _ = b.search_around_sky(a, radius_arcsec * u.arcsec)
    return ia.astype(np.int64), ib.astype(np.int64), sep2d.to_value(u.arcsec)


def match_unique(
    ra_a: np.ndarray, dec_a: np.ndarray, ra_b: np.ndarray, dec_b: np.ndarray, radius_arcsec: float = 1.0
) -> MatchResult:
    """Unique pairs of A and B rows closer than `radius_arcsec` (coordinates in degrees, ICRS)."""
    _check_radius(radius_arcsec)
    n_a, n_b = len(ra_a), len(ra_b)
    if n_a == 0 or n_b == 0:
        empty = np.zeros(0, dtype=np.int64)
        return MatchResult(
            empty, empty, np.zeros(0), 0, 0, n_a, n_b, np.zeros(n_a, dtype=bool), np.zeros(n_b, dtype=bool)
        )
    ia, ib, sep = _pairs_within(ra_a, dec_a, ra_b, dec_b, radius_arcsec)
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
        has_counterpart_a=has_a,
        has_counterpart_b=has_b,
    )


def match_unique_partitioned(
    ra_a: np.ndarray,
    dec_a: np.ndarray,
    ra_b: np.ndarray,
    dec_b: np.ndarray,
    radius_arcsec: float = 1.0,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> MatchResult:
    """`match_unique`'s result, computed one HEALPix pixel group at a time.

    **Groups.** The sky is split as a quadtree of nested HEALPix pixels: a pixel holding more than
    `group_size` objects (A and B together) is split into its four children, down to an order whose
    pixels are still ~8 radii wide. Each leaf pixel is a group. Inputs up to `group_size` objects
    are matched by `match_unique` itself.

    **Margin, and why no pair is missed.** For a leaf `p` with centre `c_p`, let `R_A(p)` be the
    largest angle from `c_p` to an A object in `p` and `R_B(q)` the same for the B objects of a leaf
    `q` (both measured on the data, not taken from the pixel's shape). If `a` in `p` and `b` in `q`
    are within the radius `r`, the triangle inequality of great-circle distance gives
    `d(c_p, b) <= d(c_p, a) + d(a, b) <= R_A(p) + r` and
    `d(c_p, c_q) <= d(c_p, a) + d(a, b) + d(b, c_q) <= R_A(p) + r + R_B(q)`.
    So group `p` takes the B objects of every leaf `q` with `d(c_p, c_q) <= R_A(p) + r + R_B(q)`
    that lie within `R_A(p) + r` of `c_p`: a superset of every counterpart of its A objects, from
    its own pixel and from any pixel across its borders. Nothing here depends on the pixel's shape,
    its neighbours, or where it is (pole, equator, the seam of the base pixels, objects exactly on
    a border): the triangle inequality holds everywhere on the sphere. Rounding is covered by a
    0.2 mas allowance on these bounds, which only widen the candidate set. (As in any KD-tree
    search, the global one included, a pair whose separation equals the radius to ~1e-16 could be
    decided either way by rounding in the tree's box tests.)

    **Uniqueness, exactly as the global rule.** The pairs are then found by the very search
    `match_unique` uses, pair by pair on the same coordinates. Each A object belongs to one leaf,
    so its counterparts are all found in its group (its count is complete there, and pairs of A
    objects with more than one counterpart are dropped at once); each B object's count is summed
    over all groups, so a B object with a second counterpart in a neighbouring pixel is seen as
    ambiguous. A pair is kept when both counts are one, as globally.

    **Memory.** Beyond the inputs and the result, the O(N) part is a pixel index and a sort order
    per object (16 bytes) and one counter per B object (4 bytes); astropy's SkyCoord and KD-tree work, the
    bulk of a global match, holds one group and its margin at a time. The margin is about as
    large as the group (the disc around a pixel is ~1.6 times the pixel); a cluster denser than
    `group_size` within a finest-order pixel (~8 radii) stays one group.
    """
    _check_radius(radius_arcsec)
    if group_size < 1:
        raise ValueError(f"group size must be at least 1, got {group_size}")
    n_a, n_b = len(ra_a), len(ra_b)
    if n_a == 0 or n_b == 0 or n_a + n_b <= group_size:
        return match_unique(ra_a, dec_a, ra_b, dec_b, radius_arcsec)
    _check_coordinates(ra_a, dec_a, "A")
    _check_coordinates(ra_b, dec_b, "B")
    radius_rad = math.radians(radius_arcsec / 3600.0)
    order = _finest_order(radius_rad)
    a = _SortedCatalogue(ra_a, dec_a, order)
    b = _SortedCatalogue(ra_b, dec_b, order)
    leaves = _leaf_pixels(a, b, order, group_size)
    centres = _pixel_centres(leaves)
    spans_a = [a.rows_in(level, ipix) for level, ipix in leaves]
    spans_b = [b.rows_in(level, ipix) for level, ipix in leaves]
    reach_a = np.array([a.reach(rows, centre) for rows, centre in zip(spans_a, centres, strict=True)])
    reach_b = np.array([b.reach(rows, centre) for rows, centre in zip(spans_b, centres, strict=True)])

    vectors_b = _LeafVectors(b, spans_b, max_objects=8 * group_size)
    count_b = np.zeros(n_b, dtype=np.int32)  # at most n_a counterparts each
    has_a = np.zeros(n_a, dtype=bool)
    kept_a, kept_b, kept_sep = [], [], []
    for p, rows_a in enumerate(spans_a):
        if len(rows_a) == 0:
            continue
        rows_b = _margin_rows(centres, reach_a[p] + radius_rad, p, reach_b, spans_b, vectors_b)
        if len(rows_b) == 0:
            continue
        ia, ib, sep = _pairs_within(a.ra[rows_a], a.dec[rows_a], b.ra[rows_b], b.dec[rows_b], radius_arcsec)
        count_a = np.bincount(ia, minlength=len(rows_a))
        has_a[rows_a[count_a > 0]] = True
        count_b[rows_b] += np.bincount(ib, minlength=len(rows_b))
        alone = count_a[ia] == 1
        kept_a.append(rows_a[ia[alone]])
        kept_b.append(rows_b[ib[alone]])
        kept_sep.append(sep[alone])
    index_a = np.concatenate(kept_a) if kept_a else np.zeros(0, dtype=np.int64)
    index_b = np.concatenate(kept_b) if kept_b else np.zeros(0, dtype=np.int64)
    separation = np.concatenate(kept_sep) if kept_sep else np.zeros(0)
    unique = count_b[index_b] == 1
    index_a, index_b, separation = index_a[unique], index_b[unique], separation[unique]
    by_a = np.argsort(index_a, kind="stable")
    matched = len(index_a)
    with_counterpart_a = int(has_a.sum())
    with_counterpart_b = int((count_b > 0).sum())
    return MatchResult(
        index_a=index_a[by_a],
        index_b=index_b[by_a],
        separation_arcsec=separation[by_a],
        ambiguous_a=with_counterpart_a - matched,
        ambiguous_b=with_counterpart_b - matched,
        unmatched_a=n_a - with_counterpart_a,
        unmatched_b=n_b - with_counterpart_b,
        has_counterpart_a=has_a,
        has_counterpart_b=count_b > 0,
    )


def _margin_rows(
    centres: np.ndarray,
    reach: float,
    p: int,
    reach_b: np.ndarray,
    spans_b: list[np.ndarray],
    vectors_b: _LeafVectors,
) -> np.ndarray:
    """Rows of B within `reach` (R_A(p) + r, radians) of leaf p's centre, from the leaves q whose
    B objects can lie that close (d(c_p, c_q) <= reach + R_B(q)); with the rounding allowance."""
    near = _angle(centres[p], centres) <= reach + reach_b + _SLACK_RAD
    limit = _squared_chord(reach + _SLACK_RAD)
    rows = []
    for q in np.flatnonzero(near):
        offsets = vectors_b.get(q) - centres[p]
        rows.append(spans_b[q][np.einsum("ij,ij->i", offsets, offsets) <= limit])
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


def match_unique_auto(
    ra_a: np.ndarray, dec_a: np.ndarray, ra_b: np.ndarray, dec_b: np.ndarray, radius_arcsec: float = 1.0
) -> MatchResult:
    """`match_unique`'s result by the faster route for the size: one global match up to
    `GLOBAL_MATCH_MAX_OBJECTS` objects (its working memory, ~300 bytes an object, is then small),
    per HEALPix pixel group above (a fifth of the memory and about as fast at 10⁶ × 10⁶:
    benchmarks/crossmatch.py)."""
    if len(ra_a) + len(ra_b) <= GLOBAL_MATCH_MAX_OBJECTS:
        return match_unique(ra_a, dec_a, ra_b, dec_b, radius_arcsec)
    return match_unique_partitioned(ra_a, dec_a, ra_b, dec_b, radius_arcsec)


def _check_coordinates(ra: np.ndarray, dec: np.ndarray, name: str) -> None:
    """Refuse what astropy's SkyCoord refuses in the global match (a pixel index of -1 would
    silently leave the object out of every group)."""
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise ValueError(f"source {name} has non-finite coordinates; drop those rows before matching")
    if np.any(np.abs(dec) > 90):
        raise ValueError(f"source {name} has declinations outside -90..90 degrees")


def _finest_order(radius_rad: float) -> int:
    """The finest HEALPix order whose pixels are still about 8 match radii wide (at most 24):
    finer groups would be mostly margin."""
    base_width = math.sqrt(math.pi / 3)  # order 0: 12 pixels of equal area
    return int(min(_MAX_ORDER, max(0, math.floor(math.log2(base_width / (8 * radius_rad))))))


def _pixel_centres(pixels: list[tuple[int, int]]) -> np.ndarray:
    """Unit vectors of the centres of (order, nested index) pixels, one row each."""
    centres = np.zeros((len(pixels), 3))
    for i, (level, ipix) in enumerate(pixels):
        centres[i] = [c[0] for c in healpix.healpix_to_xyz(np.array([ipix]), 2**level, order="nested")]
    return centres


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    cos_dec = np.cos(dec)
    return np.stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1)


def _squared_chord(angle: float) -> float:
    """Squared straight-line distance between unit vectors `angle` radians apart (monotonic in
    the angle, so comparing squared chords compares angles without a square root or arcsine)."""
    return 4.0 if angle >= math.pi else (2 * math.sin(angle / 2)) ** 2


def _angle(centre: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Great-circle angle (radians) from one unit vector to many, accurate for small angles."""
    chord = np.linalg.norm(points - centre, axis=-1)
    return 2 * np.arcsin(np.minimum(chord / 2, 1.0))


class _SortedCatalogue:
    """One source's coordinates with its rows sorted by nested HEALPix pixel at the finest order,
    so that every pixel of any coarser order is one contiguous run of rows."""

    def __init__(self, ra: np.ndarray, dec: np.ndarray, order: int):
        self.ra = np.asarray(ra, dtype=np.float64)
        self.dec = np.asarray(dec, dtype=np.float64)
        self.order = order
        self.pixel = np.empty(len(self.ra), dtype=np.int64)
        for start in range(0, len(self.ra), _CHUNK):  # astropy's temporaries: one chunk at a time
            part = slice(start, start + _CHUNK)
            self.pixel[part] = healpix.lonlat_to_healpix(
                self.ra[part] * u.deg, self.dec[part] * u.deg, 2**order, order="nested"
            )
        self.sort = np.argsort(self.pixel, kind="stable")
        self.pixel.sort()  # in place: the same values as pixel[sort], without a second array

    def count(self, level: int, ipix: int) -> int:
        lo, hi = self._bounds(level, ipix)
        return hi - lo

    def rows_in(self, level: int, ipix: int) -> np.ndarray:
        lo, hi = self._bounds(level, ipix)
        return self.sort[lo:hi]

    def _bounds(self, level: int, ipix: int) -> tuple[int, int]:
        shift = 2 * (self.order - level)
        first, stop = ipix << shift, (ipix + 1) << shift
        return int(np.searchsorted(self.pixel, first)), int(np.searchsorted(self.pixel, stop))

    def reach(self, rows: np.ndarray, centre: np.ndarray) -> float:
        """Largest angle from `centre` to these rows (-inf when there are none)."""
        if len(rows) == 0:
            return -math.inf
        return float(_angle(centre, _unit_vectors(self.ra[rows], self.dec[rows])).max())


class _LeafVectors:
    """Unit vectors of one source's objects, leaf by leaf, keeping the most recently used leaves up
    to `max_objects`: a leaf is in the margin of each neighbouring group, which come in nested
    order, so most are computed once while memory stays bounded."""

    def __init__(self, catalogue: _SortedCatalogue, spans: list[np.ndarray], max_objects: int):
        self.catalogue = catalogue
        self.spans = spans
        self.max_objects = max_objects
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()
        self._size = 0

    def get(self, leaf: int) -> np.ndarray:
        if leaf in self._recent:
            self._recent.move_to_end(leaf)
            return self._recent[leaf]
        rows = self.spans[leaf]
        vectors = _unit_vectors(self.catalogue.ra[rows], self.catalogue.dec[rows])
        self._recent[leaf] = vectors
        self._size += len(vectors)
        while self._size > self.max_objects and len(self._recent) > 1:
            _, oldest = self._recent.popitem(last=False)
            self._size -= len(oldest)
        return vectors


def _leaf_pixels(
    a: _SortedCatalogue, b: _SortedCatalogue, order: int, group_size: int
) -> list[tuple[int, int]]:
    """(order, nested index) of the non-empty pixels of the quadtree that splits every pixel with
    more than `group_size` objects of A and B together, down to `order`; in nested order."""
    leaves: list[tuple[int, int]] = []
    stack = [(0, ipix) for ipix in reversed(range(12))]
    while stack:
        level, ipix = stack.pop()
        size = a.count(level, ipix) + b.count(level, ipix)
        if size == 0:
            continue
        if size > group_size and level < order:
            stack.extend((level + 1, 4 * ipix + child) for child in reversed(range(4)))
        else:
            leaves.append((level, ipix))
    return leaves
