"""The partitioned sky cross-match gives exactly the global match's result on any sky."""

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy_healpix import core as healpix
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoders.astroclip import crossmatch
from encoders.astroclip.crossmatch import (
    MatchResult,
    match_unique,
    match_unique_auto,
    match_unique_partitioned,
)

ARCSEC = 1 / 3600
FIELDS = (
    "index_a",
    "index_b",
    "separation_arcsec",
    "ambiguous_a",
    "ambiguous_b",
    "unmatched_a",
    "unmatched_b",
)


def assert_same(expected: MatchResult, got: MatchResult) -> None:
    for name in FIELDS:
        assert np.array_equal(getattr(expected, name), getattr(got, name)), name


def nearest_neighbour_match(ra_a, dec_a, ra_b, dec_b, radius_arcsec: float) -> MatchResult:
    """The unique-match rule from astropy's `match_to_catalog_sky` alone, as an independent oracle:
    an object has exactly one counterpart when its nearest neighbour is within the radius and its
    second nearest is not."""
    a = SkyCoord(ra=ra_a * u.deg, dec=dec_a * u.deg)
    b = SkyCoord(ra=ra_b * u.deg, dec=dec_b * u.deg)
    radius = radius_arcsec * u.arcsec
    near_ab, first_a, _ = a.match_to_catalog_sky(b)
    _, second_a, _ = a.match_to_catalog_sky(b, nthneighbor=2)
    _, first_b, _ = b.match_to_catalog_sky(a)
    _, second_b, _ = b.match_to_catalog_sky(a, nthneighbor=2)
    one_a = (first_a <= radius) & (second_a > radius)
    one_b = (first_b <= radius) & (second_b > radius)
    keep = one_a & one_b[near_ab]
    index_a = np.flatnonzero(keep)
    matched, has_a, has_b = len(index_a), int((first_a <= radius).sum()), int((first_b <= radius).sum())
    return MatchResult(
        index_a,
        near_ab[index_a],
        a[index_a].separation(b[near_ab[index_a]]).to_value(u.arcsec),
        has_a - matched,
        has_b - matched,
        len(ra_a) - has_a,
        len(ra_b) - has_b,
    )


def assert_matches_oracles(ra_a, dec_a, ra_b, dec_b, radius_arcsec, group_size) -> MatchResult:
    expected = match_unique(ra_a, dec_a, ra_b, dec_b, radius_arcsec)
    got = match_unique_partitioned(ra_a, dec_a, ra_b, dec_b, radius_arcsec, group_size=group_size)
    assert_same(expected, got)
    oracle = nearest_neighbour_match(ra_a, dec_a, ra_b, dec_b, radius_arcsec)
    for name in FIELDS:
        if name == "separation_arcsec":
            assert np.allclose(oracle.separation_arcsec, got.separation_arcsec, rtol=1e-9, atol=1e-9)
        else:
            assert np.array_equal(getattr(oracle, name), getattr(got, name)), name
    return got


def uniform_sky(rng, n):
    return rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))


def scatter(rng, ra, dec, sigma_arcsec):
    """Positions moved by a random offset of about `sigma_arcsec` (valid near the poles too)."""
    c = SkyCoord(ra=ra * u.deg, dec=dec * u.deg)
    moved = c.directional_offset_by(
        rng.uniform(0, 360, len(ra)) * u.deg, np.abs(rng.normal(0, sigma_arcsec, len(ra))) * u.arcsec
    )
    return moved.ra.deg, moved.dec.deg


