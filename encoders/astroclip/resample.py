"""Flux-conserving resampling of spectra onto the model's wavelength grid.

Each output pixel is the overlap-weighted mean of the input pixels it covers (f_λ is a density, so
the mean of the density conserves the integrated flux); variances combine with squared weights;
masked input pixels get weight 0; an output pixel less than half covered by good input is masked.
Masked output pixels are 0, or with `keep_masked` keep a value: on the same grid the stored one, else
the overlap-weighted mean of all finite input pixels (the mask still says bad, ivar still 0).
The (output x input) overlap matrix depends only on the two grids and is built once per grid.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from encoders.astroclip.survey import pixel_edges


def same_grid(a: np.ndarray, b: np.ndarray, tolerance: float = 1e-3) -> bool:
    """True if two wavelength grids agree to `tolerance` of a pixel."""
    if a.shape != b.shape:
        return False
    step = np.min(np.abs(np.diff(b))) if len(b) > 1 else 1.0
    return bool(np.all(np.abs(a - b) <= tolerance * step))


def overlap_matrix(source: np.ndarray, target: np.ndarray) -> sparse.csr_matrix:
    """(len(target), len(source)) sparse matrix of the overlap length (Å) of each pixel pair."""
    src = pixel_edges(np.asarray(source, dtype=np.float64))
    dst = pixel_edges(np.asarray(target, dtype=np.float64))
    if np.any(np.diff(src) <= 0) or np.any(np.diff(dst) <= 0):
        raise ValueError("wavelength grids must be strictly increasing")
    rows, cols, vals = [], [], []
    first = np.searchsorted(src, dst[:-1], side="right") - 1
    last = np.searchsorted(src, dst[1:], side="left")
    for i in range(len(dst) - 1):
        lo_j, hi_j = max(first[i], 0), min(last[i], len(src) - 1)
        if hi_j <= lo_j:
            continue
        j = np.arange(lo_j, hi_j)
        overlap = np.minimum(src[j + 1], dst[i + 1]) - np.maximum(src[j], dst[i])
        good = overlap > 0
        rows.append(np.full(good.sum(), i))
        cols.append(j[good])
        vals.append(overlap[good])
    if not rows:
        return sparse.csr_matrix((len(target), len(source)))
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(target), len(source))
    )


class Resampler:
    """Resample batches of (flux, ivar, mask) from one source grid to one target grid."""

    def __init__(self, source: np.ndarray, target: np.ndarray, keep_masked: bool = False):
        self.keep_masked = keep_masked
        self.source = np.asarray(source, dtype=np.float64)
        self.target = np.asarray(target, dtype=np.float64)
        self.identity = same_grid(self.source, self.target)
        self.matrix = None if self.identity else overlap_matrix(self.source, self.target)
        if self.matrix is not None:
            self.width = np.diff(pixel_edges(self.target))

    def __call__(
        self, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, L_in) arrays → (N, L_out) float32 flux, float32 ivar, bool mask (True = bad)."""
        bad = mask | ~(ivar > 0) | ~np.isfinite(flux)
        if self.identity:
            blank = ~np.isfinite(flux) if self.keep_masked else bad
            return (
                np.where(blank, 0.0, flux).astype(np.float32),
                np.where(bad, 0.0, ivar).astype(np.float32),
                bad,
            )
        good = (~bad).astype(np.float64)
        f = np.where(bad, 0.0, flux).astype(np.float64)
        var = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, ivar))
        weight = (self.matrix @ good.T).T  # Å of good input under each output pixel
        total = np.where(weight > 0, weight, 1.0)
        out_flux = (self.matrix @ f.T).T / total
        out_var = ((self.matrix.multiply(self.matrix)) @ var.T).T / total**2
        out_bad = weight < 0.5 * self.width[None, :]
        out_ivar = np.where(out_bad | (out_var <= 0), 0.0, 1.0 / np.where(out_var > 0, out_var, 1.0))
        masked_value = self._mean_of_finite(flux) if self.keep_masked else 0.0
        return (
            np.where(out_bad, masked_value, out_flux).astype(np.float32),
            out_ivar.astype(np.float32),
            out_bad,
        )

    def _mean_of_finite(self, flux: np.ndarray) -> np.ndarray:
        """(N, L_out) overlap-weighted mean of every finite input pixel, masked or not (0 where none)."""
        finite = np.isfinite(flux)
        weight = (self.matrix @ finite.astype(np.float64).T).T
        total = (self.matrix @ np.where(finite, flux, 0.0).astype(np.float64).T).T
        return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), 0.0)
