"""Number encodings: xVal (one scaled `[NUM]` token) and the paper's text baselines.

Each baseline writes a (normalised) value with three significant digits and a decimal exponent
in [-8, 7], as a fixed number of tokens appended after the text vocabulary:

| name  | tokens per number             | number vocabulary          |
|-------|-------------------------------|----------------------------|
| p10   | 5: sign, d, d, d, exponent    | 2 + 10 + 16 = 28           |
| p1000 | 3: sign, ddd, exponent        | 2 + 900 + 16 = 918         |
| b1999 | 2: signed ddd, exponent       | 1800 + 16 = 1816           |
| fp15  | 1: sign·ddd·exponent          | 1800 × 16 = 28800          |

Magnitudes below 1e-8 are written as +1.00e-8 (zero included); above 9.99e7 they are clipped
to ±9.99e7 and counted. A predicted token sequence that does not spell a number (a digit where
a sign belongs, a text token, ...) decodes to NaN: "unparseable".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENCODINGS = ("xval", "p10", "p1000", "b1999", "fp15")
MIN_EXP, MAX_EXP = -8, 7
N_EXP = MAX_EXP - MIN_EXP + 1
_MIN_MAG = 10.0**MIN_EXP
_MAX_MAG = 9.99 * 10.0**MAX_EXP


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(negative sign (bool), mantissa 100..999, exponent MIN_EXP..MAX_EXP, n clipped) with
    value ≈ ±mantissa/100 · 10^exponent."""
    values = np.asarray(values, dtype=np.float64)
    negative = values < 0
    mag = np.abs(values)
    clipped = int(np.count_nonzero(mag > _MAX_MAG))
    mag = np.clip(mag, _MIN_MAG, _MAX_MAG)
    exp = np.floor(np.log10(mag)).astype(np.int64)
    mant = np.rint(mag / 10.0**exp * 100).astype(np.int64)
    # log10 rounding at powers of ten, and 9.995 rounding up to 10.0:
    low = mant < 100
    exp[low] -= 1
    mant[low] = np.rint(mag[low] / 10.0 ** exp[low] * 100).astype(np.int64)
    high = mant >= 1000
    exp[high] += 1
    mant[high] = np.rint(mag[high] / 10.0 ** exp[high] * 100).astype(np.int64)
    over = exp > MAX_EXP
    exp[over], mant[over] = MAX_EXP, 999
    under = exp < MIN_EXP
    exp[under], mant[under] = MIN_EXP, 100
    return negative, mant, exp, clipped


def dequantize(negative: np.ndarray, mant: np.ndarray, exp: np.ndarray) -> np.ndarray:
    return np.where(negative, -1.0, 1.0) * mant / 100.0 * 10.0 ** np.asarray(exp, dtype=np.float64)


@dataclass(frozen=True)
class NumberEncoding:
    """How numbers become token ids. Local ids count from 0 inside the number vocabulary; the
    model adds the text vocabulary size."""

    name: str
    tokens_per_number: int
    vocab_size: int

    @property
    def is_xval(self) -> bool:
        return self.name == "xval"

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """(n, tokens_per_number) local ids of normalised values, and the number clipped."""
        neg, mant, exp, clipped = quantize(values)
        e = exp - MIN_EXP
        sign = neg.astype(np.int64)
        if self.name == "p10":
            digits = [mant // 100, (mant // 10) % 10, mant % 10]
            cols = [sign, *(2 + d for d in digits), 12 + e]
        elif self.name == "p1000":
            cols = [sign, 2 + (mant - 100), 902 + e]
        elif self.name == "b1999":
            cols = [sign * 900 + (mant - 100), 1800 + e]
        elif self.name == "fp15":
            cols = [(sign * 900 + (mant - 100)) * N_EXP + e]
        else:
            raise ValueError(f"encoding {self.name!r} writes numbers as [NUM], not as tokens")
        return np.stack(cols, axis=1).astype(np.int64), clipped

    def decode(self, local: np.ndarray) -> np.ndarray:
        """Values of (n, tokens_per_number) local ids; NaN where they do not spell a number
        (ids outside the slot's range, e.g. negative for a text token)."""
        local = np.asarray(local, dtype=np.int64).reshape(-1, self.tokens_per_number)
        n = len(local)
        ok = np.ones(n, dtype=bool)

        def take(col: int, lo: int, hi: int) -> np.ndarray:
            nonlocal ok
            v = local[:, col]
            ok &= (v >= lo) & (v < hi)
            return np.clip(v, lo, hi - 1) - lo

        if self.name == "p10":
            sign = take(0, 0, 2)
            d = [take(i, 2, 12) for i in (1, 2, 3)]
            mant = d[0] * 100 + d[1] * 10 + d[2]
            exp = take(4, 12, 12 + N_EXP) + MIN_EXP
        elif self.name == "p1000":
            sign = take(0, 0, 2)
            mant = take(1, 2, 902) + 100
            exp = take(2, 902, 902 + N_EXP) + MIN_EXP
        elif self.name == "b1999":
            signed = take(0, 0, 1800)
            sign, mant = signed // 900, signed % 900 + 100
            exp = take(1, 1800, 1800 + N_EXP) + MIN_EXP
        elif self.name == "fp15":
            code = take(0, 0, 1800 * N_EXP)
            signed, e = code // N_EXP, code % N_EXP
            sign, mant, exp = signed // 900, signed % 900 + 100, e + MIN_EXP
        else:
            raise ValueError(f"encoding {self.name!r} has no number tokens")
        out = dequantize(sign.astype(bool), mant, exp)
        out[~ok] = np.nan
        return out if n else np.zeros(0)


_SIZES = {"xval": (1, 0), "p10": (5, 28), "p1000": (3, 918), "b1999": (2, 1816), "fp15": (1, 1800 * N_EXP)}


def get_encoding(name: str) -> NumberEncoding:
    if name not in _SIZES:
        raise ValueError(f"unknown number encoding {name!r}; choose one of {', '.join(ENCODINGS)}")
    k, vocab = _SIZES[name]
    return NumberEncoding(name, k, vocab)