def counterpart_sky(rng, ra_a, dec_a, radius_arcsec, twins=0.1, extra=0.3):
    """B: a scattered counterpart for 70 % of A, a second one within the radius for `twins` of those
    (ambiguous), second A objects near some B, and unrelated objects."""
    n = len(ra_a)
    take = rng.random(n) < 0.7
    ra_b, dec_b = scatter(rng, ra_a[take], dec_a[take], radius_arcsec / 4)
    twin = rng.random(len(ra_b)) < twins
    ra_t, dec_t = scatter(rng, ra_b[twin], dec_b[twin], radius_arcsec / 3)
    ra_u, dec_u = uniform_sky(rng, int(extra * n))
    ra_b = np.concatenate([ra_b, ra_t, ra_u])
    dec_b = np.concatenate([dec_b, dec_t, dec_u])
    order = rng.permutation(len(ra_b))
    return ra_b[order], dec_b[order]


def test_uniform_sky_equals_global_match(monkeypatch):
    monkeypatch.setattr(crossmatch, "_CHUNK", 1000)  # pixel indices computed in several chunks
    rng = np.random.default_rng(1)
    ra_a, dec_a = uniform_sky(rng, 4000)
    ra_b, dec_b = counterpart_sky(rng, ra_a, dec_a, 2.0)
    got = assert_matches_oracles(ra_a, dec_a, ra_b, dec_b, 2.0, group_size=200)
    assert got.matched > 2000 and got.ambiguous_a > 50 and got.ambiguous_b > 50


def test_clustered_sky_splits_dense_pixels_and_still_equals_global_match():
    rng = np.random.default_rng(2)
    centres = uniform_sky(rng, 5)
    ra_a = np.concatenate([rng.normal(ra, 20 * ARCSEC, 600) for ra in centres[0]])
    dec_a = np.concatenate([np.clip(rng.normal(dec, 20 * ARCSEC, 600), -90, 90) for dec in centres[1]])
    ra_a %= 360
    ra_b, dec_b = counterpart_sky(rng, ra_a, dec_a, 1.0, twins=0.2)
    got = assert_matches_oracles(ra_a, dec_a, ra_b, dec_b, 1.0, group_size=100)
    assert got.matched > 100 and got.ambiguous_a > 0


