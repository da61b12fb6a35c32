"""Built-in corpora, written as JSONL records with a `text` field (the native format `prepare`
reads), so `synth` exercises the same reader as user data.

* `arithmetic`: multi-operand arithmetic as in the paper — 2 to 4 operands in [-10, 10] with two
  decimals, `+ - *` and random parenthesisation: `expr=((1.25*-3.40)+7.10), ans=2.85`.
* `orbits`: a planet on a Kepler orbit around a star (G = 1): mass m, semi-major axis a,
  eccentricity e, time step dt and 8 positions, as compact JSON (the paper's planets task in
  miniature): `{"m":1.23,"a":0.98,"e":0.05,"dt":0.31,"x":[...],"y":[...]}`.
* `interpolation`: a target `p` and six noisy measurements of it, `obs_k = p·(1 + 0.02·ε_k)`
  (`{"obs":[0.296,0.305,...],"p":0.300}`); training and validation records take `p` only from a
  few gapped values, test records from a dense grid (each record carries its `split`) — the
  out-of-distribution interpolation test: values between the gaps never occur in training, not
  even among the measurements.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encoders.xval.numbers import format_value
from foundation.atomic import replacing
from foundation.errors import DataError

TASKS = ("arithmetic", "orbits", "interpolation")
DEFAULT_TRAIN_VALUES = (0.2, 0.3, 0.5, 0.8)


def _operand(rng: np.random.Generator) -> str:
    return f"{rng.uniform(-10, 10):.2f}"


def _expression(rng: np.random.Generator, n: int) -> tuple[str, float]:
    """A random expression tree over n operands: (text, value)."""
    if n == 1:
        text = _operand(rng)
        return text, float(text)
    left_n = int(rng.integers(1, n))
    left, lv = _expression(rng, left_n)
    right, rv = _expression(rng, n - left_n)
    op = "+-*"[int(rng.integers(0, 3))]
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    return f"({left}{op}{right})", value


def arithmetic(n: int, seed: int) -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng([seed, 1])
    for i in range(n):
        text, value = _expression(rng, int(rng.integers(2, 5)))
        if text.startswith("(") and text.endswith(")"):
            text = text[1:-1]
        yield {"id": f"arith-{i:07d}", "text": f"expr={text}, ans={format_value(round(value, 4))}"}


def _kepler_positions(m, a, e, omega, mean0, dt, steps) -> tuple[np.ndarray, np.ndarray]:
    motion = math.sqrt(m / a**3)
    mean = mean0 + motion * dt * np.arange(steps)
    ecc = mean.copy()
    for _ in range(30):  # Newton on E - e sin E = M
        ecc -= (ecc - e * np.sin(ecc) - mean) / (1 - e * np.cos(ecc))
    x = a * (np.cos(ecc) - e)
    y = a * math.sqrt(1 - e * e) * np.sin(ecc)
    c, s = math.cos(omega), math.sin(omega)
    return c * x - s * y, s * x + c * y


def _list(values: Sequence[float], decimals: int = 3) -> str:
    return "[" + ",".join(f"{v:.{decimals}f}" for v in values) + "]"


def orbits(n: int, seed: int, steps: int = 8) -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng([seed, 2])
    for i in range(n):
        m, a, e = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0.0, 0.5)
        dt = rng.uniform(0.05, 0.5)
        x, y = _kepler_positions(m, a, e, rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi), dt, steps)
        text = f'{{"m":{m:.3f},"a":{a:.3f},"e":{e:.3f},"dt":{dt:.3f},"x":{_list(x)},"y":{_list(y)}}}'
        yield {"id": f"orbit-{i:07d}", "text": text}


def interpolation(
    n: int,
    seed: int,
    train_values: Sequence[float] = DEFAULT_TRAIN_VALUES,
    grid: int = 21,
    per_grid: int = 10,
    valid_fraction: float = 0.05,
    points: int = 6,
    noise: float = 0.02,
) -> Iterator[dict[str, Any]]:
    """n gapped train/valid records, then `grid * per_grid` test records on the dense grid
    spanning [min(train_values), max(train_values)]."""
    rng = np.random.default_rng([seed, 3])
    lo, hi = min(train_values), max(train_values)
    grid_values = np.linspace(lo, hi, grid)
    targets = [
        ("train" if rng.random() >= valid_fraction else "valid", float(rng.choice(train_values)))
        for _ in range(n)
    ]
    targets += [("test", float(p)) for p in np.repeat(grid_values, per_grid)]
    for i, (split, p) in enumerate(targets):
        obs = p * (1 + noise * rng.standard_normal(points))
        text = f'{{"obs":{_list(obs)},"p":{p:.3f}}}'
        yield {"id": f"interp-{i:07d}", "split": split, "text": text}


def generate(task: str, n: int, seed: int, **kwargs: Any) -> Iterator[dict[str, Any]]:
    if task == "arithmetic":
        return arithmetic(n, seed)
    if task == "orbits":
        return orbits(n, seed)
    if task == "interpolation":
        return interpolation(n, seed, **kwargs)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def record_fields(task: str) -> dict[str, str]:
    """The `PrepareOptions` fields that read a corpus's records: the `id` key, and for
    interpolation the `split` each record carries."""
    fields = {"key_field": "id"}
    if task == "interpolation":
        fields["split_field"] = "split"
    return fields


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write records as JSONL atomically; returns the count."""
    n = 0
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def write_corpus(
    task: str, n: int, seed: int, path: str | Path, *, overwrite: bool = False, **kwargs: Any
) -> int:
    """Write the `task` corpus (`generate`'s records) to `path` as JSONL; returns the count.
    An existing file is replaced only with `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass --overwrite to replace it")
    return write_jsonl(generate(task, n, seed, **kwargs), path)
