"""Built-in corpora, written as JSONL records with a `text` field (the native format `prepare`
reads), so `synth` exercises the same reader as user data. Records that need more than a text
carry it in extra keys that `prepare` ignores (`split`, `n_operands`, `start`), which the paper-task
scoring (`encoders/xval/tasks.py`) reads back.

* `arithmetic`: multi-operand arithmetic as in the paper — 2 to 4 operands in [-10, 10] with two
  decimals, `+ - *` and random parenthesisation: `expr=((1.25*-3.40)+7.10), ans=2.85`. Every
  intermediate result and the answer lie in [-10, 10] too (expressions are redrawn until they
  do), so one normalisation keeps all values inside xVal's working range; unbounded products of
  four operands reach ±10⁴ and squash the typical answer to a sliver of the normalised range.
* `orbits`: a planet around a star of mass m (G = 1): m, semi-major axis a, eccentricity e,
  time step dt and 8 positions from the leapfrog integrator, as compact JSON (a one-planet
  miniature for demos and tests): `{"m":1.23,"a":0.98,"e":0.05,"dt":0.31,"x":[...],"y":[...]}`.
* `planets`: the paper's planets task at CPU scale — a star (m = 1) and two planets whose initial
  conditions follow the reference simulation (planet masses 1–5·10⁻⁵, semi-major axes from 1 to
  a_outer ∈ [1.5, 3], e ∈ [0, 0.1], shown ×10⁵ and ×20 as there), integrated as a full N-body
  system by kick-drift-kick leapfrog; the text holds the parameters, the step and the
  star-relative positions at 6 steps. Test records are out of distribution: their a_outer and
  step both lie in held-out bands that no training or validation record touches.
* `temperature`: an ERA5-like forecasting series — 16 stations, 3-hourly temperatures over three
  years (latitude-dependent mean and seasonal cycle, diurnal cycle in local solar time,
  persistent AR(1) weather anomalies, sensor noise); a record is a station, the time and 8
  readings (24 h), and the target `next` is the reading 3 h later. The last sixth of the period
  is the test split (a forecast of unseen time).
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

TASKS = ("arithmetic", "orbits", "planets", "temperature", "interpolation")
DEFAULT_TRAIN_VALUES = (0.2, 0.3, 0.5, 0.8)


ARITHMETIC_OPERANDS = (2, 4)
ARITHMETIC_BOUND = 10.0


def _operand(rng: np.random.Generator) -> str:
    return f"{rng.uniform(-ARITHMETIC_BOUND, ARITHMETIC_BOUND):.2f}"


def _expression(rng: np.random.Generator, n: int) -> tuple[str, float, float]:
    """A random expression tree over n operands: (text, value, largest |value| of any subtree)."""
    if n == 1:
        text = _operand(rng)
        return text, float(text), abs(float(text))
    left_n = int(rng.integers(1, n))
    left, lv, lm = _expression(rng, left_n)
    right, rv, rm = _expression(rng, n - left_n)
    op = "+-*"[int(rng.integers(0, 3))]
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    return f"({left}{op}{right})", value, max(lm, rm, abs(value))


def bounded_expression(
    rng: np.random.Generator, n: int, bound: float = ARITHMETIC_BOUND
) -> tuple[str, float]:
    """(text, value) of a random n-operand expression whose every intermediate result and answer
    lie in [-bound, bound], outer parentheses dropped; redrawn until one does."""
    while True:
        text, value, largest = _expression(rng, n)
        if largest <= bound:
            return text[1:-1], value


def arithmetic(n: int, seed: int) -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng([seed, 1])
    low, high = ARITHMETIC_OPERANDS
    for i in range(n):
        n_operands = int(rng.integers(low, high + 1))
        text, value = bounded_expression(rng, n_operands)
        answer = format_value(round(value, 4))
        yield {"id": f"arith-{i:07d}", "n_operands": n_operands, "text": f"expr={text}, ans={answer}"}


def accelerations(pos: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """(B, N, 2) gravitational accelerations (G = 1) of N bodies on each other, for B systems."""
    delta = pos[:, None, :, :] - pos[:, :, None, :]  # delta[b, i, j] = r_j - r_i
    dist2 = np.sum(delta**2, axis=-1)
    np.einsum("bii->bi", dist2)[:] = np.inf  # no self-force
    return np.sum(mass[:, None, :, None] * delta / dist2[..., None] ** 1.5, axis=2)


def leapfrog(
    pos: np.ndarray, vel: np.ndarray, mass: np.ndarray, step: np.ndarray, outputs: int, substeps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate B N-body systems with kick-drift-kick leapfrog (symplectic, time-reversible).

    pos, vel: (B, N, 2); mass: (B, N); step: (B,) time between outputs, each split into
    `substeps` leapfrog steps. Returns positions and velocities at the `outputs` output times
    (the first is t = 0), each (B, outputs, N, 2).
    """
    pos, vel = pos.astype(np.float64).copy(), vel.astype(np.float64).copy()
    h = (np.asarray(step, dtype=np.float64) / substeps)[:, None, None]
    acc = accelerations(pos, mass)
    out_pos, out_vel = [pos.copy()], [vel.copy()]
    for _ in range(outputs - 1):
        for _ in range(substeps):
            vel += 0.5 * h * acc
            pos += h * vel
            acc = accelerations(pos, mass)
            vel += 0.5 * h * acc
        out_pos.append(pos.copy())
        out_vel.append(vel.copy())
    return np.stack(out_pos, axis=1), np.stack(out_vel, axis=1)