def border_points(order: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Points exactly on the borders (and corners) of every pixel of one HEALPix order."""
    lon, lat = healpix.boundaries_lonlat(np.arange(12 * 4**order), step, 2**order, order="nested")
    return lon.to_value(u.deg).ravel(), lat.to_value(u.deg).ravel()


def test_objects_on_pixel_borders_and_ambiguous_pairs_across_them():
    rng = np.random.default_rng(3)
    ra_a, dec_a = np.concatenate([border_points(o, 2) for o in range(3)], axis=1)
    ra_a, dec_a = np.unique(np.round(np.stack([ra_a, dec_a]), 9), axis=1)
    # each border object gets counterparts on either side of its border, some two (ambiguous)
    ra_b, dec_b = counterpart_sky(rng, ra_a, dec_a, 5.0, twins=0.3, extra=0.0)
    got = assert_matches_oracles(ra_a, dec_a, ra_b, dec_b, 5.0, group_size=16)
    assert got.matched > 100 and got.ambiguous_a > 10 and got.ambiguous_b > 10


def test_poles_where_right_ascension_degenerates():
    rng = np.random.default_rng(4)
    n = 400
    dec_a = np.concatenate(
        [90 - np.abs(rng.normal(0, 3 * ARCSEC, n)), -90 + np.abs(rng.normal(0, 3 * ARCSEC, n))]
    )
    ra_a = rng.uniform(0, 360, 2 * n)
    dec_a[:4] = [90, 90, -90, -89.9999]  # the same point twice at the pole with different RA
    ra_b, dec_b = counterpart_sky(rng, ra_a, dec_a, 0.5, twins=0.1)
    got = assert_matches_oracles(ra_a, dec_a, ra_b, dec_b, 0.5, group_size=32)
    assert got.matched > 50


def test_duplicate_counterparts_in_a_neighbouring_pixel_make_both_ambiguous():
    """(45, 0), (135, 0) and (225, 0) are corners where four base pixels meet: every counterpart
    below sits in another base pixel than its partner, at every HEALPix order."""
    d = 0.3 * ARCSEC
    ra_a = np.array([45 + d, 135 - d, 135, 225 - d])
    dec_a = np.array([0, 0, 2 * d, 0])
    ra_b = np.array([45 + 2 * d, 45, 135 + d, 225 + d])
    dec_b = np.array([0, -d, 0, 0])
    pixels = healpix.lonlat_to_healpix(
        np.concatenate([ra_a, ra_b]) * u.deg, np.concatenate([dec_a, dec_b]) * u.deg, 1, order="nested"
    )
    assert pixels.tolist() == [5, 5, 1, 6, 5, 8, 6, 7]
    fillers = uniform_sky(np.random.default_rng(5), 200)  # enough objects to split the sky
    ra_b, dec_b = np.concatenate([ra_b, fillers[0]]), np.concatenate([dec_b, fillers[1]])
    got = assert_matches_oracles(ra_a, dec_a, ra_b, dec_b, 1.0, group_size=8)
    # A0 has two counterparts (B0 in its pixel, B1 across the border); B2 has two (A1, A2 in two
    # pixels); only A3-B3 across a border is unique
    assert got.index_a.tolist() == [3] and got.index_b.tolist() == [3]
    assert (got.ambiguous_a, got.ambiguous_b) == (3, 3)


def test_empty_pixels_empty_sources_and_small_inputs():
    rng = np.random.default_rng(6)
    ra_a = rng.uniform(10, 10.01, 300)  # one small patch: almost every pixel is empty
    dec_a = rng.uniform(-5, -4.99, 300)
    ra_b, dec_b = counterpart_sky(rng, ra_a, dec_a, 1.0, extra=0.0)
    assert_matches_oracles(ra_a, dec_a, ra_b, dec_b, 1.0, group_size=10)
    none = np.zeros(0)
    assert_same(match_unique(ra_a, dec_a, none, none), match_unique_partitioned(ra_a, dec_a, none, none))
    assert_same(
        match_unique(ra_a, dec_a, ra_b, dec_b),
        match_unique_partitioned(ra_a, dec_a, ra_b, dec_b, group_size=10**6),
    )


def test_each_group_matches_a_bounded_number_of_objects(monkeypatch):
    """The KD-tree work sees one group and its margin, never the whole sky."""
    sizes = []
    search = crossmatch._pairs_within

    def recording(ra_a, dec_a, ra_b, dec_b, radius):
        sizes.append((len(ra_a), len(ra_b)))
        return search(ra_a, dec_a, ra_b, dec_b, radius)

    monkeypatch.setattr(crossmatch, "_pairs_within", recording)
    rng = np.random.default_rng(7)
    ra_a, dec_a = uniform_sky(rng, 20000)
    ra_b, dec_b = counterpart_sky(rng, ra_a, dec_a, 1.0)
    match_unique_partitioned(ra_a, dec_a, ra_b, dec_b, 1.0, group_size=2000)
    assert len(sizes) > 20
    assert max(a for a, _ in sizes) <= 2000 and max(b for _, b in sizes) <= 2 * 2000


def test_auto_matches_globally_when_small_and_per_group_when_large(monkeypatch):
    rng = np.random.default_rng(8)
    ra_a, dec_a = uniform_sky(rng, 3000)
    ra_b, dec_b = counterpart_sky(rng, ra_a, dec_a, 1.0)
    expected = match_unique(ra_a, dec_a, ra_b, dec_b, 1.0)
    calls = []
    partitioned = crossmatch.match_unique_partitioned

    def recording(*args, **kwargs):
        calls.append(len(args[0]))
        return partitioned(*args, group_size=500)

    monkeypatch.setattr(crossmatch, "match_unique_partitioned", recording)
    assert_same(expected, match_unique_auto(ra_a, dec_a, ra_b, dec_b, 1.0))
    assert calls == []
    monkeypatch.setattr(crossmatch, "GLOBAL_MATCH_MAX_OBJECTS", 1000)
    assert_same(expected, match_unique_auto(ra_a, dec_a, ra_b, dec_b, 1.0))
    assert calls == [3000]


def test_bad_arguments_are_refused():
    one = np.zeros(1)
    many = np.zeros(50)
    for bad_ra, bad_dec in ((np.nan, 0.0), (0.0, np.inf), (0.0, 90.5)):
        ra, dec = many.copy(), many.copy()
        ra[7], dec[7] = bad_ra, bad_dec
        for match in (match_unique, lambda *a: match_unique_partitioned(*a, group_size=8)):
            with pytest.raises(ValueError):
                match(ra, dec, many, many)
    with pytest.raises(ValueError, match="radius must be positive"):
        match_unique_partitioned(one, one, one, one, radius_arcsec=0)
    with pytest.raises(ValueError, match="group size"):
        match_unique_partitioned(one, one, one, one, group_size=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_a=st.integers(1, 60),
    n_b=st.integers(1, 60),
    group_size=st.integers(1, 20),
    dec_centre=st.sampled_from([-90.0, -45.0, 0.0, 41.8103149, 89.99]),
    patch_arcsec=st.sampled_from([3.0, 30.0, 3600.0]),
)
@pytest.mark.slow
def test_property_small_random_skies_equal_global_match(seed, n_a, n_b, group_size, dec_centre, patch_arcsec):
    rng = np.random.default_rng(seed)
    centre = SkyCoord(ra=rng.uniform(0, 360) * u.deg, dec=dec_centre * u.deg)

    def patch(n):
        c = centre.directional_offset_by(
            rng.uniform(0, 360, n) * u.deg, rng.uniform(0, patch_arcsec, n) * u.arcsec
        )
        return c.ra.deg, c.dec.deg

    (ra_a, dec_a), (ra_b, dec_b) = patch(n_a), patch(n_b)
    radius = float(rng.choice([0.5, 2.0, 10.0]))
    expected = match_unique(ra_a, dec_a, ra_b, dec_b, radius)
    assert_same(expected, match_unique_partitioned(ra_a, dec_a, ra_b, dec_b, radius, group_size=group_size))


@pytest.mark.slow
def test_owned_parts_of_a_match_add_up_to_the_whole_match():
    """`MatchResult.owned` over a split of both sources into parts (each row owned by one part):
    the parts' pairs are the whole match's pairs, and their counts add up to its counts; the
    partitioned match carries the same per-row counterpart flags as the global one."""
    rng = np.random.default_rng(7)
    ra_a, dec_a = uniform_sky(rng, 1500)
    ra_b, dec_b = counterpart_sky(rng, ra_a, dec_a, 2.0)
    whole = match_unique(ra_a, dec_a, ra_b, dec_b, 2.0)
    grouped = match_unique_partitioned(ra_a, dec_a, ra_b, dec_b, 2.0, group_size=100)
    assert np.array_equal(whole.has_counterpart_a, grouped.has_counterpart_a)
    assert np.array_equal(whole.has_counterpart_b, grouped.has_counterpart_b)
    owner_a, owner_b = rng.integers(0, 3, len(ra_a)), rng.integers(0, 3, len(ra_b))
    parts = [whole.owned(owner_a == p, owner_b == p) for p in range(3)]
    index_a, index_b = (np.concatenate([getattr(p, f) for p in parts]) for f in ("index_a", "index_b"))
    pairs = sorted(zip(index_a, index_b, strict=True))
    assert pairs == sorted(zip(whole.index_a, whole.index_b, strict=True))
    for name in ("matched", "ambiguous_a", "ambiguous_b", "unmatched_a", "unmatched_b"):
        assert sum(getattr(p, name) for p in parts) == getattr(whole, name), name
    assert whole.ambiguous_b > 10 and whole.unmatched_b > 10
