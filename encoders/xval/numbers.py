"""The number grammar: which substrings of a text are numbers, losslessly.

`extract_numbers(text)` returns the text with one `[NUM]` marker per number (`template`), the
values in float64 and the literal spellings, so `render_numbers(extract_numbers(t)) == t` for
every string `t` that does not already contain `[NUM]`. The rules (docs/xval.md has examples):

* Literal: ASCII digits with an optional decimal part and exponent — `12`, `3.5`, `.5`,
  `3.1e-2`, `-1E+5`. A trailing dot (`5.`) belongs to the number only when an exponent or a
  punctuation mark follows (`5.e3`, `[5., 6.]`); before a space, a letter or the end of the text
  it is a full stop (`It was 5.` -> `5` and `.`).
* Identifier rule: a number never starts right after a letter, digit or underscore, nor after
  `<digit>.`, and is never followed by `.<digit>` — so `planet0`, `a1b`, `x_2`, `v1.2.3`,
  `192.168.0.1` stay text, while `1..10` is 1 and 10. A leading-dot literal (`.5`) does not
  follow another dot (`1...5` is 1 and 5). Letters may follow a number (`5km`, `3x` -> a
  number and text).
* Sign rule: `+`/`-` directly before a literal is its sign unless the character before the sign
  is a letter, digit, underscore, dot or closing bracket `)]}` (then it is an operator):
  `1-2` -> 1, 2; `x-1` -> 1; `(1)-2` -> 1, 2; `x=-3` -> -3; `(-2)` -> -2; `1 -2` -> 1, -2.
* Thousands separators (`thousands=`): "never" — a comma always separates numbers; "always" —
  `1,234,567` (first group 1–3 digits without a leading zero, then groups of exactly three) is
  one number; "auto" (default) — as "always" but only where prose is likely: the literal starts
  the text or follows whitespace, `(`, `$`, `£`, `€`, `¥`, `~` or `≈`; never after `[`, `,`, `:`,
  `=` or a quote, so compact JSON/CSV lists such as `[100,200]` are two numbers.
* `nan`, `inf`, `Infinity` are words, not numbers; a literal whose magnitude exceeds
  `MAX_MAGNITUDE` (1e100), or that overflows float64 (`1e400`), is left as text: statistics of
  such values (sums of squares for the normaliser and the metrics) would overflow to inf. Both are
  counted in `ParsedText.not_numbers`, so a prepare can say how many it left as text. Values are
  float64; literals keep their exact spelling.
* The field of a number (for per-field normalisation and metrics) is the identifier `K` of the
  nearest `K:` / `K=` / `"K":` before it with no letter in between (`{"m":1.2}` -> `m`,
  `"xs":[1,2]` -> `xs`, `a = 3` -> `a`); otherwise `_`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from foundation.errors import DataError

NUM_MARKER = "[NUM]"
MAX_MAGNITUDE = 1e100
"""Literals larger than this in magnitude stay text (their squares still fit float64 sums)."""
UNNAMED_FIELD = "_"
ThousandsPolicy = Literal["auto", "always", "never"]

_SIGN = r"(?:(?<![\w.)\]}])[+-](?=\.?[0-9]))?"
_EXPONENT = r"(?:[eE][+-]?[0-9]+)?"
_PLAIN = (
    r"(?:[0-9]+\.[0-9]+"  # 3.25
    r"|[0-9]+\.(?=[eE][+-]?[0-9])"  # 5.e3
    r"|[0-9]+\.(?=[^\s\w.])"  # 5., 5.] (a dot before punctuation)
    r"|[0-9]+"  # 12
    r"|(?<!\.)\.[0-9]+)"  # .5 (not ...5)
)
_GROUPED = r"(?:[1-9][0-9]{0,2}(?:,[0-9]{3})+(?![0-9])(?!,[0-9])(?:\.[0-9]+)?)"
# Not after an identifier character, nor after `<digit>.` (1..10 -> 1, 10; v1.2 stays text).
_LEFT = r"(?<!\w)(?<![0-9]\.)"
_RIGHT = r"(?!\.?[0-9])"
NUMBER_PATTERN = re.compile(rf"{_LEFT}{_SIGN}{_PLAIN}{_EXPONENT}{_RIGHT}")
"""The documented regular expression for `thousands="never"`."""
GROUPED_NUMBER_PATTERN = re.compile(rf"{_LEFT}{_SIGN}(?:{_GROUPED}|{_PLAIN}){_EXPONENT}{_RIGHT}")
"""The same, also accepting `1,234,567` (used by `thousands="always"` and `"auto"`)."""
_PROSE_BEFORE = frozenset("($£€¥~≈")
_WORD = re.compile(r"[^\W\d]\w*")
_KEY_SUFFIX = re.compile(r"[\"']?\s*[:=]")
_NONFINITE_WORD = re.compile(r"(?<![\w.])[+-]?(?:nan|inf(?:inity)?)(?!\w)", re.IGNORECASE)


@dataclass(frozen=True, eq=False)
class ParsedText:
    """A text split into a template (one `[NUM]` per number) and its numbers."""

    template: str
    values: np.ndarray
    """float64, one per `[NUM]` in `template`, in order."""
    literals: tuple[str, ...]
    """The exact spelling of each number in the source text."""
    fields: tuple[str, ...]
    """The field each number belongs to (see the module docstring), `_` when unnamed."""
    not_numbers: int = 0
    """Number-like spellings left as text: `nan`/`inf` words and literals beyond MAX_MAGNITUDE."""

    @property
    def segments(self) -> list[str]:
        """The text between numbers: `len(values) + 1` strings (the marker has no border, so
        splitting the template on it is unambiguous)."""
        return self.template.split(NUM_MARKER)

    def __len__(self) -> int:
        return len(self.literals)


def _is_prose_context(text: str, start: int) -> bool:
    return start == 0 or text[start - 1].isspace() or text[start - 1] in _PROSE_BEFORE


def _fields(segments: Sequence[str]) -> list[str]:
    """The field of the number after each of `segments` (see the module docstring)."""
    fields = []
    key = UNNAMED_FIELD
    for segment in segments:
        last = None
        for last in _WORD.finditer(segment):  # noqa: B007 - only the last word matters
            pass
        if last is not None:
            key = last.group(0) if _KEY_SUFFIX.match(segment, last.end()) else UNNAMED_FIELD
        fields.append(key)
    return fields


def extract_numbers(text: str, *, thousands: ThousandsPolicy = "auto") -> ParsedText:
    """Split `text` into a template with one `[NUM]` per number and the numbers' values.

    Raises DataError when the text already contains the `[NUM]` marker (the template would be
    ambiguous). Lossless: `render_numbers(extract_numbers(text)) == text`.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_numbers expects a str, got {type(text).__name__}")
    if NUM_MARKER in text:
        raise DataError(
            f"text contains the reserved marker {NUM_MARKER!r} at offset {text.index(NUM_MARKER)}; "
            "xVal writes one marker per number, so input text must not contain it (replace it first)"
        )
    if thousands not in ("auto", "always", "never"):
        raise ValueError(f"thousands must be 'auto', 'always' or 'never', got {thousands!r}")
    pattern = NUMBER_PATTERN if thousands == "never" else GROUPED_NUMBER_PATTERN
    spans: list[tuple[int, int]] = []
    values: list[float] = []
    literals: list[str] = []
    out_of_range = 0
    pos = 0
    while True:
        match = pattern.search(text, pos)
        if match is None:
            break
        literal = match.group(0)
        if "," in literal and thousands == "auto" and not _is_prose_context(text, match.start()):
            match = NUMBER_PATTERN.match(text, match.start())
            if match is None:  # cannot happen: a grouped literal starts with a plain one
                pos += 1
                continue
            literal = match.group(0)
        value = float(literal.replace(",", ""))
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            out_of_range += 1
            pos = match.end()  # such literals stay text
            continue
        spans.append(match.span())
        values.append(value)
        literals.append(literal)
        pos = match.end()
    pieces = []
    last = 0
    for start, end in spans:
        pieces.append(text[last:start])
        pieces.append(NUM_MARKER)
        last = end
    pieces.append(text[last:])
    template = "".join(pieces)
    fields = tuple(_fields(template.split(NUM_MARKER)[:-1]))
    not_numbers = out_of_range + len(_NONFINITE_WORD.findall(text))
    return ParsedText(template, np.asarray(values, dtype=np.float64), tuple(literals), fields, not_numbers)