def energy(pos: np.ndarray, vel: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Total energy (kinetic + pairwise potential, G = 1) of B systems: pos, vel (B, N, 2)."""
    kinetic = 0.5 * np.sum(mass * np.sum(vel**2, axis=-1), axis=1)
    dist = np.sqrt(np.sum((pos[:, None] - pos[:, :, None]) ** 2, axis=-1))
    i, j = np.triu_indices(mass.shape[1], k=1)
    potential = -np.sum(mass[:, i] * mass[:, j] / dist[:, i, j], axis=1)
    return kinetic + potential


def initial_state(
    star: np.ndarray, mass: np.ndarray, a: np.ndarray, e: np.ndarray, anomaly: np.ndarray, omega: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pos, vel, masses) of B systems — a star plus planets on heliocentric Kepler orbits with
    elements a, e, true anomaly and argument of periapsis (each (B, P)) — in the barycentric frame."""
    mu = star[:, None] + mass
    p = a * (1 - e**2)
    r = p / (1 + e * np.cos(anomaly))
    pos_orb = np.stack([r * np.cos(anomaly), r * np.sin(anomaly)], axis=-1)
    vel_orb = np.sqrt(mu / p)[..., None] * np.stack([-np.sin(anomaly), e + np.cos(anomaly)], axis=-1)
    c, s = np.cos(omega)[..., None], np.sin(omega)[..., None]

    def rotate(v: np.ndarray) -> np.ndarray:
        return np.concatenate([c * v[..., :1] - s * v[..., 1:], s * v[..., :1] + c * v[..., 1:]], axis=-1)

    zeros = np.zeros((len(star), 1, 2))
    pos = np.concatenate([zeros, rotate(pos_orb)], axis=1)
    vel = np.concatenate([zeros, rotate(vel_orb)], axis=1)
    masses = np.concatenate([star[:, None], mass], axis=1)
    total = masses.sum(axis=1)[:, None, None]
    pos -= np.sum(masses[..., None] * pos, axis=1, keepdims=True) / total
    vel -= np.sum(masses[..., None] * vel, axis=1, keepdims=True) / total
    return pos, vel, masses


def _list(values: Sequence[float], decimals: int = 3) -> str:
    return "[" + ",".join(f"{v:.{decimals}f}" for v in values) + "]"


def orbits(n: int, seed: int, steps: int = 8, substeps: int = 64) -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng([seed, 2])
    m, a, e = rng.uniform(0.5, 2.0, n), rng.uniform(0.5, 2.0, n), rng.uniform(0.0, 0.5, n)
    dt = rng.uniform(0.05, 0.5, n)
    omega, anomaly = rng.uniform(0, 2 * math.pi, n), rng.uniform(0, 2 * math.pi, n)
    pos, vel, masses = initial_state(
        m, np.zeros((n, 1)), a[:, None], e[:, None], anomaly[:, None], omega[:, None]
    )
    track, _ = leapfrog(pos, vel, masses, dt, steps, substeps)
    rel = track[:, :, 1] - track[:, :, 0]
    for i in range(n):
        text = (
            f'{{"m":{m[i]:.3f},"a":{a[i]:.3f},"e":{e[i]:.3f},"dt":{dt[i]:.3f},'
            f'"x":{_list(rel[i, :, 0])},"y":{_list(rel[i, :, 1])}}}'
        )
        yield {"id": f"orbit-{i:07d}", "text": text}


PLANET_A_OUTER = (1.5, 3.0)
PLANET_STEP = (0.25, 0.85)
HELD_OUT_A_OUTER = (2.1, 2.4)
HELD_OUT_STEP = (0.5, 0.6)
PLANET_MASS_SCALE, PLANET_ECC_SCALE = 1e5, 20.0


def _uniform_outside(rng: np.random.Generator, lo: float, hi: float, gap: tuple[float, float], n: int):
    """n uniform draws from [lo, hi] minus the gap (by mapping a shorter interval around it)."""
    u = rng.uniform(lo, hi - (gap[1] - gap[0]), n)
    return np.where(u < gap[0], u, u + (gap[1] - gap[0]))


def planets(
    n: int,
    seed: int,
    test: int | None = None,
    steps: int = 6,
    substeps: int = 48,
    valid_fraction: float = 0.05,
) -> Iterator[dict[str, Any]]:
    """n in-distribution train/valid systems, then `test` (default n // 10, at least 50) out-of-
    distribution ones whose outer semi-major axis and step both lie in the held-out bands."""
    rng = np.random.default_rng([seed, 4])
    test = max(50, n // 10) if test is None else test
    total = n + test
    a_outer = np.concatenate(
        [_uniform_outside(rng, *PLANET_A_OUTER, HELD_OUT_A_OUTER, n), rng.uniform(*HELD_OUT_A_OUTER, test)]
    )
    step = np.concatenate(
        [_uniform_outside(rng, *PLANET_STEP, HELD_OUT_STEP, n), rng.uniform(*HELD_OUT_STEP, test)]
    )
    split = np.where(rng.random(total) < valid_fraction, "valid", "train")
    split[n:] = "test"
    a = np.stack([np.ones(total), a_outer], axis=1)
    mass = rng.uniform(1e-5, 5e-5, (total, 2))
    e = rng.uniform(0.0, 0.1, (total, 2))
    anomaly = rng.uniform(0, 2 * math.pi, (total, 2))
    anomaly[rng.random(total) < 0.3] = 0.0  # as the reference: some systems start aligned
    order = np.argsort(rng.random((total, 2)), axis=1)  # random planet order in the text
    a, mass, e = (np.take_along_axis(v, order, axis=1) for v in (a, mass, e))
    anomaly = np.take_along_axis(anomaly, order, axis=1)
    pos, vel, masses = initial_state(np.ones(total), mass, a, e, anomaly, np.zeros((total, 2)))
    track, _ = leapfrog(pos, vel, masses, step, steps, substeps)
    rel = track[:, :, 1:] - track[:, :, :1]  # (total, steps, planets, 2), star-relative
    for i in range(total):
        desc = ",".join(
            f'"planet{k}":{{"m":{mass[i, k] * PLANET_MASS_SCALE:.3f},"a":{a[i, k]:.3f},'
            f'"e":{e[i, k] * PLANET_ECC_SCALE:.3f}}}'
            for k in range(2)
        )
        data = ",".join(
            "[" + ",".join(f"[{x:.3f},{y:.3f}]" for x, y in rel[i, t]) + "]" for t in range(steps)
        )
        text = f'{{"description":{{{desc},"stepsize":{step[i]:.3f}}},"data":[{data}]}}'
        yield {"id": f"planet-{i:07d}", "split": str(split[i]), "text": text}


TEMPERATURE_STATIONS = 16
TEMPERATURE_HISTORY = 8
TEMPERATURE_DAYS = 3 * 365


def temperature_series(seed: int, stations: int = TEMPERATURE_STATIONS, days: int = TEMPERATURE_DAYS):
    """(lat, lon, series (stations, 8·days) in °C, 3-hourly from day 0 at 00 UTC) — an ERA5-like
    2 m temperature: zonal mean and seasonal amplitude by latitude (seasons flipped south of the
    equator), a diurnal cycle peaking at 15 h local solar time, an AR(1) weather anomaly with a
    two-day memory, and sensor noise."""
    rng = np.random.default_rng([seed, 5])
    lat = rng.uniform(-60, 70, stations)
    lon = rng.uniform(-180, 180, stations)
    hours = 3.0 * np.arange(8 * days)
    mean = 28 - 0.4 * np.abs(lat) + rng.normal(0, 2, stations)
    seasonal = (2 + 0.25 * np.abs(lat)) * np.sign(lat + 1e-9)
    diurnal = rng.uniform(3, 7, stations)
    day_of_year = hours / 24 % 365
    local_hour = (hours[None, :] + lon[:, None] / 15) % 24
    climate = (
        mean[:, None]
        - seasonal[:, None] * np.cos(2 * math.pi * (day_of_year[None, :] - 15) / 365)
        + diurnal[:, None] * np.cos(2 * math.pi * (local_hour - 15) / 24)
    )
    rho = math.exp(-3 / 48)
    shocks = rng.normal(0, 2.5 * math.sqrt(1 - rho**2), climate.shape)
    anomaly = np.zeros_like(climate)
    anomaly[:, 0] = rng.normal(0, 2.5, stations)
    for t in range(1, climate.shape[1]):
        anomaly[:, t] = rho * anomaly[:, t - 1] + shocks[:, t]
    return lat, lon, climate + anomaly + rng.normal(0, 0.3, climate.shape)


def temperature(n: int, seed: int, test_fraction: float = 1 / 6, valid_fraction: float = 0.05):
    """n windows of 8 readings and the next one, at random stations and times; a window ending
    in the last `test_fraction` of the period is a test record."""
    lat, lon, series = temperature_series(seed)
    rng = np.random.default_rng([seed, 6])
    length = series.shape[1]
    cut = int(length * (1 - test_fraction))
    for i in range(n):
        station = int(rng.integers(0, len(lat)))
        start = int(rng.integers(0, length - TEMPERATURE_HISTORY))
        end = start + TEMPERATURE_HISTORY  # index of the target reading
        if end >= cut:
            split = "test"
            start = max(start, cut)  # a test window lies wholly in the test period
            start = min(start, length - TEMPERATURE_HISTORY - 1)
            end = start + TEMPERATURE_HISTORY
        else:
            split = "valid" if rng.random() < valid_fraction else "train"
        day, hour = divmod(3 * start, 24)
        text = (
            f'{{"lat":{lat[station]:.1f},"lon":{lon[station]:.1f},"day":{day % 365},"hour":{hour},'
            f'"t":{_list(series[station, start:end], 1)},"next":{series[station, end]:.1f}}}'
        )
        yield {"id": f"temp-{i:07d}", "split": split, "start": start, "text": text}


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
    if task == "planets":
        return planets(n, seed, **kwargs)
    if task == "temperature":
        return temperature(n, seed)
    if task == "interpolation":
        return interpolation(n, seed, **kwargs)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def record_fields(task: str) -> dict[str, str]:
    """The `PrepareOptions` fields that read a corpus's records: the `id` key, and for the
    tasks with a held-out test set the `split` each record carries."""
    fields = {"key_field": "id"}
    if task in ("interpolation", "planets", "temperature"):
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
