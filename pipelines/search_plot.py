"""`foundation search query --plot`: each query's input beside the inputs of its neighbours.

For an image → spectrum query this draws the query galaxy (g,r,z as an asinh-stretched colour
composite) and, to its right, the retrieved spectra stacked with offsets, labelled with their id,
cosine similarity and targets — the figure a person checks a cross-modal search with. The raw
inputs come from the shard set the embeddings were exported from (`--data` to override); arrays
are drawn by shape: (C, H, W) or (H, W) as images, 1-D as spectra (against a wavelength field of
the same length when the sample has one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from foundation.atomic import write_figure
from foundation.errors import DataError

MAX_QUERIES = 6
MAX_SPECTRA = 8


def _rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) bands, bluest first (g, r, z) → (H, W, 3) asinh colour image (Lupton-like)."""
    bands = np.asarray(image, dtype=np.float64)
    if bands.ndim == 2:
        bands = bands[None]
    if bands.shape[0] == 1:
        bands = np.repeat(bands, 3, axis=0)
    bands = bands[:3][::-1]  # reddest band → red channel
    scale = np.percentile(np.abs(bands), 99.5) or 1.0
    rgb = np.arcsinh(bands / (0.1 * scale)) / np.arcsinh(10.0)
    return np.clip(np.moveaxis(rgb, 0, -1), 0.0, 1.0)


def _wavelength(sample: dict[str, Any], length: int, grid: Any = None) -> np.ndarray | None:
    """The wavelength of each pixel: a sample field of the right length, else the shard set's
    recorded grid (`extra.wavelength = {start, stop, step}`, as AstroCLIP's prepare writes)."""
    for name, value in sample.items():
        lowered = name.lower()
        if (
            ("wave" in lowered or "lambda" in lowered)
            and isinstance(value, np.ndarray)
            and value.size == length
        ):
            return value.reshape(-1)
    if isinstance(grid, dict) and {"start", "step"} <= set(grid):
        return float(grid["start"]) + float(grid["step"]) * np.arange(length)
    return None


def _smooth(flux: np.ndarray, width: int = 5) -> np.ndarray:
    """Boxcar-smoothed flux for display (noisy spectra are unreadable at figure resolution)."""
    if flux.size < 3 * width:
        return flux
    return np.convolve(np.nan_to_num(flux), np.ones(width) / width, mode="same")


def _short_targets(targets: dict[str, Any], limit: int = 2) -> str:
    preferred = [k for k in ("redshift", "z", "stellar_mass") if k in targets] or list(targets)
    return ", ".join(f"{k}={targets[k]:.3g}" for k in preferred[:limit] if targets.get(k) is not None)


def _field_for(modality: str, sample: dict[str, Any], fields: dict[str, str] | None) -> str:
    arrays = [k for k, v in sample.items() if isinstance(v, np.ndarray)]
    if fields and modality in fields:
        if fields[modality] not in arrays:
            raise DataError(
                f"--plot-fields {modality}={fields[modality]}: the samples have no array field "
                f"{fields[modality]!r} (array fields: {', '.join(arrays) or 'none'})"
            )
        return fields[modality]
    if modality in arrays:
        return modality
    guesses = [k for k in arrays if modality in k]
    if len(guesses) == 1:
        return guesses[0]
    raise DataError(
        f"cannot tell which sample field holds the {modality} input (array fields: {', '.join(arrays)}); "
        "pass --plot-fields modality=field"
    )


def plot_neighbours(
    results: list[dict[str, Any]],
    png: str | Path,
    *,
    data: str | Path | None = None,
    embeddings: str | Path | None = None,
    fields: dict[str, str] | None = None,
) -> Path:
    """Write the figure for (at most MAX_QUERIES of) `results` from `foundation.search.files.query`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from foundation.data.raw_inputs import fetch_samples

    if data is None and embeddings is not None:
        from foundation.embeddings import open_embeddings

        with open_embeddings(embeddings) as emb:
            data = emb.attrs.get("data")
    if not data:
        raise DataError("--plot needs the shard set with the raw inputs: pass --data SHARDS")
    from foundation.data import Manifest

    grid = (Manifest.load(data).extra or {}).get("wavelength")
    results = results[:MAX_QUERIES]
    ids = {r["query"] for r in results} | {nb["id"] for r in results for nb in r["neighbours"][:MAX_SPECTRA]}
    samples = fetch_samples(data, ids)
    fig, axes = plt.subplots(
        len(results), 2, figsize=(11, 3.4 * len(results)), squeeze=False, gridspec_kw={"width_ratios": [1, 3]}
    )
    for (ax_q, ax_n), res in zip(axes, results, strict=True):
        query_sample = samples[res["query"]]
        q_field = _field_for(res["query_modality"], query_sample, fields)
        title = f"query {res['query']} ({q_field})\n{_short_targets(res['query_targets'])}"
        _draw(ax_q, query_sample[q_field], query_sample, title, grid)
        neighbours = res["neighbours"][:MAX_SPECTRA]
        if not neighbours:
            ax_n.axis("off")
            continue
        n_field = _field_for(res["index_modality"], samples[neighbours[0]["id"]], fields)
        first = np.asarray(samples[neighbours[0]["id"]][n_field])
        if first.ndim == 1:
            for i, nb in enumerate(neighbours):
                sample = samples[nb["id"]]
                flux = _smooth(np.asarray(sample[n_field], dtype=np.float64).reshape(-1))
                x = _wavelength(sample, flux.size, grid)
                x = np.arange(flux.size) if x is None else x
                spread = np.nanpercentile(flux, 99) - np.nanpercentile(flux, 1) or 1.0
                offset = -1.3 * i
                colour = "C3" if nb["match"] else "k"
                ax_n.plot(x, (flux - np.nanmedian(flux)) / spread + offset, lw=0.7, color=colour)
                label = (
                    f"#{nb['rank']} {nb['id']}  cos {nb['similarity']:.3f}  {_short_targets(nb['targets'])}"
                )
                ax_n.text(
                    x[0],
                    offset + 0.45,
                    label + ("  (same object)" if nb["match"] else ""),
                    fontsize=7,
                    color=colour,
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
                )
            ax_n.set_yticks([])
            has_grid = _wavelength(samples[neighbours[0]["id"]], first.size, grid) is not None
            ax_n.set_xlabel("observed wavelength [Å]" if has_grid else "pixel")
            ax_n.set_title(
                f"top {len(neighbours)} {res['index_modality']} neighbours ({n_field}, 5-pixel boxcar)",
                fontsize=9,
            )
        else:  # image neighbours: a strip
            ax_n.axis("off")
            strip = np.concatenate(
                [_rgb(np.asarray(samples[nb["id"]][n_field])) for nb in neighbours], axis=1
            )
            ax_n.imshow(strip, origin="lower")
            ax_n.set_title(
                "  ".join(f"#{nb['rank']} {nb['similarity']:.2f}" for nb in neighbours), fontsize=8
            )
    fig.tight_layout()
    return write_figure(png, fig, dpi=110)


def _draw(ax: Any, value: Any, sample: dict[str, Any], title: str, grid: Any = None) -> None:
    value = np.asarray(value)
    if value.ndim >= 2:
        ax.imshow(_rgb(value), origin="lower")
        ax.axis("off")
    else:
        x = _wavelength(sample, value.size, grid)
        ax.plot(
            np.arange(value.size) if x is None else x, _smooth(value.astype(np.float64)), lw=0.6, color="k"
        )
        ax.set_yticks([])
    ax.set_title(title, fontsize=9)
