"""Tokenizer (no character dropped), normaliser (invertible, clipping counted), number encodings."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.xval import extract_numbers, render_numbers
from encoders.xval.encodings import ENCODINGS, get_encoding, quantize
from encoders.xval.normalizer import Normalizer
from encoders.xval.tokenizer import MASK_ID, NUM_ID, PAD_ID, UNK_ID, TextTokenizer

CORPUS = [
    '{"m":1.25,"a":0.98,"note":"ok"}',
    "expr=((1.25*-3.40)+7.10), ans=2.85",
    "The temperature was 21.5 °C at 10:30 on 2023-10-05.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train([extract_numbers(t).template for t in CORPUS], vocab_size=300)


def test_special_ids_are_fixed(tokenizer):
    assert (PAD_ID, UNK_ID, MASK_ID, NUM_ID) == (0, 1, 2, 3)
    assert [tokenizer.id_to_token(i) for i in range(4)] == ["[PAD]", "[UNK]", "[MASK]", "[NUM]"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_no_character_is_dropped(tokenizer, text):
    ids = tokenizer.encode(text)
    assert UNK_ID not in ids  # byte-level: every character has tokens
    assert not set(ids) & {PAD_ID, MASK_ID, NUM_ID}  # text never becomes a special token
    assert tokenizer.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=5), st.floats(-1e5, 1e5).map(repr)), max_size=10).map(" ".join))
def test_parsed_text_round_trips_through_token_ids(tokenizer, text):
    parsed = extract_numbers(text)
    ids = tokenizer.encode_parsed(parsed)
    assert ids.dtype == np.int32
    assert int((ids == NUM_ID).sum()) == len(parsed)
    assert tokenizer.segments(ids) == parsed.segments
    rebuilt = type(parsed)(
        "[NUM]".join(tokenizer.segments(ids)), parsed.values, parsed.literals, parsed.fields
    )
    assert render_numbers(rebuilt) == text


def test_specials_spelled_in_text_stay_text(tokenizer):
    ids = tokenizer.encode("a [MASK] b [PAD] [NUM]")
    assert not set(ids) & {PAD_ID, UNK_ID, MASK_ID, NUM_ID}
    assert tokenizer.decode(ids) == "a [MASK] b [PAD] [NUM]"


def test_save_load_pickle(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok.json")
    loaded = TextTokenizer.load(tmp_path / "tok.json")
    text = "x=[MASK] ünïcødé 😀"
    assert loaded.encode(text) == tokenizer.encode(text)
    clone = pickle.loads(pickle.dumps(tokenizer))  # loader workers receive a pickled copy
    assert clone.encode(text) == tokenizer.encode(text)


# ----------------------------------------------------------------------------- normaliser


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=50),
    st.sampled_from(["affine", "signlog"]),
)
def test_normaliser_inverts_unclipped_values(values, kind):
    values = np.asarray(values)
    names = ["a" if i % 2 else "b" for i in range(len(values))]
    norm = Normalizer.fit(values, names, kind=kind, min_count=1, clip=1e9)
    ids = norm.field_ids(names)
    z, clipped = norm.transform(values, ids)
    assert clipped == 0
    np.testing.assert_allclose(norm.inverse(z, ids), values, rtol=1e-9, atol=1e-9 * np.abs(values).max())
    again = Normalizer.from_dict(norm.to_dict())  # what the manifest stores
    np.testing.assert_array_equal(again.transform(values, ids)[0], z)


def test_normaliser_clips_and_counts():
    norm = Normalizer.fit(np.array([0.0, 1.0, 2.0, 3.0]), ["_"] * 4, clip=5.0)
    z, clipped = norm.transform(np.array([1.5, 100.0, -100.0]), np.zeros(3, dtype=np.int16))
    assert clipped == 2
    assert z[1] == 5.0 and z[2] == -5.0  # clipped, never wrapped
    assert abs(z[0]) < 5


def test_normaliser_fields_and_fallback():
    values = np.r_[np.full(30, 100.0) + np.arange(30), np.arange(5.0)]
    names = ["big"] * 30 + ["rare"] * 5
    norm = Normalizer.fit(values, names, min_count=20)
    assert norm.fields == ["_", "big"]
    assert norm.field_ids(["big", "rare", "unknown"]).tolist() == [1, 0, 0]
    z, _ = norm.transform(values[:30], norm.field_ids(names[:30]))
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9
    signlog = Normalizer.fit(np.logspace(-3, 8, 100), ["w"] * 100, kind="signlog", min_count=1)
    z, clipped = signlog.transform(np.logspace(-3, 8, 100), signlog.field_ids(["w"] * 100))
    assert clipped == 0 and np.all(np.diff(z) > 0)


# ----------------------------------------------------------------------------- encodings


def test_baseline_vocabulary_sizes_match_the_paper():
    sizes = {
        name: (get_encoding(name).tokens_per_number, get_encoding(name).vocab_size) for name in ENCODINGS
    }
    assert sizes == {
        "xval": (1, 0),
        "p10": (5, 28),
        "p1000": (3, 918),
        "b1999": (2, 1816),
        "fp15": (1, 28800),
    }


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-9e7, 9e7, allow_nan=False), min_size=1, max_size=20))
def test_baselines_round_trip_to_three_significant_digits(values):
    values = np.asarray(values)
    for name in ENCODINGS[1:]:
        enc = get_encoding(name)
        local, clipped = enc.encode(values)
        assert clipped == 0
        assert local.shape == (len(values), enc.tokens_per_number)
        assert local.min() >= 0 and local.max() < enc.vocab_size
        decoded = enc.decode(local)
        big = np.abs(values) >= 1e-8
        np.testing.assert_allclose(decoded[big], values[big], rtol=5.01e-3)
        assert np.all(np.abs(decoded[~big]) <= 1e-8)


def test_baseline_decode_flags_unparseable():
    p10 = get_encoding("p10")
    good, _ = p10.encode(np.array([0.25]))
    assert p10.decode(good)[0] == pytest.approx(0.25)
    swapped = good[:, [1, 0, 2, 3, 4]]  # a digit where the sign belongs
    assert np.isnan(p10.decode(swapped)[0])
    text_token = good.copy()
    text_token[0, 2] = -5  # a text token inside a number
    assert np.isnan(p10.decode(text_token)[0])
    assert quantize(np.array([1e9]))[3] == 1  # beyond 9.99e7: clipped and counted


def test_normaliser_survives_a_subnormal_median():
    """Found by the property test above: a median |v| of 5e-324 made the signlog fit inf/NaN."""
    values = np.array([0.0, 0.0, 1.0, 0.0, 5e-324])
    names = ["a" if i % 2 else "b" for i in range(len(values))]
    norm = Normalizer.fit(values, names, kind="signlog", min_count=1, clip=1e9)
    ids = norm.field_ids(names)
    z, clipped = norm.transform(values, ids)
    assert clipped == 0 and np.isfinite(z).all()
    np.testing.assert_allclose(norm.inverse(z, ids), values, rtol=1e-9, atol=1e-9)
