"""The number grammar: lossless round trip, the documented sign/identifier/separator rules."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.xval import extract_numbers, render_numbers
from encoders.xval.numbers import NUM_MARKER, field_at_end, format_value
from foundation.errors import DataError

# Text made of pieces that stress the grammar: numbers in many spellings glued to operators,
# identifiers, brackets, punctuation, separators and arbitrary unicode.
_number = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: f"{v:.3e}"),
    st.floats(0, 1, allow_nan=False).map(lambda v: f"{v:.4f}"[1:]),  # .1234
    st.sampled_from(["5.", "1,000,000", "1,234.5", "-1E+5", "+3", "1e400", "0x1F", "007", "1..10"]),
)
_glue = st.sampled_from(
    [
        "-",
        "+",
        "*",
        "=",
        " ",
        ", ",
        ",",
        ".",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ":",
        '"',
        "'",
        "e",
        "E",
        "x",
        "planet",
        "_",
        "\n",
        "\t",
        "nan",
        "inf",
        "$",
        "≈",
        "…",
        "°C",
        "[NUM",
        "NUM]",
        "[MASK]",
    ]
)
_text = (
    st.lists(st.one_of(_number, _glue, st.text(max_size=4)), max_size=25)
    .map("".join)
    .filter(lambda s: NUM_MARKER not in s)
)


@settings(max_examples=200, deadline=None)
@given(_text, st.sampled_from(["auto", "always", "never"]))
def test_round_trip_is_lossless(text, thousands):
    parsed = extract_numbers(text, thousands=thousands)
    assert render_numbers(parsed) == text
    assert parsed.values.dtype == np.float64
    assert (
        len(parsed.values) == len(parsed.literals) == len(parsed.fields) == parsed.template.count(NUM_MARKER)
    )
    assert np.all(np.isfinite(parsed.values))
    # Each literal's value is exactly float64 of its spelling (never float16/float32).
    for literal, value in zip(parsed.literals, parsed.values, strict=True):
        assert float(literal.replace(",", "")) == value


@settings(max_examples=100, deadline=None)
@given(_text)
def test_render_with_new_values_puts_them_in_place(text):
    parsed = extract_numbers(text)
    new = np.arange(len(parsed), dtype=np.float64) + 0.5
    rendered = render_numbers(parsed, new)
    expected = parsed.template
    for v in new:
        expected = expected.replace(NUM_MARKER, format_value(v), 1)
    assert rendered == expected


@pytest.mark.parametrize(
    ("text", "values", "template"),
    [
        ("1-2", [1, 2], "[NUM]-[NUM]"),  # operator after a digit
        ("x=-3", [-3], "x=[NUM]"),  # sign after '='
        ("(-2)", [-2], "([NUM])"),  # sign after '('
        ("(1)-2", [1, 2], "([NUM])-[NUM]"),  # operator after ')'
        ("x-1", [1], "x-[NUM]"),  # operator after an identifier
        ("1 -2", [1, -2], "[NUM] [NUM]"),  # sign after a space
        ("+-0.5", [-0.5], "+[NUM]"),
        ("3.1e-2 and -1E+5", [0.031, -1e5], "[NUM] and [NUM]"),
        (".5 5.e3", [0.5, 5000], "[NUM] [NUM]"),
        ("[5., 6.]", [5, 6], "[[NUM], [NUM]]"),  # trailing dot before punctuation
        ("It was 5.", [5], "It was [NUM]."),  # a full stop is not a decimal point
        ("planet0 a1b x_2 'a1b'", [], "planet0 a1b x_2 'a1b'"),  # digits in identifiers
        ("v1.2.3 192.168.0.1", [], "v1.2.3 192.168.0.1"),  # dotted tokens stay text
        ("1..10", [1, 10], "[NUM]..[NUM]"),
        ("1...5", [1, 5], "[NUM]...[NUM]"),
        ("about\u00a01,000 (2,500)", [1000, 2500], "about\u00a0[NUM] ([NUM])"),
        ("5km 3x", [5, 3], "[NUM]km [NUM]x"),  # units may follow
        ("nan inf Infinity 1e400", [], "nan inf Infinity 1e400"),  # not finite numbers: text
        ("70000 1e-8", [70000, 1e-8], "[NUM] [NUM]"),  # float16 would give inf and 0
        ("1,000,000 stars", [1e6], "[NUM] stars"),  # thousands in prose (auto)
        ("[100,200,300]", [100, 200, 300], "[[NUM],[NUM],[NUM]]"),  # never in lists (auto)
        ('{"n":1,234}', [1, 234], '{"n":[NUM],[NUM]}'),
        ("1,000,00", [1, 0, 0], "[NUM],[NUM],[NUM]"),  # not a valid grouping
    ],
)
def test_documented_rules(text, values, template):
    parsed = extract_numbers(text)
    assert parsed.template == template
    np.testing.assert_array_equal(parsed.values, np.asarray(values, dtype=np.float64))


def test_thousands_policies():
    assert extract_numbers("1,000", thousands="never").values.tolist() == [1, 0]
    assert extract_numbers("[1,000]", thousands="always").values.tolist() == [1000]
    assert extract_numbers("[1,000]", thousands="auto").values.tolist() == [1, 0]
    with pytest.raises(ValueError, match="thousands"):
        extract_numbers("1", thousands="sometimes")


def test_fields():
    parsed = extract_numbers('{"m":1.2,"a":3e-2,"xs":[1,2,-3],"note":"x"} b = 4 kg and 5')
    assert parsed.fields == ("m", "a", "xs", "xs", "xs", "b", "_")
    assert field_at_end('{"p":') == "p"
    assert field_at_end('{"p":1,"q":[2,') == "q"
    assert field_at_end("hello ") == "_"


def test_marker_in_input_raises():
    with pytest.raises(DataError, match=r"reserved marker '\[NUM\]' at offset 4"):
        extract_numbers("abc [NUM] 5")
    with pytest.raises(TypeError):
        extract_numbers(b"5")


def test_render_checks_count():
    parsed = extract_numbers("a 1 b 2")
    with pytest.raises(ValueError, match="2 numbers but 1 values"):
        render_numbers(parsed, [1.0])
    assert render_numbers(parsed, [0.1 + 0.2, -4.0]) == "a 0.30000000000000004 b -4"
    assert render_numbers(parsed, [0.1 + 0.2, -4.0], digits=3) == "a 0.3 b -4"


def test_out_of_range_and_nonfinite_spellings_stay_text_and_are_counted():
    text = "x = 1e999, y = NaN, z=-inf, w = 1e308, u = -2e100, v = 1e100, Infinity, planetnan"
    parsed = extract_numbers(text)
    assert parsed.values.tolist() == [1e100] and parsed.fields == ("v",)
    assert parsed.not_numbers == 6  # 1e999, NaN, -inf, 1e308, -2e100, Infinity
    assert render_numbers(parsed) == text
    assert extract_numbers("plain 1 and 2").not_numbers == 0


def test_prepare_keeps_statistics_finite_with_huge_numbers(tmp_path, capsys):
    """±1e308 used to make the normaliser's mean/std overflow (null in the manifest)."""
    import json

    from foundation.cli import main
    from foundation.data import Manifest

    corpus = tmp_path / "huge.jsonl"
    lines = [
        {"text": f"star {i}: mass = {1.5 * i}, w = {'1e308' if i % 2 else '-1e308'}, y = NaN"}
        for i in range(60)
    ]
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "shards"
    assert main(["prepare", "xval", str(corpus), "--out", str(out), "--vocab-size", "64"]) == 0
    assert "120 number-like spelling(s) (nan/inf, |x| > 1e100) left as text" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.provenance["numbers_left_as_text"] == 120
    for entry in manifest.stats["normalizer"]["fields"]:
        assert all(np.isfinite(entry[k]) for k in ("mean", "std", "log_scale"))
    values = manifest.field_stats("train")["values"]
    assert values["nonfinite"] == 0 and values["max"] < 100