def format_value(value: float, digits: int | None = None) -> str:
    """A number as text: the shortest round-trip float64 spelling, or `digits` significant ones."""
    value = float(value)
    if not math.isfinite(value):
        return repr(value)
    if digits is None:
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return f"{value:.{digits}g}"


def render_numbers(
    parsed: ParsedText, values: Sequence[float] | np.ndarray | None = None, *, digits: int | None = None
) -> str:
    """The text of `parsed`: its original spellings, or `values` written in their places.

    New values are spelled by `format_value(value, digits)`; a text rendered with new values is
    not guaranteed to extract back to the same split (e.g. `1-` followed by `-0.5`).
    """
    segments = parsed.segments
    if values is None:
        spellings = list(parsed.literals)
    else:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        spellings = [format_value(v, digits) for v in values]
    if len(spellings) != len(segments) - 1:
        raise ValueError(
            f"the template has {len(segments) - 1} numbers but {len(spellings)} values were given"
        )
    out = [segments[0]]
    for spelling, segment in zip(spellings, segments[1:], strict=True):
        out.append(spelling)
        out.append(segment)
    return "".join(out)


def field_at_end(text: str) -> str:
    """The field a number written right after `text` would belong to (used while generating)."""
    return _fields(text.split(NUM_MARKER))[-1]
